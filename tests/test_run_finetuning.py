"""Training through the real deepspeed launcher: 2 CPU ranks over gloo, real ZeRO-2 and ZeRO-3."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from espeak_audio import REPO_ROOT

from argument_classes import ManifestArguments, PreprocessArguments
from preprocess.prepare_dataset import prepare

LAUNCHER = [sys.executable, "-m", "deepspeed.launcher.runner"]
SCRIPT = str(REPO_ROOT / "train" / "run_finetuning.py")
# bf16 keeps 8 bits of mantissa; measured on the tiny model after 2 steps: 0.009 (ZeRO-2 and 3).
# A wrong or rounded weight in the export moves logits by far more.
BF16_LOGITS_TOLERANCE = 0.05


@pytest.fixture(scope="session")
def prepared(ray_local, german_corpus, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("prepared")
    for split in ("train", "dev"):
        prepare(
            ManifestArguments(manifest=str(german_corpus / f"{split}.tsv")),
            PreprocessArguments(output_dir=str(root / split)),
        )
    return {"train": root / "train", "dev": root / "dev", "corpus": german_corpus}


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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
    """The pipeline on the exported model gives the transcript the trainer's own evaluation
    decoded for the same clip (the shortest dev utterance, rank 0's first), and the same as a
    plain greedy decode of the exported model."""
    import transformers
    from transformers import Wav2Vec2ForCTC, Wav2Vec2Processor

    from preprocess.shard_format import ShardDataset

    dev = ShardDataset(str(prepared["dev"]))
    audio = dev[int(np.argsort(dev.num_samples, kind="stable")[0])]["audio"]
    model_dir = str(zero2_run / "model")
    recognizer = transformers.pipeline("automatic-speech-recognition", model=model_dir)
    transcript = recognizer(np.array(audio))["text"]

    last_evaluation = [r for r in records(zero2_run) if "eval_cer" in r][-1]
    assert transcript == last_evaluation["eval_example"]
    processor = Wav2Vec2Processor.from_pretrained(model_dir)
    features = processor(np.array(audio), sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        logits = Wav2Vec2ForCTC.from_pretrained(model_dir)(**features).logits
    assert transcript == processor.batch_decode(logits.argmax(-1))[0]
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


def test_resume_after_kill_sees_the_same_batches(zero2_run, prepared, tmp_path):
    args = training_args(prepared, tmp_path, "zero2_fp32.json", layerdrop=0.3, max_steps=6)
    reference_dir = tmp_path / "uninterrupted"
    reference_args = training_args(
        prepared, reference_dir, "zero2_fp32.json", layerdrop=0.3, max_steps=6
    )
    assert_succeeded(launch(reference_args))

    killed = subprocess.Popen(
        [*launcher(), SCRIPT, *args],
        cwd=REPO_ROOT, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not (tmp_path / "metrics.jsonl").exists() or 3 not in train_steps(tmp_path):
        assert killed.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    assert 6 not in train_steps(tmp_path)

    assert_succeeded(launch([*args, "--resume=True"]))
    resumed, reference = train_steps(tmp_path), train_steps(reference_dir)
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        assert resumed[step]["batch_checksum"] == reference[step]["batch_checksum"], step
        assert resumed[step]["loss"] == pytest.approx(reference[step]["loss"], rel=1e-3), step


def launch_two_nodes(args_for_node: list[list[str]], tmp_path: Path) -> list[str]:
    """Two deepspeed launchers on loopback, one rank each, as two nodes of a hostfile."""
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
        )
        for rank, args in enumerate(args_for_node)
    ]  # fmt: skip
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    return outputs


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


def test_two_nodes_train_from_s3_through_node_local_caches(prepared, s3_server, tmp_path):
    import boto3

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="training")
    for split in ("train", "dev"):
        for path in prepared[split].rglob("*"):
            if path.is_file():
                s3.upload_file(
                    str(path), "training", f"{split}/{path.relative_to(prepared[split])}"
                )
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


def adam_steps(checkpoint: Path) -> float:
    """The Adam step count in rank 0's optimizer partition of a ZeRO-2 or ZeRO-3 checkpoint."""
    (path,) = checkpoint.glob("*zero_pp_rank_0_*optim_states.pt")
    state = torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]
    state = state.get("base_optimizer_state") or state["optimizer_state_dict"]  # ZeRO-2 or 3
    return float(state["state"][0]["step"])


@pytest.mark.parametrize(
    ("config", "before", "after"),
    [("zero2_fp32.json", 2, 1), ("zero2_fp32.json", 1, 2), ("zero3_fp32.json", 2, 1),
     ("zero3_fp32.json", 1, 2)],
)  # fmt: skip
def test_resume_on_another_number_of_ranks(prepared, tmp_path, config, before, after):
    """A checkpoint of N ranks resumes on M: optimizer state carried, the learning rate
    continuous, and the epoch's remaining utterances trained once each."""
    options = training_options(prepared, tmp_path, config, trace_batches=True)
    del options["max_steps"]  # one epoch: its step count depends on the number of ranks
    options |= {"num_train_epochs": 1, "max_batch_seconds": 6}
    options |= {"save_steps": 2, "save_total_limit": 99}  # step 2's checkpoint is resumed
    args = [f"--{key}={value}" for key, value in options.items() if key != "eval_dir"]
    assert_succeeded(launch(args, num_ranks=before))
    uninterrupted = train_steps(tmp_path)
    trained_before = [
        line for rank in range(before) for line in batch_trace(tmp_path, rank) if line["step"] <= 2
    ]
    traced = [len(batch_trace(tmp_path, rank)) for rank in range(before)] + [0] * after
    # The run is cut after its step-2 checkpoint and resumed on another number of ranks.
    (tmp_path / "checkpoints" / "latest").write_text("step2")
    assert_succeeded(launch([*args, "--resume"], num_ranks=after))

    resumed = train_steps(tmp_path)
    total = max(uninterrupted)
    assert max(resumed) == total > 2
    # Progress counts optimizer steps: the schedule keeps the total it was built for.
    for step in range(3, total + 1):
        expected = uninterrupted[step]["learning_rate"]
        assert resumed[step]["learning_rate"] == pytest.approx(expected, rel=1e-6), step
    assert (tmp_path / "checkpoints" / "step2_universal").is_dir()
    final = tmp_path / "checkpoints" / f"step{total}"
    assert json.loads((final / "trainer_state.json").read_text())["world_size"] == after
    # Adam's moments and step count came across: a dropped optimizer state restarts at 0.
    assert adam_steps(final) == total
    # The rest of the epoch went to the new ranks, none of it trained twice.
    trained_after = [
        line for rank in range(after) for line in batch_trace(tmp_path, rank)[traced[rank] :]
    ]
    for epoch in {line["epoch"] for line in trained_after}:
        ids = [
            i for line in trained_before + trained_after if line["epoch"] == epoch
            for i in line["ids"]
        ]  # fmt: skip
        assert len(ids) == len(set(ids)), epoch
    assert any(line["epoch"] == 0 for line in trained_after)


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
    result = subprocess.run(
        [sys.executable, "-m", "train.run_finetuning", *args],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and message in error_lines[0], result.stderr[-2000:]


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
    from argument_classes import DataArguments, TrainingArguments
    from train.duration_bucket_sampler import DurationBucketSampler

    return DurationBucketSampler(
        num_samples=train_set.num_samples,
        sampling_rate=train_set.sampling_rate,
        max_batch_seconds=12,
        world_size=2,
        num_buckets=DataArguments.num_buckets,
        seed=TrainingArguments.seed if seed is None else seed,
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

    from argument_classes import ModelArguments, TrainingArguments
    from preprocess.shard_format import ShardDataset
    from train.wav2vec2_model import build_model

    args = training_args(prepared, tmp_path, config, max_steps=2, freeze_feature_encoder=True)
    assert_succeeded(launch([a for a in args if not a.startswith("--eval_dir")]))

    exported = load_file(str(tmp_path / "model" / "model.safetensors"))
    assert all(tensor.dtype == torch.float32 for tensor in exported.values())
    masters = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "checkpoints"), "step2")
    # The same seeded random init the trainer built, before DeepSpeed cast it to bf16.
    train_set = ShardDataset(str(prepared["train"]))
    torch.manual_seed(TrainingArguments.seed)
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


def shm_buffers(port: int) -> list[Path]:
    return sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))


def test_runs_leave_no_shared_memory_buffer_and_stale_ones_go(prepared, ray_local, tmp_path):
    import mmap

    prefix = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_1"
    stale, live = Path(f"{prefix}_0"), Path(f"{prefix}_1")  # port 1: no real run uses it
    for path in (stale, live):
        path.write_bytes(b"\0" * 4096)
        os.utime(path, (time.time() - 3600, time.time() - 3600))
    with open(live, "r+b") as file, mmap.mmap(file.fileno(), 4096):  # a live run maps it
        # A run that finishes, and one that stops on an error after the ranks started.
        port = free_port()
        args = training_args(prepared, tmp_path / "ok", "zero2_fp32.json", max_steps=1)
        command = [*LAUNCHER, "--num_gpus", "2", "--master_port", str(port), SCRIPT, *args]
        assert_succeeded(subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True))
        assert shm_buffers(port) == []

        failing_port = free_port()
        prepare(
            ManifestArguments(manifest=str(prepared["corpus"] / "dev.tsv")),
            PreprocessArguments(output_dir=str(tmp_path / "dev8k"), sampling_rate=8000),
        )
        # Both ranks stop on this after the process group started (datasets open after it).
        args = training_args(prepared, tmp_path / "bad", "zero2_fp32.json")
        args += [f"--eval_dir={tmp_path / 'dev8k'}"]
        command = [*LAUNCHER, "--num_gpus", "2", "--master_port", str(failing_port), SCRIPT]
        result = subprocess.run([*command, *args], cwd=REPO_ROOT, capture_output=True, text=True)
        assert result.returncode != 0 and "error: eval data is 8000 Hz" in result.stderr
        assert shm_buffers(failing_port) == []

        assert not stale.exists() and live.exists()
    live.unlink()


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
    from train.run_finetuning import parse_arguments

    (tmp_path / "args.yaml").write_text(
        "model_name_or_path: tiny\ntrain_dir: data/train\noutput_dir: runs/x\n"
        "max_steps: 7\nfreeze_feature_encoder: false\ndeepspeed: zero1_bf16.json\n"
    )
    model, data, training = parse_arguments(["--local_rank=0", str(tmp_path / "args.yaml")])
    assert (model.model_name_or_path, model.freeze_feature_encoder) == ("tiny", False)
    assert (data.train_dir, training.max_steps, training.deepspeed) == (
        "data/train",
        7,
        "zero1_bf16.json",
    )
