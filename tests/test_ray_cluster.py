"""Preprocessing on a real two-node Ray cluster (a head and a joined node, one machine), with token
authentication on, through --ray_address, RAY_ADDRESS and the jobs API; cluster.yaml checked
against Ray's cluster-config schema."""

from __future__ import annotations

import csv
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from espeak_audio import REPO_ROOT

from preprocess.shard_format import ShardDataset
from train.free_port import free_port

RAY = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
DECODE_TASK_PREFIX = "Write"  # Ray Data's name for the decode+write task


@dataclass(frozen=True)
class RayCluster:
    """A running head and worker node, and what a client needs to reach them."""

    gcs_address: str  # host:port, for ray.init / RAY_ADDRESS / --ray_address
    dashboard_url: str  # http://host:port, for ray job submit and the state API
    env: dict[str, str]  # the auth settings every node and client must share
    head_node_id: str
    worker_node_id: str


def _run(
    command: list[str], env: dict[str, str], **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, **kwargs)


def _ray_list(cluster: RayCluster, kind: str, *filters: str) -> list[dict[str, Any]]:
    """`ray list KIND` through the state API, as a client of the cluster would call it."""
    command = [RAY, "list", kind, "--address", cluster.dashboard_url, "--format", "json"]
    command += ["--detail", "--limit", "1000"] + [f"--filter={f}" for f in filters]
    result = _run(command, cluster.env)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def _session_members(session_ids: set[int]) -> list[int]:
    """Live processes in these sessions: everything a `ray start` in its own session started,
    workers included, though Ray gives some of them process groups of their own."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        state, _ppid, _pgrp, session = stat.rsplit(")", 1)[1].split()[:4]
        if int(session) in session_ids and state != "Z":
            members.append(int(entry))
    return members


def _stop(processes: list[subprocess.Popen]) -> list[int]:
    """Stop the nodes: SIGTERM lets each `ray start --block` stop its own node (worker first), then
    SIGKILL whatever is left in their sessions. Not `ray stop`: it kills every Ray on the machine,
    other tests' too. Returns what could not be killed."""
    for process in reversed(processes):
        process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    for process in reversed(processes):
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    sessions = {process.pid for process in processes}
    left = _session_members(sessions)
    for _ in range(50):
        if not left:
            break
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
        left = _session_members(sessions)
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait()
    return left


def _start_node(
    arguments: list[str], log: Path, env: dict[str, str], started: list[subprocess.Popen]
) -> None:
    """`ray start --block` in a session of its own, so that the node's processes can be found;
    added to `started` at once, so that a node that fails to come up is stopped too."""
    with open(log, "w") as output:
        process = subprocess.Popen(
            [RAY, "start", "--block", *arguments], env=env, cwd=log.parent,
            stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    started.append(process)
    deadline = time.monotonic() + 120
    while "Ray runtime started" not in log.read_text():
        assert process.poll() is None, f"ray start exited:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"ray start timed out:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[RayCluster]:
    """A head and a second node joining it, one CPU each, token authentication on."""
    # Ray's own list of what its dashboard (the jobs and state APIs) needs: ray[default].
    pytest.importorskip("ray.dashboard.optional_deps", reason="needs ray[default]: .[cluster]")
    # Short and private: Ray's unix sockets live under it (108-byte path limit), and with its
    # own temp dir this cluster's address file never redirects another test's ray.init().
    root = Path(tempfile.mkdtemp(prefix="raycl-", dir="/tmp" if os.path.isdir("/tmp") else None))
    token = root / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    # Pinned, not inherited: `ray start --head` turns auth on by itself when ~/.ray/auth_token
    # exists (any local ray.init() writes one), a node or client joining an explicit address
    # never does, and RAY_AUTH_TOKEN would win over the token file.
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    env |= {"RAY_USAGE_STATS_ENABLED": "0"}
    gcs_port, dashboard_port = free_port(), free_port()
    # Ports Ray fixes by default (6379, 8265, 10001, 52365, workers' 10002-19999) are chosen here
    # or left to the OS, so that two nodes share one machine and neither meets another Ray on it.
    common = [
        "--num-cpus=1", f"--object-store-memory={100 * 1024**2}", f"--temp-dir={root}",
        "--dashboard-agent-listen-port=0", "--min-worker-port=0", "--max-worker-port=0",
        "--disable-usage-stats",
    ]  # fmt: skip
    processes: list[subprocess.Popen] = []
    try:
        head = [
            "--head", f"--port={gcs_port}", "--include-dashboard=true",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
            f"--ray-client-server-port={free_port()}",
        ]  # fmt: skip
        _start_node(head + common, root / "head.log", env, processes)
        # One log monitor per machine: both nodes write to the same session directory.
        worker = [f"--address=127.0.0.1:{gcs_port}", "--include-log-monitor=false"]
        _start_node(worker + common, root / "worker.log", env, processes)
        cluster = RayCluster(
            f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dashboard_port}", env, "", ""
        )
        deadline = time.monotonic() + 60
        while len(nodes := _ray_list(cluster, "nodes", "state=ALIVE")) < 2:
            assert time.monotonic() < deadline, f"nodes alive: {nodes}"
            time.sleep(1)
        head_id = next(n["node_id"] for n in nodes if n["is_head_node"])
        worker_id = next(n["node_id"] for n in nodes if not n["is_head_node"])
        yield replace(cluster, head_node_id=head_id, worker_node_id=worker_id)
    finally:
        left = _stop(processes)
        shutil.rmtree(root, ignore_errors=True)
        assert not left, f"cluster processes survived SIGKILL: {left}"


def _manifest_with_a_missing_clip(corpus: Path, directory: Path) -> tuple[Path, int]:
    """The corpus's train.tsv plus one row whose clip does not exist; returns it and its rows."""
    with open(corpus / "train.tsv", encoding="utf-8", newline="") as file:
        rows = list(csv.DictReader(file, delimiter="\t", quoting=csv.QUOTE_NONE))
    rows.append({**rows[0], "path": "not_there.mp3"})
    (directory / "clips").symlink_to(corpus / "clips")
    manifest = directory / "train.tsv"
    with open(manifest, "w", encoding="utf-8", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    return manifest, len(rows)


def _prepare_arguments(manifest: Path, output: Path) -> list[str]:
    # Small tasks, so the 18 rows make three decode+write tasks for the two one-CPU nodes.
    return [
        "-m", "preprocess.prepare_dataset", "--manifest", str(manifest),
        "--output_dir", str(output), "--rows_per_task", "8",
    ]  # fmt: skip


def _check_dataset(output: Path, manifest_rows: int) -> None:
    """Every manifest row is accounted for, once: accepted rows are in the shards."""
    counts = json.loads((output / "dataset.json").read_text())["counts"]
    assert counts["input_rows"] == manifest_rows
    assert counts["accepted"] + counts["rejected"] == counts["input_rows"]
    assert counts["rejected_by_reason"] == {"missing": 1}
    dataset = ShardDataset(str(output))
    assert len(dataset) == counts["accepted"] == manifest_rows - 1
    assert len({dataset[i]["id"] for i in range(len(dataset))}) == len(dataset)


def _decode_task_nodes(cluster: RayCluster, output: Path) -> set[str]:
    """Nodes that ran the decode tasks of the one job whose command wrote to `output`."""
    jobs = [j for j in _ray_list(cluster, "jobs") if str(output) in (j["entrypoint"] or "")]
    assert len(jobs) == 1, jobs
    assert jobs[0]["status"] == "SUCCEEDED", jobs[0]
    # Workers report task events about once a second; the last may arrive after the job ends.
    deadline = time.monotonic() + 30
    while True:
        tasks = _ray_list(cluster, "tasks", f"job_id={jobs[0]['job_id']}")
        decode = [t for t in tasks if t["name"].startswith(DECODE_TASK_PREFIX)]
        if decode and all(t["state"] == "FINISHED" and t["node_id"] for t in decode):
            return {t["node_id"] for t in decode}
        assert time.monotonic() < deadline, tasks
        time.sleep(1)


def test_prepare_dataset_joins_the_cluster_by_ray_address(ray_cluster, german_corpus, tmp_path):
    manifest, rows = _manifest_with_a_missing_clip(german_corpus, tmp_path)
    output = tmp_path / "out"
    command = [sys.executable, *_prepare_arguments(manifest, output)]
    command += ["--ray_address", ray_cluster.gcs_address]
    # A process of its own: this pytest process may hold a local Ray (ray_local) already.
    result = _run(command, ray_cluster.env, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{rows - 1} accepted, 1 rejected (missing 1)" in result.stdout

    _check_dataset(output, rows)
    nodes = _decode_task_nodes(ray_cluster, output)
    assert nodes == {ray_cluster.head_node_id, ray_cluster.worker_node_id}


def test_ray_job_submit_runs_the_installed_package(ray_cluster, german_corpus, tmp_path):
    """`ray job submit` without --working-dir: the project is installed on the nodes. The job's
    driver joins the cluster through the RAY_ADDRESS that Ray sets for it."""
    manifest, rows = _manifest_with_a_missing_clip(german_corpus, tmp_path)
    output = tmp_path / "out"
    submit = [RAY, "job", "submit", "--address", ray_cluster.dashboard_url, "--"]
    result = _run([*submit, sys.executable, *_prepare_arguments(manifest, output)],
                  ray_cluster.env, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert f"{rows - 1} accepted, 1 rejected (missing 1)" in result.stdout

    _check_dataset(output, rows)
    nodes = _decode_task_nodes(ray_cluster, output)
    assert nodes == {ray_cluster.head_node_id, ray_cluster.worker_node_id}


@pytest.mark.parametrize("mistake", ["another token", "RAY_AUTH_MODE unset"])
def test_a_client_without_the_token_and_mode_is_refused(ray_cluster, tmp_path, mistake):
    """The right token alone is not enough: a client of an explicit address sends it only with
    RAY_AUTH_MODE=token."""
    env = dict(ray_cluster.env)
    if mistake == "another token":
        (tmp_path / "token").write_text(secrets.token_hex(32))
        env["RAY_AUTH_TOKEN_PATH"] = str(tmp_path / "token")
    else:
        del env["RAY_AUTH_MODE"]
    result = _run([RAY, "job", "list", "--address", ray_cluster.dashboard_url], env)
    assert result.returncode != 0
    assert "AuthenticationError" in result.stderr, result.stderr[-3000:]


def test_cluster_yaml_matches_rays_schema():
    """Ray's own validate_config() wants a config already filled with defaults; the schema
    itself checks what users write (and rejects unknown top-level keys)."""
    import ray

    schema_path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    config = yaml.safe_load((REPO_ROOT / "preprocess" / "cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    misspelled = {**config, "setup_command": config["setup_commands"]}
    with pytest.raises(jsonschema.ValidationError, match="setup_command"):
        jsonschema.validate(misspelled, schema)
