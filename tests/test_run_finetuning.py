"""Training through the real deepspeed launcher: 2 CPU ranks over gloo, real ZeRO-2 and ZeRO-3."""

from __future__ import annotations

import http.client
import http.server
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from espeak_audio import REPO_ROOT

from argument_classes import ManifestArguments, PreprocessArguments
from preprocess.prepare_dataset import prepare
from train.free_port import free_port

LAUNCHER = [sys.executable, "-m", "deepspeed.launcher.runner"]
SCRIPT = str(REPO_ROOT / "train" / "run_finetuning.py")
# bf16 keeps 8 bits of mantissa; measured on the tiny model after 2 steps: 0.009 (ZeRO-2 and 3).
# A wrong or rounded weight in the export moves logits by far more.
BF16_LOGITS_TOLERANCE = 0.05


def training_options(prepared: dict[str, Path], output_dir: Path, config: str, **extra) -> dict:
    return {
        "deepspeed": str(REPO_ROOT / "ds_configs" / config),
        "train_dir": str(prepared["train"]),
        "eval_dir": str(prepared["dev"]),
        "model_name_or_path": "tiny",
        "output_dir": str(output_dir),
        "max_steps": 4,
        "eval_steps": 2,
        "save_steps": 2,
        "logging_steps": 1,
        "warmup_steps": 1,
        "learning_rate": 1e-3,
        "max_batch_seconds": 12,
        "dataloader_num_workers": 1,
        # SpecAugment draws from numpy's global RNG, which differs per process: off, so runs
        # compare exactly.
        "mask_time_prob": 0.0,
        **extra,
    }


def training_args(prepared: dict[str, Path], output_dir: Path, config: str, **extra) -> list[str]:
    options = training_options(prepared, output_dir, config, **extra)
    return [f"--{key}={value}" for key, value in options.items()]


def launcher(num_ranks: int = 2) -> list[str]:
    return [*LAUNCHER, "--num_gpus", str(num_ranks), "--master_port", str(free_port())]


def launch(args: list[str], num_ranks: int = 2, **popen) -> subprocess.CompletedProcess:
    command = [*launcher(num_ranks), SCRIPT, *args]
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, **popen)


def records(output_dir: Path) -> list[dict]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def train_steps(output_dir: Path) -> dict[int, dict]:
    """The last logged record of every step (a resumed run logs some steps twice)."""
    return {r["step"]: r for r in records(output_dir) if "loss" in r}


def rank_weight_digests(output_dir: Path) -> list[str]:
    """Each rank's sha256 of its own module weights, logged once at the end of a run."""
    key = "weights_sha256_by_rank"
    (digests,) = [record[key] for record in records(output_dir) if key in record]
    return digests


def batch_trace(output_dir: Path, rank: int) -> list[dict]:
    lines = (output_dir / "batch_trace" / f"rank{rank}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def assert_succeeded(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.fixture(scope="session")
def zero2_run(prepared, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("zero2")
    assert_succeeded(launch(training_args(prepared, output, "zero2_fp32.json", layerdrop=0.3)))
    return output


def test_zero2_two_ranks_with_layerdrop_logs_evaluates_and_exports(zero2_run):
    steps = train_steps(zero2_run)
    assert sorted(steps) == [1, 2, 3, 4]
    for record in steps.values():
        assert math.isfinite(record["loss"]) and record["loss"] > 0
        assert 0 <= record["padding_fraction"] < 0.5
        assert record["audio_seconds_per_second"] > 0 and record["nonfinite_losses"] == 0
        assert record["skipped_steps"] == 0
    evaluations = [r for r in records(zero2_run) if "eval_cer" in r]
    assert [r["step"] for r in evaluations] == [2, 4]
    startup = json.loads((zero2_run / "startup.json").read_text())
    phases = ["imports", "distributed_init", "dataset_open_and_batch_plan", "model_build"]
    phases += ["deepspeed_initialize", "first_batch", "first_optimizer_step"]
    assert sorted(startup) == sorted([*phases, "total"])
    assert all(startup[p] > 0 for p in phases)
    assert startup["total"] == pytest.approx(sum(startup[p] for p in phases))
    assert any(p.name.startswith("events") for p in (zero2_run / "tensorboard").iterdir())
    digests = rank_weight_digests(zero2_run)
    assert len(digests) == 2 and len(set(digests)) == 1  # ranks agree on the weights
    checkpoints = sorted(p.name for p in (zero2_run / "checkpoints").iterdir() if p.is_dir())
    assert checkpoints == ["step2", "step4"]


def test_evaluation_covers_every_dev_utterance(zero2_run, prepared):
    from preprocess.shard_format import ShardDataset

    evaluations = [r for r in records(zero2_run) if "eval_cer" in r]
    assert all(r["eval_utterances"] == len(ShardDataset(str(prepared["dev"]))) for r in evaluations)


def test_export_transcribes_as_the_engine_decoded(zero2_run, prepared):
    """The exported model, fed by its own saved processor, computes the logits of the weights
    the run ended with, fed by the trainer's collator: those are rebuilt here from the last
    checkpoint's fp32 masters. Logits, not transcripts: a model this briefly trained is in
    CTC's all-blank stage, where every transcript is empty and any two would match. The
    pipeline and a greedy decode of those logits give the transcript the trainer's own
    evaluation decoded for the same clip (the shortest dev utterance, rank 0's first)."""
    import transformers
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import Wav2Vec2ForCTC, Wav2Vec2Processor

    from preprocess.shard_format import ShardDataset
    from train.ctc_collator import CTCCollator

    dev = ShardDataset(str(prepared["dev"]))
    item = dev[int(np.argsort(dev.audio_lengths, kind="stable")[0])]
    vocab = ShardDataset(str(prepared["train"])).vocab  # the model's, which dev's is not
    model_dir = str(zero2_run / "model")
    processor = Wav2Vec2Processor.from_pretrained(model_dir)
    features = processor(np.array(item["audio"]), sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        exported = Wav2Vec2ForCTC.from_pretrained(model_dir)(**features).logits[0]

    trained = get_fp32_state_dict_from_zero_checkpoint(str(zero2_run / "checkpoints"), "step4")
    batch = CTCCollator(vocab=vocab, do_normalize=True, return_attention_mask=True)([item])
    offline = tiny_model_logits(trained, batch, vocab)
    untrained = tiny_model_logits(None, batch, vocab)
    tolerance = 1e-4  # measured: 4e-7 (the collator's normalization against the extractor's)
    # Tight enough that any wrong weight or feature setting shows: the untrained model's logits
    # stand for one, and are orders of magnitude further off.
    assert float((exported - offline).abs().max()) <= tolerance
    assert float((exported - untrained).abs().max()) > 100 * tolerance
    token_ids = exported.argmax(-1)
    assert torch.equal(token_ids, offline.argmax(-1))

    recognizer = transformers.pipeline("automatic-speech-recognition", model=model_dir)
    transcript = recognizer(np.array(item["audio"]))["text"]
    last_evaluation = [r for r in records(zero2_run) if "eval_cer" in r][-1]
    assert transcript == last_evaluation["eval_example"] == processor.decode(token_ids)
    # The trainer reloaded its export and compared logits with the engine's on two utterances.
    (check,) = [r for r in records(zero2_run) if "export_logits_max_abs_diff" in r]
    assert check["engine_dtype"] == "torch.float32"
    assert check["export_logits_max_abs_diff"] <= 1e-5


def test_zero3_matches_zero2_and_exports_gathered_weights(zero2_run, prepared, tmp_path):
    from safetensors.numpy import load_file
    from transformers import Wav2Vec2ForCTC

    args = training_args(prepared, tmp_path, "zero3_fp32.json", layerdrop=0.3)
    assert_succeeded(launch(args))
    zero3, zero2 = train_steps(tmp_path), train_steps(zero2_run)
    # Same seed, same batches, same synchronized layerdrop: ZeRO-3 computes the same losses,
    # up to the summation order of partitioned updates, which drifts by a fraction of a percent.
    assert zero3[1]["loss"] == zero2[1]["loss"]
    for step in (1, 2, 3, 4):
        assert zero3[step]["batch_checksum"] == zero2[step]["batch_checksum"]
        assert zero3[step]["loss"] == pytest.approx(zero2[step]["loss"], rel=1e-2)

    exported = load_file(str(tmp_path / "model" / "model.safetensors"))
    reference = Wav2Vec2ForCTC.from_pretrained(str(zero2_run / "model")).state_dict()
    assert set(exported) == set(reference)
    for name, tensor in exported.items():
        assert tensor.shape == tuple(reference[name].shape), name
    np.testing.assert_allclose(
        exported["lm_head.weight"], reference["lm_head.weight"].numpy(), rtol=0, atol=1e-3
    )


def test_resume_after_kill_draws_what_the_uninterrupted_run_drew(prepared, tmp_path):
    """Killed after a checkpoint and resumed, a run with dropout, SpecAugment and layerdrop
    trains the same batches with the same random draws: its losses match to float precision,
    which only restoring each rank's generators gives."""
    random_parts = {"layerdrop": 0.3, "mask_time_prob": 0.3, "hidden_dropout": 0.1}
    random_parts |= {"attention_dropout": 0.1, "max_steps": 6}
    args = training_args(prepared, tmp_path, "zero2_fp32.json", **random_parts)
    reference_dir = tmp_path / "uninterrupted"
    assert_succeeded(
        launch(training_args(prepared, reference_dir, "zero2_fp32.json", **random_parts))
    )

    tag = preempt_after_checkpoint([*launcher(), SCRIPT, *args], tmp_path)
    assert tag != "step6"
    assert_succeeded(launch([*args, "--resume=True"]))
    resumed, reference = train_steps(tmp_path), train_steps(reference_dir)
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        assert resumed[step]["batch_checksum"] == reference[step]["batch_checksum"], step
        assert resumed[step]["loss"] == pytest.approx(reference[step]["loss"], rel=1e-6), step


def run_two_nodes(
    args_for_node: list[list[str]], tmp_path: Path, environment: dict[str, str] | None = None
) -> list[tuple[int, str]]:
    """Two deepspeed launchers on loopback, one rank each, as two nodes of a hostfile; each
    node's exit code and output."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    port = free_port()
    nodes = [
        subprocess.Popen(
            [
                *LAUNCHER, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(rank),
                "--master_addr", "127.0.0.1", "--master_port", str(port), SCRIPT, *args,
            ],
            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=os.environ | (environment or {}),
        )
        for rank, args in enumerate(args_for_node)
    ]  # fmt: skip
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    return [(node.returncode, output) for node, output in zip(nodes, outputs, strict=True)]


def launch_two_nodes(args_for_node: list[list[str]], tmp_path: Path) -> list[str]:
    """`run_two_nodes`, both of which must succeed; their outputs."""
    results = run_two_nodes(args_for_node, tmp_path)
    assert [code for code, _ in results] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    return [output for _, output in results]


def test_two_nodes_on_loopback(prepared, tmp_path):
    args = training_args(
        prepared, tmp_path / "run", "zero2_fp32.json", max_steps=2, trace_batches=True
    )
    launch_two_nodes([args, args], tmp_path)
    assert sorted(train_steps(tmp_path / "run")) == [1, 2]
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()
    # Each node trained its own batches: the same steps, disjoint utterances.
    traces = [batch_trace(tmp_path / "run", rank) for rank in (0, 1)]
    assert [t["step"] for t in traces[0]] == [t["step"] for t in traces[1]] == [1, 2]
    for mine, theirs in zip(*traces, strict=True):
        assert mine["ids"] and not set(mine["ids"]) & set(theirs["ids"])
    # ...and ended with the same weights.
    digests = rank_weight_digests(tmp_path / "run")
    assert len(digests) == 2 and digests[0] == digests[1]


def cache_reports(output: str) -> list[tuple[int, int]]:
    """(files downloaded, files kept) from each `cache HOST: ...` line a node printed."""
    found = re.findall(
        r"^cache .*: downloaded (\d+) files \(\d+ bytes\), kept (\d+)$", output, re.M
    )
    return [(int(downloaded), int(kept)) for downloaded, kept in found]


def upload_prepared(prepared: dict[str, Path], bucket: str) -> None:
    """The train and dev datasets to s3://BUCKET/train and s3://BUCKET/dev."""
    import boto3

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=bucket)
    for split in ("train", "dev"):
        for path in prepared[split].rglob("*"):
            if path.is_file():
                s3.upload_file(str(path), bucket, f"{split}/{path.relative_to(prepared[split])}")


def test_two_nodes_train_from_s3_through_node_local_caches(prepared, s3_server, tmp_path):
    upload_prepared(prepared, "training")
    shards = len(json.loads((prepared["train"] / "dataset.json").read_text())["shards"])

    def node_args(run: str, node: str) -> list[str]:
        options = training_options(prepared, tmp_path / run, "zero2_fp32.json", max_steps=2)
        options |= {
            "train_dir": "s3://training/train",
            "eval_dir": "s3://training/dev",
            "cache_dir": str(tmp_path / f"cache-{node}"),  # nothing shared between the nodes
        }
        return [f"--{key}={value}" for key, value in options.items()]

    cold = launch_two_nodes([node_args("cold", "a"), node_args("cold", "b")], tmp_path)
    for output in cold:
        # Train and dev, each downloaded whole (shards, length index, vocab, rejects) once.
        (train, train_kept), (dev, dev_kept) = cache_reports(output)
        assert train == shards + 3 and dev >= 4 and train_kept == dev_kept == 0
    assert sorted(train_steps(tmp_path / "cold")) == [1, 2]
    assert [r for r in records(tmp_path / "cold") if "eval_cer" in r]

    warm = launch_two_nodes([node_args("warm", "a"), node_args("warm", "b")], tmp_path)
    for output in warm:
        assert [downloaded for downloaded, _ in cache_reports(output)] == [0, 0]
    # The same data, so the same first batch and loss as the cold run.
    assert (
        train_steps(tmp_path / "warm")[1]["batch_checksum"]
        == train_steps(tmp_path / "cold")[1]["batch_checksum"]
    )


class ThrottledS3(http.server.BaseHTTPRequestHandler):
    """Forwards S3 requests to the moto server, but sends the first shard it is asked for
    slowly: a few bytes at a time over `server.stall_seconds`, as a slow link does (a stalled
    response would only be retried by the client)."""

    protocol_version = "HTTP/1.1"

    def forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        moto_port = int(os.environ["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
        upstream = http.client.HTTPConnection("127.0.0.1", moto_port)
        upstream.request(self.command, self.path, body, dict(self.headers))
        response = upstream.getresponse()
        data = response.read()
        self.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in ("transfer-encoding", "connection"):
                self.send_header(key, value)
        self.end_headers()
        slow = self.command == "GET" and "/shards/" in self.path and not self.server.throttled
        if not slow:
            self.wfile.write(data)
            return
        self.server.throttled = self.path
        pieces = 100
        for index in range(pieces):
            self.wfile.write(data[index * len(data) // pieces : (index + 1) * len(data) // pieces])
            self.wfile.flush()
            time.sleep(self.server.stall_seconds / pieces)

    do_GET = do_HEAD = do_PUT = do_POST = forward

    def log_message(self, *args: object) -> None:
        pass


def test_a_download_longer_than_the_collective_timeout_completes(prepared, s3_server, tmp_path):
    """Local rank 0 fills the node's cache for 65 s while rank 1 waits, under a one-minute
    collective timeout: the wait is on a group made for it, so the run trains."""
    upload_prepared(prepared, "slow")
    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ThrottledS3)
    proxy.stall_seconds, proxy.throttled = 65, None
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    options = training_options(prepared, tmp_path / "run", "zero2_fp32.json", max_steps=1)
    options |= {"train_dir": "s3://slow/train", "cache_dir": str(tmp_path / "cache")}
    del options["eval_dir"]
    environment = os.environ | {
        "DEEPSPEED_TIMEOUT": "1",  # minutes, read when DeepSpeed is imported
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.server_address[1]}",
    }
    started = time.monotonic()
    result = launch([f"--{key}={value}" for key, value in options.items()], env=environment)
    proxy.shutdown()
    assert_succeeded(result)
    assert proxy.throttled and time.monotonic() - started > 65
    assert sorted(train_steps(tmp_path / "run")) == [1]


def test_a_download_failing_on_one_node_stops_every_rank_with_one_line(
    prepared, s3_server, tmp_path
):
    """Node a's cache is warm; node b's download of a shard fails. Both nodes stop at once,
    with one error line naming the shard, instead of node a waiting out a timeout."""
    import boto3

    from preprocess.dataset_cache import cache_dataset

    upload_prepared(prepared, "failing")
    warm = tmp_path / "cache-a"
    cache_dataset("s3://failing/train", str(warm))
    shard = json.loads((prepared["train"] / "dataset.json").read_text())["shards"][0]["name"]
    boto3.client("s3").delete_object(Bucket="failing", Key=f"train/{shard}")

    def node_args(cache: str) -> list[str]:
        options = training_options(prepared, tmp_path / "run", "zero2_fp32.json", max_steps=1)
        options |= {"train_dir": "s3://failing/train", "cache_dir": str(tmp_path / cache)}
        del options["eval_dir"]
        return [f"--{key}={value}" for key, value in options.items()]

    environment = {"DEEPSPEED_TIMEOUT": "5"}
    started = time.monotonic()
    results = run_two_nodes([node_args("cache-a"), node_args("cache-b")], tmp_path, environment)
    assert time.monotonic() - started < 240  # far from the 5-minute collective timeout
    assert all(code != 0 for code, _ in results)
    output = "\n".join(output for _, output in results)
    errors = [line for line in output.splitlines() if "error:" in line]
    assert len(errors) == 1 and f"s3://failing/train/{shard}" in errors[0], output[-3000:]
    assert socket.gethostname() in errors[0] and "Traceback" not in output


def adam_steps(checkpoint: Path) -> float:
    """The Adam step count in rank 0's optimizer partition of a ZeRO-2 or ZeRO-3 checkpoint."""
    (path,) = checkpoint.glob("*zero_pp_rank_0_*optim_states.pt")
    state = torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]
    state = state.get("base_optimizer_state") or state["optimizer_state_dict"]  # ZeRO-2 or 3
    return float(state["state"][0]["step"])


def preempt_after_checkpoint(command: list[str], output_dir: Path) -> str:
    """Runs `command` and SIGKILLs its whole process group once a checkpoint is complete, as a
    preemption does; returns the tag of that checkpoint (DeepSpeed writes `latest` last)."""
    latest = output_dir / "checkpoints" / "latest"
    run = subprocess.Popen(
        command, cwd=REPO_ROOT, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 600
    while not latest.exists():
        assert run.poll() is None and time.monotonic() < deadline, "no checkpoint before exit"
        time.sleep(0.1)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    return latest.read_text().strip()


def scheduled_learning_rates(peak: float, warmup: int, total: int) -> list[float]:
    """DeepSpeed's WarmupDecayLR after each of `total` steps, as an uninterrupted run logs it."""
    from deepspeed.runtime.lr_schedules import WarmupDecayLR

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    schedule = WarmupDecayLR(
        optimizer, total_num_steps=max(total, 2), warmup_min_lr=0.0, warmup_max_lr=peak,
        warmup_num_steps=max(1, min(warmup, total - 1)), warmup_type="linear",
    )  # fmt: skip
    rates = []
    for _ in range(total):
        optimizer.step()
        schedule.step()
        rates.append(schedule.get_lr()[0])
    return rates


@pytest.mark.parametrize(
    ("config", "before", "after", "accumulation"),
    [("zero2_fp32.json", 2, 1, 1), ("zero2_fp32.json", 1, 2, 2), ("zero3_fp32.json", 2, 1, 1),
     ("zero3_fp32.json", 1, 2, 2)],
)  # fmt: skip
def test_preempted_run_resumes_on_another_number_of_ranks(
    prepared, tmp_path, config, before, after, accumulation
):
    """A one-epoch run killed after a mid-epoch checkpoint, resumed by the same command on
    another number of ranks, finishes that epoch and no more: the global batch is kept (2 -> 1
    ranks accumulates twice as much, 1 -> 2 half as much), so the schedule, the steps and the
    epoch keep their meaning; the weights loaded are the checkpoint's fp32 masters."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from preprocess.shard_format import ShardDataset
    from train.duration_bucket_sampler import DurationBucketSampler
    from train.model_export import weights_digest

    options = training_options(prepared, tmp_path, config, trace_batches=True)
    del options["max_steps"], options["eval_dir"]
    options |= {"num_train_epochs": 1, "max_batch_seconds": 6, "warmup_steps": 3}
    options |= {"gradient_accumulation_steps": accumulation, "save_steps": 2}
    options |= {"save_total_limit": 99}  # the resumed checkpoint is read after the run
    args = [f"--{key}={value}" for key, value in options.items()]
    tag = preempt_after_checkpoint([*launcher(before), SCRIPT, *args], tmp_path)
    checkpoint = tmp_path / "checkpoints" / tag
    saved = json.loads((checkpoint / "trainer_state.json").read_text())
    assert saved["step"] < saved["total_steps"]  # cut mid-epoch
    traced = [len(batch_trace(tmp_path, rank)) for rank in range(before)] + [0] * after
    # A universal conversion left by an earlier checkpoint of the same tag is stale.
    stale = tmp_path / "checkpoints" / f"{tag}_universal"
    stale.mkdir()
    (stale / "converted_from.json").write_text('{"checkpoint_id": "an earlier step2"}')

    assert_succeeded(launch([*args, "--resume"], num_ranks=after))

    # What the uninterrupted run would train, and what the resumed one re-planned of its rest.
    train = ShardDataset(str(prepared["train"]))
    ids = np.array([train[index]["id"] for index in range(len(train))])
    state = torch.load(next(checkpoint.glob("*model_states.pt")), weights_only=False)["sampler"]
    layout = {"audio_lengths": train.audio_lengths, "sampling_rate": 16000, "seed": 42}
    planned = DurationBucketSampler(
        **layout, max_batch_seconds=6, world_size=before, gradient_accumulation_steps=accumulation
    ).plan_epoch(0)
    resumed_sampler = DurationBucketSampler(
        **layout, max_batch_seconds=6, world_size=after,
        gradient_accumulation_steps=accumulation * before // after,
    )  # fmt: skip
    resumed_sampler.load_state_dict(state)
    replanned = resumed_sampler.plan_epoch(0)

    def trained(plan) -> list[str]:
        return [i for row in plan for batch in row for i in ids[batch]]

    before_ids = [
        i for rank in range(before) for line in batch_trace(tmp_path, rank)[: traced[rank]]
        if line["step"] <= saved["step"] for i in line["ids"]
    ]  # fmt: skip
    after_lines = [
        line for rank in range(after) for line in batch_trace(tmp_path, rank)[traced[rank] :]
    ]
    after_ids = [i for line in after_lines for i in line["ids"]]
    # Every kept utterance of the epoch trained once, but the re-plan's own remainder (fewer
    # than one step of batches); nothing of a second epoch.
    assert {line["epoch"] for line in after_lines} == {0}
    assert len(before_ids + after_ids) == len(set(before_ids + after_ids))
    assert sorted(after_ids) == sorted(trained(replanned))
    missing = set(trained(planned)) - set(before_ids) - set(after_ids)
    assert missing == set(ids[replanned.order]) - set(after_ids)
    assert replanned.bounds.size - 1 - replanned.grid.size < accumulation * before

    resumed = train_steps(tmp_path)
    final = max(resumed)
    assert final == saved["step"] + len(replanned) // (accumulation * before // after)
    assert saved["total_steps"] - 1 <= final <= saved["total_steps"]
    rates = scheduled_learning_rates(1e-3, 3, saved["total_steps"])
    for step in range(1, final + 1):
        assert resumed[step]["learning_rate"] == pytest.approx(rates[step - 1], rel=1e-6), step
    # The resumed ranks hold the checkpoint's fp32 masters, through a fresh conversion.
    masters = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "checkpoints"), tag=tag)
    (loaded,) = [r["resumed_fp32_sha256"] for r in records(tmp_path) if "resumed_fp32_sha256" in r]
    assert loaded == weights_digest(masters)
    converted = json.loads((stale / "converted_from.json").read_text())
    assert converted["checkpoint_id"] == saved["checkpoint_id"]
    last = tmp_path / "checkpoints" / f"step{final}"
    assert json.loads((last / "trainer_state.json").read_text())["world_size"] == after
    assert adam_steps(last) == final  # Adam's step count came across, not restarted at 0


def assert_one_line_error(args: list[str], message: str) -> None:
    """One process refuses `args` with exit code 2 and one `error:` line holding `message`."""
    result = subprocess.run(
        [sys.executable, "-m", "train.run_finetuning", *args],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and message in error_lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"train_dir": "/nonexistent"}, "not a prepared dataset"),
        ({"deepspeed": "/nonexistent.json"}, "cannot read DeepSpeed config"),
        ({"eval_dir": "EIGHT_KHZ"}, "Hz"),
        ({"max_batch_seconds": 0}, "max_batch_seconds"),
        ({"train_dir": "s3://bucket/prepared/train"}, "pass --cache_dir"),
        ({"output_dir": "HAS_CHECKPOINTS"}, "pass --resume"),
    ],
)
def test_bad_input_is_one_line_error(prepared, tmp_path, ray_local, change, message):
    if change.get("eval_dir") == "EIGHT_KHZ":
        prepare(
            ManifestArguments(manifest=str(prepared["corpus"] / "dev.tsv")),
            PreprocessArguments(output_dir=str(tmp_path / "dev8k"), sampling_rate=8000),
        )
        change = {"eval_dir": str(tmp_path / "dev8k")}
    output_dir = tmp_path / "run"
    if change.get("output_dir") == "HAS_CHECKPOINTS":
        (output_dir / "checkpoints").mkdir(parents=True)
        (output_dir / "checkpoints" / "latest").write_text("step4")
        # Refused before anything else is looked at, the missing dataset included.
        change = {"train_dir": "/nonexistent"}
    args = training_args(prepared, output_dir, "zero2_fp32.json", **change)
    assert_one_line_error(args, message)


def test_vocabulary_mismatch_with_model_head_is_refused(zero2_run, prepared, tmp_path):
    model_dir = tmp_path / "other_head"
    subprocess.run(["cp", "-r", str(zero2_run / "model"), str(model_dir)], check=True)
    vocab = json.loads((model_dir / "vocab.json").read_text())
    vocab["ł"] = len(vocab)
    (model_dir / "vocab.json").write_text(json.dumps(vocab))
    args = training_args(prepared, tmp_path / "run", "zero2_fp32.json")
    args = [a for a in args if not a.startswith("--model_name_or_path")]
    result = subprocess.run(
        [sys.executable, "-m", "train.run_finetuning", *args, f"--model_name_or_path={model_dir}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2
    assert "another vocabulary" in result.stderr


def trainer_sampler(train_set, seed: int | None = None):
    """The sampler the trainer builds for training_args' runs on 2 ranks: its plan, known here."""
    from argument_classes import DataArguments, FinetuningArguments
    from train.duration_bucket_sampler import DurationBucketSampler

    return DurationBucketSampler(
        audio_lengths=train_set.audio_lengths,
        sampling_rate=train_set.sampling_rate,
        max_batch_seconds=12,
        world_size=2,
        num_buckets=DataArguments.num_buckets,
        seed=FinetuningArguments.seed if seed is None else seed,
    )


def poison_with_nan(dataset_dir: Path, index: int) -> None:
    """Overwrites utterance `index`'s samples with NaN in place, as a corrupted recording would.

    prepare_dataset rejects non-finite audio, so this is the only way one reaches training.
    The shard keeps its size and layout; only the sample bytes change.
    """
    import pyarrow as pa
    import pyarrow.ipc as ipc

    from preprocess.shard_format import ShardDataset

    entry = ShardDataset(str(dataset_dir)).length_index.slice(index, 1).to_pylist()[0]
    path = dataset_dir / entry["shard"]
    data = bytearray(path.read_bytes())
    file_buffer = pa.py_buffer(bytes(data))
    row = entry["row"]
    for audio in ipc.open_file(file_buffer).read_all().column("audio").chunks:
        if row >= len(audio):
            row -= len(audio)
            continue
        start, stop = audio.offsets[row].as_py(), audio.offsets[row + 1].as_py()
        values = audio.values
        offset = values.buffers()[1].address - file_buffer.address + (values.offset + start) * 4
        data[offset : offset + (stop - start) * 4] = np.full(stop - start, np.nan, "<f4").tobytes()
        break
    path.write_bytes(bytes(data))
    assert np.isnan(ShardDataset(str(dataset_dir))[index]["audio"]).all()


@pytest.mark.parametrize("config", ["zero2_fp32.json", "zero3_fp32.json"])
def test_nonfinite_loss_skips_the_whole_step_on_every_rank(prepared, tmp_path, config):
    import shutil

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from preprocess.shard_format import ShardDataset

    train_dir = tmp_path / "train-with-nan"
    shutil.copytree(prepared["train"], train_dir)
    train_set = ShardDataset(str(train_dir))
    sampler = trainer_sampler(train_set)
    # Poison an utterance rank 1 trains on in step 3 (steps 1 and 2 run at a learning rate of
    # 0 during the warmup, so only later steps can show that a skip kept the weights).
    poisoned = int(sampler.plan_epoch(0)[2][1][0])
    poison_with_nan(train_dir, poisoned)
    max_steps = 6
    rows = [row for epoch in range(max_steps) for row in sampler.plan_epoch(epoch)][:max_steps]
    bad_steps = {step for step, row in enumerate(rows, 1) if any(poisoned in b for b in row)}
    assert 3 in bad_steps and len(bad_steps) < max_steps - 2

    output = tmp_path / "run"
    args = training_args(prepared, output, config, max_steps=max_steps, save_steps=1)
    args = [a for a in args if not a.startswith("--eval_dir")]
    args += [f"--train_dir={train_dir}", "--save_total_limit=99"]
    assert_succeeded(launch(args))

    steps = train_steps(output)
    expected = [sum(s <= step for s in bad_steps) for step in range(1, max_steps + 1)]
    assert [steps[s]["nonfinite_losses"] for s in range(1, max_steps + 1)] == expected
    assert [steps[s]["skipped_steps"] for s in range(1, max_steps + 1)] == expected
    assert all(math.isfinite(record["loss"]) for record in steps.values())
    # A skipped step does not advance the schedule either.
    assert steps[3]["learning_rate"] == steps[2]["learning_rate"] > 0

    def master(step: int) -> dict:
        return get_fp32_state_dict_from_zero_checkpoint(str(output / "checkpoints"), f"step{step}")

    weights = {step: master(step) for step in range(2, max_steps + 1)}
    for step in range(3, max_steps + 1):
        unchanged = all(torch.equal(weights[step][n], t) for n, t in weights[step - 1].items())
        assert unchanged == (step in bad_steps), step


@pytest.mark.parametrize("config", ["zero2_bf16.json", "zero3_bf16.json"])
def test_bf16_export_holds_the_fp32_master_weights(prepared, tmp_path, config):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    from argument_classes import FinetuningArguments, ModelArguments
    from preprocess.shard_format import ShardDataset
    from train.wav2vec2_model import build_model

    args = training_args(prepared, tmp_path, config, max_steps=2, freeze_feature_encoder=True)
    assert_succeeded(launch([a for a in args if not a.startswith("--eval_dir")]))

    exported = load_file(str(tmp_path / "model" / "model.safetensors"))
    assert all(tensor.dtype == torch.float32 for tensor in exported.values())
    masters = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "checkpoints"), "step2")
    # The same seeded random init the trainer built, before DeepSpeed cast it to bf16.
    train_set = ShardDataset(str(prepared["train"]))
    torch.manual_seed(FinetuningArguments.seed)
    initial = build_model(
        ModelArguments(model_name_or_path="tiny", mask_time_prob=0.0, freeze_feature_encoder=True),
        train_set.vocab,
        train_set.sampling_rate,
    )
    frozen = {name for name, p in initial.named_parameters() if not p.requires_grad}
    assert frozen and len(frozen) < len(exported)
    for name, tensor in exported.items():
        if name in frozen:
            # Exported at full precision, not rounded to bf16 with the module.
            assert torch.equal(tensor, initial.state_dict()[name]), name
        else:
            assert torch.equal(tensor, masters[name].float()), name
    rounded = [n for n in frozen if not torch.equal(exported[n], exported[n].bfloat16().float())]
    assert rounded, "the frozen weights would survive bf16 rounding; the test shows nothing"
    # The bf16 engine's logits differ from the fp32 export's only by bf16 rounding.
    (check,) = [r for r in records(tmp_path) if "export_logits_max_abs_diff" in r]
    assert check["engine_dtype"] == "torch.bfloat16"
    assert 0 < check["export_logits_max_abs_diff"] <= BF16_LOGITS_TOLERANCE


def test_shipped_configs_compile_nothing_and_sync_nothing_extra():
    """No throughput timer (it syncs the device twice per micro-step); torch's fused AdamW
    everywhere except the CPU-offload configs, which keep DeepSpeed's CPU Adam."""
    for path in sorted((REPO_ROOT / "ds_configs").glob("*.json")):
        config = json.loads(path.read_text())
        assert config["timers"]["throughput"]["enabled"] is False, path.name
        params = config["optimizer"]["params"]
        offloaded = "offload_optimizer" in config["zero_optimization"]
        assert params.get("torch_adam", False) is not offloaded, path.name
        assert params.get("fused", False) is not offloaded, path.name
        assert {"betas", "eps"} <= set(params), path.name


@pytest.mark.parametrize("utterances", [1, 2, 3])
def test_evaluation_of_any_size_on_two_ranks(prepared, tmp_path, utterances):
    # The train split as the eval set: the dev split of the test corpus has only 2 utterances.
    args = training_args(
        prepared, tmp_path, "zero3_fp32.json", max_steps=1, max_eval_utterances=utterances
    )
    args.append(f"--eval_dir={prepared['train']}")
    assert_succeeded(launch(args, timeout=300))
    (evaluation,) = [r for r in records(tmp_path) if "eval_cer" in r]
    assert evaluation["eval_utterances"] == utterances


def test_gradient_accumulation_equals_the_doubled_batch(prepared, tmp_path):
    """1 rank × 2 micro-batches and 2 ranks × 1 micro-batch train on the same batches per step
    (the sampler packs per step, whatever the layout): the same loss and gradient norm."""
    common = {"max_steps": 3, "save_steps": 3, "eval_dir": ""}
    accumulated = tmp_path / "accumulated"
    args = training_args(
        prepared, accumulated, "zero2_fp32.json", gradient_accumulation_steps=2, **common
    )
    assert_succeeded(launch([a for a in args if a != "--eval_dir="], num_ranks=1))
    distributed = tmp_path / "distributed"
    args = training_args(prepared, distributed, "zero2_fp32.json", **common)
    assert_succeeded(launch([a for a in args if a != "--eval_dir="], num_ranks=2))

    one, two = train_steps(accumulated), train_steps(distributed)
    assert sorted(one) == sorted(two) == [1, 2, 3]
    for step in (1, 2, 3):
        assert one[step]["batch_checksum"] == two[step]["batch_checksum"], step
        assert one[step]["loss"] == pytest.approx(two[step]["loss"], rel=1e-5), step
        assert one[step]["grad_norm"] > 0
        assert one[step]["grad_norm"] == pytest.approx(two[step]["grad_norm"], rel=1e-4), step


def test_two_epochs_on_zero1_from_a_json_file_see_each_utterance_once_per_epoch(prepared, tmp_path):
    from preprocess.shard_format import ShardDataset

    train_set = ShardDataset(str(prepared["train"]))
    # 17 utterances make one batch per duration bin, so epochs differ only in the order of their
    # 3 steps: a seed whose two orders differ (seed 42's happen to match, a 1-in-6 chance).
    seed = 1
    sampler = trainer_sampler(train_set, seed)
    plans = [[[b.tolist() for b in row] for row in sampler.plan_epoch(e)] for e in (0, 1)]
    assert plans[0] != plans[1]
    options = training_options(
        prepared, tmp_path, "zero1_fp32.json", max_steps=2 * len(plans[0]), trace_batches=True
    )
    options["seed"] = seed
    del options["eval_dir"]
    (tmp_path / "args.json").write_text(json.dumps(options, default=str))
    assert_succeeded(launch([str(tmp_path / "args.json")]))

    ids_of = {i: train_set[i]["id"] for i in range(len(train_set))}
    for rank in (0, 1):
        trace = batch_trace(tmp_path, rank)
        for epoch in (0, 1):
            # Each rank trained its column of each epoch's (reshuffled) plan, in order.
            trained = [t["ids"] for t in trace if t["epoch"] == epoch]
            assert trained == [[ids_of[i] for i in row[rank]] for row in plans[epoch]], epoch
    for epoch in (0, 1):
        seen = [i for row in plans[epoch] for batch in row for i in batch]
        assert len(seen) == len(set(seen)), "an utterance was planned twice in one epoch"


def test_arguments_from_a_yaml_file(tmp_path):
    from argument_classes import DataArguments, FinetuningArguments, ModelArguments, parse_arguments

    (tmp_path / "args.yaml").write_text(
        "model_name_or_path: tiny\ntrain_dir: data/train\noutput_dir: runs/x\n"
        "max_steps: 7\nfreeze_feature_encoder: false\ndeepspeed: zero1_bf16.json\n"
    )
    classes = (ModelArguments, DataArguments, FinetuningArguments)
    argv = ["--local_rank=0", str(tmp_path / "args.yaml")]
    model_args, data_args, finetuning_args = parse_arguments(classes, argv)
    assert (model_args.model_name_or_path, model_args.freeze_feature_encoder) == ("tiny", False)
    assert data_args.train_dir == "data/train"
    assert (finetuning_args.max_steps, finetuning_args.deepspeed) == (7, "zero1_bf16.json")


def initial_tiny_model(vocab: dict[str, int]) -> torch.nn.Module:
    """The model training_args' runs start from: the trainer seeds torch with the run's seed,
    then builds it (tiny preset, SpecAugment off as training_options sets it)."""
    from argument_classes import FinetuningArguments, ModelArguments
    from train.wav2vec2_model import build_model

    torch.manual_seed(FinetuningArguments.seed)
    return build_model(ModelArguments("tiny", mask_time_prob=0.0), vocab, 16000)


def tiny_model_logits(
    state_dict: dict[str, torch.Tensor] | None, batch: dict[str, torch.Tensor], vocab: dict
) -> torch.Tensor:
    """Eval-mode logits of the first utterance of a collated batch, on the tiny model with
    `state_dict`'s weights (None: the initial ones)."""
    model = initial_tiny_model(vocab)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    with torch.no_grad():
        inputs = {"input_values": batch["input_values"], "attention_mask": batch["attention_mask"]}
        return model.eval()(**inputs).logits[0]


def checkpoint_dirs(output_dir: Path) -> list[str]:
    """The checkpoint directories of a run (step tags and their universal conversions)."""
    return sorted(path.name for path in (output_dir / "checkpoints").iterdir() if path.is_dir())


def saving_args(prepared: dict[str, Path], output_dir: Path, max_steps: int) -> list[str]:
    """A ZeRO-2 fp32 run without evaluation that saves every step and keeps the last 2, traces
    its batches and never clips (the logged grad_norm is then the raw gradient's norm)."""
    args = training_args(
        prepared, output_dir, "zero2_fp32.json", max_steps=max_steps, save_steps=1,
        save_total_limit=2, trace_batches=True, max_grad_norm=1e9,
    )  # fmt: skip
    return [arg for arg in args if not arg.startswith("--eval_dir")]


@pytest.fixture(scope="module")
def saving_run(prepared, tmp_path_factory) -> tuple[Path, list[str]]:
    """3 steps on 2 ranks with saving_args; the output and its checkpoints right after the run
    (later fixtures resume it)."""
    output = tmp_path_factory.mktemp("saving")
    assert_succeeded(launch(saving_args(prepared, output, max_steps=3)))
    return output, checkpoint_dirs(output)


@pytest.fixture(scope="module")
def resumed_and_exported(saving_run, prepared) -> dict[str, object]:
    """saving_run resumed on 1 rank to step 4 and back on 2 ranks to step 5 (each resume loads
    the latest checkpoint's universal conversion, written beside it), then exported again with
    --export_only. Returns the checkpoints after each resume, and what the export must keep."""
    output, _ = saving_run
    checkpoints = {}
    for max_steps, num_ranks in ((4, 1), (5, 2)):
        args = [*saving_args(prepared, output, max_steps), "--resume=True"]
        assert_succeeded(launch(args, num_ranks=num_ranks))
        checkpoints[max_steps] = checkpoint_dirs(output)
    kept = {
        "metrics": (output / "metrics.jsonl").read_bytes(),
        "traces": [path.read_bytes() for path in sorted((output / "batch_trace").iterdir())],
    }
    (output / "model").rename(output / "model_of_the_run")
    assert_succeeded(launch([*saving_args(prepared, output, 5), "--export_only=True"]))
    return {"checkpoints": checkpoints, **kept}


def test_checkpoints_beyond_the_limit_are_pruned_with_their_universal_form(
    saving_run, resumed_and_exported
):
    _, after_first_run = saving_run
    assert after_first_run == ["step2", "step3"]
    after_resume = resumed_and_exported["checkpoints"]
    # The resume on 1 rank converted step 3, one of the 2 kept, and saved step 4.
    assert after_resume[4] == ["step3", "step3_universal", "step4"]
    # Step 3's conversion went with it once two newer checkpoints were saved.
    assert after_resume[5] == ["step4", "step4_universal", "step5"]


def test_export_only_exports_the_latest_checkpoint_and_trains_nothing(
    saving_run, resumed_and_exported
):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    output, _ = saving_run
    assert sorted(train_steps(output)) == [1, 2, 3, 4, 5]
    # Nothing logged, traced or saved: not a step, not a record.
    assert (output / "metrics.jsonl").read_bytes() == resumed_and_exported["metrics"]
    traces = [path.read_bytes() for path in sorted((output / "batch_trace").iterdir())]
    assert traces == resumed_and_exported["traces"]
    assert checkpoint_dirs(output) == resumed_and_exported["checkpoints"][5]
    exported = load_file(str(output / "model" / "model.safetensors"))
    final = load_file(str(output / "model_of_the_run" / "model.safetensors"))
    assert set(exported) == set(final)
    assert all(torch.equal(exported[name], final[name]) for name in final)
    # Step 5's weights, not step 4's (the other checkpoint): the last step changed them.
    step4 = get_fp32_state_dict_from_zero_checkpoint(str(output / "checkpoints"), "step4")
    assert not all(torch.equal(step4[name], final[name]) for name in step4)


def collate_traced(train_set, line: dict) -> dict[str, torch.Tensor]:
    """A traced micro-batch collated as the trainer collates it (normalized, mask built later)."""
    from train.ctc_collator import CTCCollator

    index_of = {train_set[i]["id"]: i for i in range(len(train_set))}
    collator = CTCCollator(vocab=train_set.vocab, do_normalize=True)
    return collator([train_set[index_of[utterance]] for utterance in line["ids"]])


def training_forward(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], dtype: torch.dtype
) -> torch.Tensor:
    """The trainer's forward of a micro-batch: inputs cast to `dtype`, mask from the lengths."""
    from train.ctc_collator import attention_mask

    values = batch["input_values"].to(dtype)
    mask = attention_mask(batch["input_lengths"], values.shape[1], torch.device("cpu"))
    return model.train()(values, attention_mask=mask).logits


def test_loss_is_the_steps_summed_ctc_loss_over_its_target_tokens(saving_run, prepared):
    """An absolute check of the loss normalization: step 1's logged gradient norm (DeepSpeed's
    global norm over the ranks' averaged gradients, clipping off) is that of the step's summed
    CTC loss over all ranks' micro-batches divided by its target tokens, recomputed here from
    the initial model and the traced batches. Averaging per micro-batch (as HF's Trainer does
    across ranks) or per utterance (ctc_loss_reduction="mean") gives another norm, far off."""
    import torch.nn.functional as F

    from preprocess.shard_format import ShardDataset
    from train.run_finetuning import ctc_loss_sum

    output, _ = saving_run
    train_set = ShardDataset(str(prepared["train"]))
    lines = [line for rank in (0, 1) for line in batch_trace(output, rank) if line["step"] == 1]
    assert len(lines) == 2  # one micro-batch per rank
    model = initial_tiny_model(train_set.vocab)
    blank = model.config.pad_token_id
    sums, tokens, utterance_means = [], [], []
    for batch in (collate_traced(train_set, line) for line in lines):
        logits = training_forward(model, batch, torch.float32)
        frames = model._get_feat_extract_output_lengths(batch["input_lengths"])
        lengths = batch["target_lengths"]
        sums.append(ctc_loss_sum(logits, batch["labels"], frames, lengths, blank))
        tokens.append(int(lengths.sum()))
        log_probs = F.log_softmax(logits, dim=-1).transpose(0, 1)
        labels = batch["labels"].clamp(min=0)
        utterance_means.append(
            F.ctc_loss(log_probs, labels, frames, lengths, blank=blank, zero_infinity=True)
        )
    assert tokens[0] != tokens[1]  # else averaging per micro-batch would not differ

    parameters = [p for p in model.parameters() if p.requires_grad]

    def gradient_norm(loss: torch.Tensor) -> float:
        grads = torch.autograd.grad(loss, parameters, retain_graph=True, allow_unused=True)
        return math.sqrt(sum(float(g.double().square().sum()) for g in grads if g is not None))

    logged = train_steps(output)[1]
    loss = sum(sums) / sum(tokens)
    tolerance = 1e-3  # measured: 1.3e-5 relative (summation order, 2 ranks against 1 process)
    assert logged["loss"] == pytest.approx(float(loss.detach()), rel=tolerance)
    assert logged["grad_norm"] == pytest.approx(gradient_norm(loss), rel=tolerance)
    per_micro_batch = sum(s / t for s, t in zip(sums, tokens, strict=True)) / len(sums)
    per_utterance = sum(utterance_means) / len(utterance_means)
    for wrong in (per_micro_batch, per_utterance):  # measured: 27% off
        assert abs(gradient_norm(wrong) / logged["grad_norm"] - 1) > 20 * tolerance


def test_bf16_nonfinite_loss_skips_the_step_and_stays_out_of_the_logged_loss(prepared, tmp_path):
    """bf16 (DeepSpeed runs it on CPUs, fp16 not): a NaN utterance in rank 1's step-3 batch makes
    that rank's loss NaN. DeepSpeed's overflow check skips the step on both ranks: the weights
    stay as step 2 left them, the schedule does not advance, and step 4 trains again. Step 3's
    logged loss is rank 0's loss over rank 0's target tokens: the NaN batch's tokens are not
    in its denominator."""
    import shutil

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from preprocess.shard_format import ShardDataset
    from train.ctc_collator import CTCCollator
    from train.run_finetuning import ctc_loss_sum

    train_set = ShardDataset(str(prepared["train"]))
    sampler = trainer_sampler(train_set)
    rows = [row for epoch in (0, 1) for row in sampler.plan_epoch(epoch)][:4]
    # Steps 1 and 2 run at the warmup's learning rate of 0, so step 3 is the first whose skip
    # can show in the weights; rank 1 trains the poisoned utterance then, and only then.
    finite, poisoned = rows[2]
    train_dir = tmp_path / "train-with-nan"
    shutil.copytree(prepared["train"], train_dir)
    poison_with_nan(train_dir, int(poisoned[0]))
    trained_at = [step for step, row in enumerate(rows, 1) if any(poisoned[0] in b for b in row)]
    assert trained_at == [3]

    output = tmp_path / "run"
    args = training_args(prepared, output, "zero2_bf16.json", max_steps=4, save_steps=1)
    args = [a for a in args if not a.startswith("--eval_dir")]
    args += [f"--train_dir={train_dir}", "--save_total_limit=99"]
    assert_succeeded(launch(args))

    steps = train_steps(output)
    assert [steps[s]["nonfinite_losses"] for s in (1, 2, 3, 4)] == [0, 0, 1, 1]
    assert [steps[s]["skipped_steps"] for s in (1, 2, 3, 4)] == [0, 0, 1, 1]
    assert steps[3]["learning_rate"] == steps[2]["learning_rate"] > 0
    masters = {
        step: get_fp32_state_dict_from_zero_checkpoint(str(output / "checkpoints"), f"step{step}")
        for step in (2, 3, 4)
    }
    # After two steps at a learning rate of 0 the fp32 masters are still DeepSpeed's copies of
    # the bf16 module: the initial weights, rounded. That is the model step 3 ran.
    model = initial_tiny_model(train_set.vocab).to(torch.bfloat16)
    for name, weight in model.state_dict().items():
        assert torch.equal(masters[2][name], weight.float()), name
    assert all(torch.equal(masters[3][name], masters[2][name]) for name in masters[2])
    assert not all(torch.equal(masters[4][name], masters[3][name]) for name in masters[3])

    batch = CTCCollator(vocab=train_set.vocab, do_normalize=True)(
        [train_set[int(index)] for index in finite]
    )
    with torch.no_grad():
        logits = training_forward(model, batch, torch.bfloat16)
        frames = model._get_feat_extract_output_lengths(batch["input_lengths"])
        lengths, blank = batch["target_lengths"], model.config.pad_token_id
        loss_sum = float(ctc_loss_sum(logits, batch["labels"], frames, lengths, blank))
    finite_tokens = int(lengths.sum())
    all_tokens = finite_tokens + int(train_set.text_lengths[poisoned].sum())
    tolerance = 1e-2  # measured: exact on one CPU; bf16 kernels may round otherwise on others
    assert steps[3]["loss"] == pytest.approx(loss_sum / finite_tokens, rel=tolerance)
    assert abs(steps[3]["loss"] / (loss_sum / all_tokens) - 1) > 10 * tolerance


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"train_dir": "DEV"}, "trained on another vocabulary"),
        ({"seed": 43}, "does not fit this train set: state has seed=42"),
    ],
)
def test_resuming_on_other_data_is_one_line_error(zero2_run, prepared, tmp_path, change, message):
    """A checkpoint resumed with a train set (or seed) other than its own is refused in one
    line: another vocabulary before the model is built, another plan when its position is."""
    output_dir = tmp_path / "run"
    shutil.copytree(zero2_run / "checkpoints", output_dir / "checkpoints")
    if change.get("train_dir") == "DEV":
        change = {"train_dir": str(prepared["dev"])}
    args = training_args(prepared, output_dir, "zero2_fp32.json", resume=True, **change)
    assert_one_line_error(args, message)
