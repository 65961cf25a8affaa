"""The launchers' multi-node commands, run for real over SSH on loopback, as the README writes
them: `deepspeed --hostfile` (the PDSH runner) trains from S3, is killed and resumed; `ray up` ->
`ray submit` -> `ray down` with preprocess/cluster-local.yaml preprocesses into S3.

The two "hosts", 127.0.0.1 and 127.0.0.2, are one sshd on a free port, run in a PID namespace of
its own: what the launchers start through it sees only its own processes, as on a machine of its
own, so `ray stop` (which `ray down` runs) cannot reach any other Ray on this machine, and
killing the namespace stops everything the tests started.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from espeak_audio import REPO_ROOT
from test_run_finetuning import (
    batch_trace,
    free_port,
    train_steps,
    training_options,
    upload_prepared,
)

pytestmark = pytest.mark.launchers

HOSTS = ("127.0.0.1", "127.0.0.2")
BIN = Path(sys.executable).parent
# What the tests need of the machine. Missing, they fail: the launchers' tests must never be
# skipped in CI without a word.
REQUIRED = {
    "sshd": "/usr/sbin/sshd",
    "ssh": "ssh",
    "ssh-keygen": "ssh-keygen",
    "pdsh": "pdsh",
    "rsync": "rsync",
    "unshare": "unshare",
}


@dataclass(frozen=True)
class LoopbackSsh:
    """An sshd reachable as HOSTS on `port` by a plain `ssh HOST` (through `bin_dir`, first on
    PATH), whose sessions run as root with HOME=`home`, in the PID namespace of `init_pid`."""

    port: int
    bin_dir: Path  # holds `ssh`: the real ssh with this fixture's client config
    home: Path  # HOME of every session: nothing of the real ~ is read or written
    init_pid: int  # sshd, pid 1 of the namespace (as this machine numbers it)

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """An environment whose `ssh` (and pdsh's, and rsync's) reaches HOSTS."""
        env = dict(os.environ if base is None else base)
        env["PATH"] = f"{self.bin_dir}:{env['PATH']}"
        return env

    def namespace_pids(self) -> list[int]:
        """Every live process of the namespace but sshd itself: what the launchers started."""
        own = os.readlink(f"/proc/{self.init_pid}/ns/pid")
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == self.init_pid:
                continue
            try:
                same = os.readlink(f"/proc/{entry}/ns/pid") == own
                state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if same and state != "Z":
                pids.append(int(entry))
        return pids

    def kill_all_but_sshd(self) -> None:
        """SIGKILL to everything the namespace runs but sshd: both hosts preempted at once."""
        deadline = time.monotonic() + 30
        while pids := self.namespace_pids():
            assert time.monotonic() < deadline, f"survived SIGKILL: {pids}"
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)


def _missing_tools() -> list[str]:
    return [name for name, path in REQUIRED.items() if not shutil.which(path)]


def _write_ssh_files(root: Path, port: int) -> None:
    """Keys, sshd's config, and a client config that pins the host key (no trust on first use)."""
    for key in ("host_key", "client_key"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / key)], check=True
        )
    shutil.copy(root / "client_key.pub", root / "authorized_keys")
    (root / "home").mkdir()
    (root / "sshd_config").write_text(
        f"Port {port}\n"
        + "".join(f"ListenAddress {host}\n" for host in HOSTS)
        + f"HostKey {root / 'host_key'}\n"
        f"AuthorizedKeysFile {root / 'authorized_keys'}\n"
        "PidFile none\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nUsePAM no\n"
        # The keys live in a temp dir, not in a home sshd would check the modes of.
        "StrictModes no\n"
        # Every session's HOME: ~/.ray, ~/.bashrc and what `ray up` copies to ~ stay in here.
        f"SetEnv HOME={root / 'home'}\n"
    )
    host_key = " ".join((root / "host_key.pub").read_text().split()[:2])
    (root / "known_hosts").write_text("".join(f"[{h}]:{port} {host_key}\n" for h in HOSTS))
    (root / "ssh_config").write_text(
        f"Host {' '.join(HOSTS)}\n  Port {port}\n  User root\n"
        f"  IdentityFile {root / 'client_key'}\n  IdentitiesOnly yes\n"
        f"  UserKnownHostsFile {root / 'known_hosts'}\n  StrictHostKeyChecking yes\n"
        "  BatchMode yes\n"
    )
    # OpenSSH reads ~/.ssh/config of the passwd entry's home, never $HOME: an `ssh` first on
    # PATH that adds -F is how a plain `ssh 127.0.0.2` (Ray's, pdsh's, rsync's) gets this config
    # without touching the real ~/.ssh.
    (root / "bin").mkdir()
    wrapper = root / "bin" / "ssh"
    wrapper.write_text(f'#!/bin/sh\nexec {shutil.which("ssh")} -F {root / "ssh_config"} "$@"\n')
    wrapper.chmod(0o755)
    (root / "home" / ".bashrc").write_text(f'export PATH="{root / "bin"}:$PATH"\n')


def _wait_for_port(host: str, port: int, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            assert process.poll() is None, f"sshd exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"sshd not listening:\n{log.read_text()[-3000:]}"
            time.sleep(0.1)


@pytest.fixture(scope="module")
def loopback_ssh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackSsh]:
    missing = _missing_tools()
    if missing:
        pytest.fail(f"missing {missing}: apt-get install openssh-server pdsh rsync (README)")
    root = tmp_path_factory.mktemp("ssh")
    port = free_port()
    _write_ssh_files(root, port)
    # sshd refuses to start without its privilege separation directory, which Debian's service
    # unit creates at boot and a container never does.
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    log = root / "sshd.log"
    with open(log, "w") as output:
        # --kill-child: unshare's death takes sshd, the namespace's pid 1, and with it every
        # process in the namespace.
        process = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child",
             REQUIRED["sshd"], "-D", "-e", "-f", str(root / "sshd_config")],
            stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        for host in HOSTS:
            _wait_for_port(host, port, process, log)
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
        ssh = LoopbackSsh(port, root / "bin", root / "home", int(children[0]))
        yield ssh
    finally:
        # unshare ignores SIGTERM while it waits for its child; the namespace's pid 1 gets
        # SIGKILL from here, and the kernel kills every process in the namespace with it.
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children")
        for pid in children.read_text().split() if process.poll() is None else []:
            os.kill(int(pid), signal.SIGKILL)
        process.wait(timeout=30)


def test_plain_ssh_reaches_both_hosts_in_their_own_namespace(loopback_ssh):
    for host in HOSTS:
        result = subprocess.run(
            ["ssh", host, "echo $HOME; ps -e -o pid="], env=loopback_ssh.env(),
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        home, *pids = result.stdout.split()
        assert home == str(loopback_ssh.home)
        assert "1" in pids and len(pids) < 10  # sshd, the session, the shell, ps: nothing else


# --- deepspeed --hostfile, over pdsh and SSH ------------------------------------------------

DEEPSPEED = shutil.which("deepspeed", path=str(BIN)) or "deepspeed"
AWS_PREFIX = "AWS_"


def _hostfile(path: Path, hosts: tuple[str, ...]) -> Path:
    path.write_text("".join(f"{host} slots=1\n" for host in hosts))
    return path


def _deepspeed_env_file(path: Path) -> Path:
    """The S3 settings as KEY=VALUE lines: the PDSH runner (DeepSpeed 0.19.8) forwards only
    variables starting with PYTHON, MLFLOW, MV2 or UCX, and the lines of this file."""
    path.write_text("".join(f"{k}={v}\n" for k, v in os.environ.items() if k.startswith("AWS_")))
    return path


def _launcher_env(ssh: LoopbackSsh, env_file: Path) -> dict[str, str]:
    """The launching shell: no AWS_* of its own, so the ranks can only have them from the file;
    DS_ENV_FILE names it (an absolute path: the runner os.path.joins it onto ~ and .)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(AWS_PREFIX)}
    return ssh.env(base) | {"DS_ENV_FILE": str(env_file)}


def _deepspeed_command(hostfile: Path, ssh_port: int, extra: list[str], args: list[str]) -> list:
    return [
        DEEPSPEED, "--hostfile", str(hostfile), "--ssh_port", str(ssh_port), *extra,
        "--master_port", str(free_port()), "train/run_finetuning.py", *args,
    ]  # fmt: skip


def _preempt_after_checkpoint(
    command: list[str], env: dict[str, str], ssh: LoopbackSsh, output_dir: Path, log: Path
) -> str:
    """Runs `command` until a checkpoint is complete, then SIGKILLs the launcher and everything
    it started on both hosts, as losing the nodes does; returns the checkpoint's tag. (SIGKILL
    to the launcher alone would leave the ranks running under sshd.)"""
    latest = output_dir / "checkpoints" / "latest"
    with open(log, "w") as output:
        run = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, start_new_session=True,
            stdout=output, stderr=subprocess.STDOUT,
        )  # fmt: skip
    deadline = time.monotonic() + 300
    while not latest.exists():
        assert run.poll() is None, f"exited before a checkpoint:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"no checkpoint:\n{log.read_text()[-4000:]}"
        time.sleep(0.1)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    ssh.kill_all_but_sshd()
    return latest.read_text().strip()


def _host_prefixes(output: str) -> set[str]:
    """The hosts pdsh ran something on: it prefixes each line of theirs with `HOST: `."""
    return set(re.findall(r"^(127\.0\.0\.\d): ", output, re.M))


def test_deepspeed_hostfile_trains_from_s3_is_killed_and_resumes_on_one_host(
    loopback_ssh,
    prepared,
    s3_server,
    tmp_path,
):
    from preprocess.shard_format import ShardDataset
    from train.duration_bucket_sampler import DurationBucketSampler

    upload_prepared(prepared, "launchers")
    output = tmp_path / "run"
    options = training_options(prepared, output, "zero2_fp32.json", trace_batches=True)
    del options["max_steps"], options["eval_dir"]
    options |= {"num_train_epochs": 1, "max_batch_seconds": 6, "warmup_steps": 3, "save_steps": 2}
    options |= {"save_total_limit": 99}  # the checkpoint resumed from is read after the run
    options |= {"train_dir": "s3://launchers/train", "cache_dir": str(tmp_path / "cache")}
    args = [f"--{key}={value}" for key, value in options.items()]
    env = _launcher_env(loopback_ssh, _deepspeed_env_file(tmp_path / "deepspeed_env"))

    two_hosts = _hostfile(tmp_path / "hostfile", HOSTS)
    log = tmp_path / "two_hosts.log"
    command = _deepspeed_command(two_hosts, loopback_ssh.port, [], args)
    tag = _preempt_after_checkpoint(command, env, loopback_ssh, output, log)
    first = log.read_text()
    assert _host_prefixes(first) == set(HOSTS), first[-4000:]
    saved = json.loads((output / "checkpoints" / tag / "trainer_state.json").read_text())
    assert saved["world_size"] == 2 and saved["step"] < saved["total_steps"]  # cut mid-epoch
    traced = [len(batch_trace(output, rank)) for rank in (0, 1)]

    # The same command on one host. Without --force_multi, DeepSpeed 0.19.8 runs a one-host
    # hostfile on the launching machine, whatever host it names, without SSH and without the
    # file's variables (runner.main: multi-node needs more than one host).
    one_host = _hostfile(tmp_path / "hostfile-one", HOSTS[1:])
    command = _deepspeed_command(one_host, loopback_ssh.port, ["--force_multi"], args)
    result = subprocess.run(
        [*command, "--resume"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert _host_prefixes(result.stdout) == {HOSTS[1]}, result.stdout[-4000:]
    assert loopback_ssh.namespace_pids() == []  # the launcher waited for its ranks

    # Every utterance of the epoch trained once: before the checkpoint on two ranks, after it
    # on one, in the resumed sampler's re-plan of the rest (the global batch kept).
    train = ShardDataset(str(prepared["train"]))
    ids = np.array([train[index]["id"] for index in range(len(train))])
    checkpoint = output / "checkpoints" / tag
    state = torch.load(next(checkpoint.glob("*model_states.pt")), weights_only=False)["sampler"]
    layout = {"audio_lengths": train.audio_lengths, "sampling_rate": 16000, "seed": 42}
    resumed = DurationBucketSampler(
        **layout, max_batch_seconds=6, world_size=1, gradient_accumulation_steps=2
    )
    resumed.load_state_dict(state)
    replanned = resumed.plan_epoch(0)
    before = [
        i for rank in (0, 1) for line in batch_trace(output, rank)[: traced[rank]]
        if line["step"] <= saved["step"] for i in line["ids"]
    ]  # fmt: skip
    after_lines = batch_trace(output, 0)[traced[0] :]
    after = [i for line in after_lines for i in line["ids"]]
    assert {line["epoch"] for line in after_lines} == {0}
    assert len(before + after) == len(set(before + after))
    assert sorted(after) == sorted(i for row in replanned for b in row for i in ids[b])
    planned = DurationBucketSampler(**layout, max_batch_seconds=6, world_size=2).plan_epoch(0)
    everything = {i for row in planned for b in row for i in ids[b]}
    assert everything - set(before) - set(after) == set(ids[replanned.order]) - set(after)
    steps = train_steps(output)
    assert max(steps) == saved["step"] + len(replanned) // 2
    assert saved["total_steps"] - 1 <= max(steps) <= saved["total_steps"]


# --- ray up -> ray submit -> ray down, with preprocess/cluster-local.yaml ---------------------

RAY = shutil.which("ray", path=str(BIN)) or "ray"
SHIPPED_CONFIG = REPO_ROOT / "preprocess" / "cluster-local.yaml"
DECODE_TASK_PREFIX = "Write"  # Ray Data's name for the decode+write task


@dataclass(frozen=True)
class RayPorts:
    gcs: int
    dashboard: int
    client_server: int


def _loopback_config(shipped: dict, ssh: LoopbackSsh, ports: RayPorts, temp_dir: Path) -> dict:
    """The shipped config with this machine's addresses, key and ports. Two nodes on one machine
    also need a temp dir of their own (Ray's sockets), ports Ray would fix (the dashboard
    agent's, the workers') left to the OS, and one log monitor; one CPU each."""
    config = json.loads(json.dumps(shipped))
    config["provider"] |= {"head_ip": HOSTS[0], "worker_ips": [HOSTS[1]]}
    config["auth"] = {"ssh_user": "root", "ssh_private_key": str(ssh.bin_dir.parent / "client_key")}
    same_host = (
        f"--num-cpus=1 --object-store-memory={100 * 1024**2} --temp-dir={temp_dir} "
        "--dashboard-agent-listen-port=0 --min-worker-port=0 --max-worker-port=0 "
        "--disable-usage-stats"
    )
    head = f"{same_host} --dashboard-port={ports.dashboard} --ray-client-server-port="
    head += str(ports.client_server)

    def adapt(command: str, flags: str) -> str:
        command = command.replace("--port=6379", f"--port={ports.gcs}")
        command = command.replace(":6379", f":{ports.gcs}")
        return f"{command} {flags}" if "ray_session.sh start" in command else command

    # The worker registers as 127.0.0.2, the address the provider (and the autoscaler, which
    # matches nodes by address) knows it by: by default Ray takes the machine's address. The
    # head keeps that default, since Ray 2.60 replaces a --node-ip-address of 127.0.0.1 with
    # the machine's address anyway (services.resolve_ip_for_localhost).
    config["head_start_ray_commands"] = [adapt(c, head) for c in shipped["head_start_ray_commands"]]
    worker = f"{same_host} --include-log-monitor=false --node-ip-address={HOSTS[1]}"
    config["worker_start_ray_commands"] = [
        adapt(c, worker) for c in shipped["worker_start_ray_commands"]
    ]
    return config


def _node_environment(ssh: LoopbackSsh, venv: Path, ray_tmpdir: Path) -> None:
    """The nodes' own setup, as a machine's login environment would have it: a Python
    environment of their own first on PATH (the setup commands' `pip install -e` goes there,
    not into this machine's), Ray's scripts after it, pip offline (everything the install
    needs is in the environment already), and a /tmp of Ray's own (RAY_TMPDIR): there the
    autoscaler keeps the local provider's cluster state, and `ray stop` deletes the
    ray_current_cluster file, which in /tmp/ray would be every other Ray user's on this
    machine."""
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    # venv seeds an old setuptools of its own, which would hide this machine's newer one.
    subprocess.run([venv / "bin" / "python", "-m", "pip", "uninstall", "-q", "-y", "setuptools"],
                   check=True)  # fmt: skip
    with open(ssh.home / ".bashrc", "a") as bashrc:
        bashrc.write(f'export PATH="{venv}/bin:$PATH:{BIN}"\n')
        # pip reads PIP_NO_BUILD_ISOLATION=0 as --no-build-isolation.
        bashrc.write("export PIP_NO_INDEX=1 PIP_NO_BUILD_ISOLATION=0\n")
        bashrc.write(f"export RAY_TMPDIR={ray_tmpdir}\n")


def _project_copy(directory: Path) -> Path:
    """The checkout `ray up` runs from, with a .deepspeed_env holding the S3 settings."""
    shutil.copytree(
        REPO_ROOT, directory,
        ignore=shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", ".*_cache"),
    )  # fmt: skip
    _deepspeed_env_file(directory / ".deepspeed_env")
    return directory


def _upload_corpus(corpus: Path, bucket: str) -> int:
    """train.tsv and its clips to s3://BUCKET/corpus/, plus a row whose clip is missing;
    returns the rows of the manifest (the missing one included)."""
    import boto3

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=bucket)
    lines = (corpus / "train.tsv").read_text(encoding="utf-8").splitlines()
    header, first = lines[0].split("\t"), lines[1].split("\t")
    first[header.index("path")] = "not_there.mp3"
    manifest = "\n".join([*lines, "\t".join(first)]) + "\n"
    s3.put_object(Bucket=bucket, Key="corpus/train.tsv", Body=manifest.encode())
    for clip in (corpus / "clips").iterdir():
        s3.upload_file(str(clip), bucket, f"corpus/clips/{clip.name}")
    return len(lines)


def _ray_list(dashboard: str, env: dict[str, str], kind: str) -> list[dict]:
    command = [RAY, "list", kind, "--address", dashboard, "--format", "json", "--detail"]
    result = subprocess.run(
        [*command, "--limit", "1000"], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def _cli(command: list[str], env: dict[str, str], cwd: Path, log: Path) -> str:
    result = subprocess.run(
        command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=400,
    )  # fmt: skip
    with open(log, "a") as file:
        file.write(f"$ {' '.join(command)}\n{result.stdout}\n")
    assert result.returncode == 0, result.stdout[-5000:]
    return result.stdout


def test_ray_up_submit_down_on_premise(loopback_ssh, german_corpus, s3_server, tmp_path):
    import boto3
    import yaml

    rows = _upload_corpus(german_corpus, "raycluster")
    ssh = loopback_ssh
    temp_dir = Path(f"/tmp/rl{free_port()}")  # short: Ray's socket paths have a length limit
    _node_environment(ssh, tmp_path / "venv", Path(f"{temp_dir}-n"))
    project = _project_copy(tmp_path / "project")
    client_home = tmp_path / "client"
    (client_home / ".ray").mkdir(parents=True)
    (client_home / ".ray" / "auth_token").write_text(os.urandom(32).hex())
    ports = RayPorts(free_port(), free_port(), free_port())
    config_path = tmp_path / "cluster.yaml"
    shipped = yaml.safe_load(SHIPPED_CONFIG.read_text())
    config = _loopback_config(shipped, ssh, ports, temp_dir)
    config_path.write_text(yaml.safe_dump(config))
    env = ssh.env({k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_"))})
    # The launching machine's temp dirs are its own too: the local provider's state there is
    # what `ray up` records, as on a laptop, apart from what the head's autoscaler records;
    # and Ray's cached configs (TMPDIR) stay out of /tmp.
    client_tmp = Path(f"{temp_dir}-c")
    client_tmp.mkdir()  # TMPDIR must exist, or Python's tempfile falls back to /tmp
    env |= {"HOME": str(client_home), "RAY_TMPDIR": str(client_tmp), "TMPDIR": str(client_tmp)}
    env |= {"RAY_USAGE_STATS_ENABLED": "0"}
    client = env | {"RAY_AUTH_MODE": "token"}
    dashboard = f"http://127.0.0.1:{ports.dashboard}"
    log = tmp_path / "ray.log"
    # Another user's Ray on this machine, outside the test's namespace: nothing may touch it.
    outside = _start_sentinel(Path(f"{temp_dir}-o"), env, [RAY], log)
    outside_session = _session(min(outside))  # what it starts later joins that session too
    # Another Ray on the head "machine", started before the cluster: the start commands must
    # leave it alone (a bare `ray stop` in them would not).
    inside = _start_sentinel(Path(f"{temp_dir}-s"), env, ["ssh", HOSTS[0], RAY], log)
    try:
        _cli([RAY, "up", "-y", "--no-config-cache", str(config_path)], env, project, log)
        deadline = time.monotonic() + 150
        while len(nodes := [n for n in _ray_list(dashboard, client, "nodes")
                            if n["state"] == "ALIVE"]) < 2:  # fmt: skip
            assert time.monotonic() < deadline, f"nodes: {nodes}\n{log.read_text()[-5000:]}"
            time.sleep(2)
        output = _cli(
            [RAY, "submit", str(config_path), "preprocess/prepare_dataset.py", "--",
             "--ray_address", f"127.0.0.1:{ports.gcs}",
             "--manifest", "s3://raycluster/corpus/train.tsv",
             "--output_dir", "s3://raycluster/prepared/train", "--rows_per_task", "8"],
            env, project, log,
        )  # fmt: skip
        assert f"{rows - 1} accepted, 1 rejected (missing 1)" in output, output[-3000:]
        dataset = boto3.client("s3").get_object(
            Bucket="raycluster", Key="prepared/train/dataset.json"
        )
        counts = json.loads(dataset["Body"].read())["counts"]
        assert counts["input_rows"] == rows
        assert counts["accepted"] + counts["rejected"] == counts["input_rows"]
        assert counts["rejected_by_reason"] == {"missing": 1}
        deadline = time.monotonic() + 30  # task events arrive about once a second
        while True:
            tasks = _ray_list(dashboard, client, "tasks")
            decode = [t for t in tasks if t["name"].startswith(DECODE_TASK_PREFIX)]
            if decode and all(t["state"] == "FINISHED" and t["node_id"] for t in decode):
                break
            assert time.monotonic() < deadline, tasks
            time.sleep(1)
        assert {t["node_id"] for t in decode} == {n["node_id"] for n in nodes}
        assert inside <= set(ssh.namespace_pids()), "the start commands stopped it"
        _restart_stops_only_its_own(ssh, config, temp_dir, inside, env, project, log)
    finally:
        try:
            _cli([RAY, "down", "-y", str(config_path)], env, project, log)
            # `ray down` (Ray 2.60, teardown_cluster) runs a bare `ray stop` on the head: every
            # Ray of that machine, here the namespace, the sentinel inside included, and the
            # worker, which a machine of its own would stop when it loses the head.
            deadline = time.monotonic() + 60
            while left := [p for p in ssh.namespace_pids() if "ray" in _cmdline(p)]:
                assert time.monotonic() < deadline, [_cmdline(p)[:300] for p in left]
                time.sleep(0.5)
            assert all(_alive(p) for p in outside), "a Ray outside the cluster was stopped"
        finally:
            for pid in _pids():
                if _session(pid) == outside_session:
                    _kill(pid)
            logs = temp_dir / "session_latest" / "logs"
            for monitor in logs.glob("monitor*") if logs.is_dir() else []:
                shutil.copy(monitor, tmp_path)  # the autoscaler's, which starts the worker
            for suffix in ("", "-n", "-c", "-o", "-s"):
                shutil.rmtree(f"{temp_dir}{suffix}", ignore_errors=True)


def _start_sentinel(temp_dir: Path, env: dict[str, str], ray: list[str], log: Path) -> set[int]:
    """A small Ray head (`ray` runs `ray`, maybe over ssh) on ports of its own; returns its
    processes, all in the session of the `ray start`, which Ray's daemons stay in."""
    command = [*ray, "start", "--head", f"--port={free_port()}", "--num-cpus=0"]
    command += ["--include-dashboard=false", f"--dashboard-port={free_port()}"]
    command += [f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    command += [f"--ray-client-server-port={free_port()}", "--dashboard-agent-listen-port=0"]
    with open(log, "a") as output:
        output.write(f"$ {' '.join(command)}\n")
        output.flush()
        start = subprocess.Popen(
            command, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
        assert start.wait(timeout=120) == 0, log.read_text()[-3000:]
    gcs = [p for p in _pids() if _comm(p) == "gcs_server" and f"={temp_dir}/" in _cmdline(p)]
    assert len(gcs) == 1, gcs
    pids = _session_pids(gcs[0])
    assert {_comm(p) for p in pids} >= {"gcs_server", "raylet"}
    return pids


def _restart_stops_only_its_own(
    ssh: LoopbackSsh, config: dict, temp_dir: Path, inside: set[int], env, project, log
) -> None:
    """What `ray up` on a running cluster runs first on each node, the stop command, run as Ray
    runs it: it stops that node's Ray, and only that, though all share one machine here.
    (`ray up` itself cannot restart a head here: Ray 2.60's `ray start --head` refuses while a
    raylet of this machine names its GCS address, and this machine runs the worker's.)"""
    worker = _session_pids(_raylet(ssh, HOSTS[1]))
    head = _session_pids(_head_gcs(ssh, temp_dir))
    for host, commands, stopped, kept in (
        (HOSTS[1], config["worker_start_ray_commands"], worker, head | inside),
        (HOSTS[0], config["head_start_ray_commands"], head, inside),
    ):
        command = f"bash --login -c -i {shlex.quote('source ~/.bashrc; ' + commands[0])}"
        _cli(["ssh", host, command], env, project, log)
        # Killed, a process lingers a moment as it exits, until sshd (pid 1) reaps it.
        deadline = time.monotonic() + 10
        while left := stopped & set(ssh.namespace_pids()):
            assert time.monotonic() < deadline, f"{host}: {[_cmdline(p)[:200] for p in left]}"
            time.sleep(0.2)
        assert kept <= set(ssh.namespace_pids()), f"{host}: another Ray was stopped"


def _raylet(ssh: LoopbackSsh, node_ip: str) -> int:
    (pid,) = [
        p for p in ssh.namespace_pids()
        if _comm(p) == "raylet" and f"--node_ip_address={node_ip} " in _cmdline(p)
    ]  # fmt: skip
    return pid


def _head_gcs(ssh: LoopbackSsh, temp_dir: Path) -> int:
    """The cluster's GCS server (the sentinel's has a temp dir of its own)."""
    (pid,) = [
        p for p in ssh.namespace_pids()
        if _comm(p) == "gcs_server" and f"--log_dir={temp_dir}/" in _cmdline(p)
    ]  # fmt: skip
    return pid


def _pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def _session_pids(member: int) -> set[int]:
    """The live processes of `member`'s session."""
    session = _session(member)
    return {p for p in _pids() if _session(p) == session}


def _session(pid: int) -> str:
    """The session id in /proc/PID/stat (the fourth field after the command name)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[3]
    except (OSError, IndexError):
        return ""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""
