"""GPU validation in one command: tests/gpu, then our trainer against the HF Trainer on one GPU.

    python -m benchmarks.gpu_validation             # about 5 minutes on one H200
    python -m benchmarks.gpu_validation --dry_run   # tiny, on CPU: shows that it starts

The GPU machine has no package index: `bash benchmarks/gpu_wheels.sh` builds the wheels it lacks
into gpu_wheels/, to carry over and install with `--install_wheels gpu_wheels`. Importing this
module or collecting tests/gpu loads no Ray and no audio codec, which that machine lacks.

1. `pytest tests/gpu` in a subprocess with a time limit: passed, failed, skipped counts.
2. A dataset of synthetic clips with Common Voice-like lengths, written with
   preprocess.shard_format's writer: no Ray, no audio codecs.
3. Per preset (`base`, `large`, random init, frozen feature encoder) on one GPU, warm-up then
   timed steps: our trainer through the deepspeed launcher with ds_configs/zero2_bf16.json, and
   the HF Trainer (bf16 autocast, no DeepSpeed; benchmarks/hf_trainer_baseline.py --dataset) on
   the same shards with length-grouped batches of the mean-matched size (batching_padding.py).
   The JSON is written after each stage, so a run cut short leaves what it measured.

Figures per run: audio s/s and median step time over the timed steps; peak GPU memory in use,
device-wide (cudaMemGetInfo polled every 0.1 s above the level before the run), and the training
process's torch.cuda.max_memory_allocated; startup to the first optimizer step from the training
process's creation; MFU = training FLOPs per audio second × audio s/s / the device's dense bf16
peak (H200: 989 TFLOP/s; empty elsewhere). FLOPs of a clip of n samples, forward, 2 per
multiply-add of convolutions and matrix products: conv layer i (kernel k_i, stride s_i,
C_{i-1} → C_i channels, C_0 = 1) over L_i = ⌊(L_{i-1} − k_i) / s_i⌋ + 1 frames (L_0 = n) costs
2·C_{i-1}·C_i·k_i·L_i; with T frames out, hidden size h, FFN size f, V outputs and a positional
conv of kernel K in g groups: projection 2·C·h·T, positional conv 2·h·(h/g)·K·T, each layer
2·T·(4h² + 2hf) + 4·T²·h, CTC head 2·T·h·V. Training costs the frozen conv encoder's forward
once and the rest three times, summed over the clips and divided by their audio seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import os
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from benchmarks import harness, hf_trainer_baseline
from benchmarks.batching_padding import mean_matched_batch_size
from benchmarks.benchmark_results import REPO_ROOT, figure_rows, finish, write_results
from benchmarks.harness import SAMPLING_RATE
from benchmarks.harness import launch_trainer as launch_trainer  # tests/gpu launch through here
from preprocess import shard_format
from preprocess.text_normalization import build_vocab

NAME = "gpu_validation"
BUDGET_SECONDS = 300
TESTS_DIR = REPO_ROOT / "tests" / "gpu"
SYSTEMS = {
    "ours": "ours (deepspeed launcher, ZeRO-2)",
    "hf_trainer": "HF Trainer (no DeepSpeed), length-grouped mean-matched batches",
}
# Dense bf16 tensor-core peak by device name; MFU stays empty on devices not listed.
PEAK_BF16_FLOPS = {"H200": 989e12}
# The key our trainer logs torch.cuda.max_memory_allocated under, in GiB.
TRAINER_MEMORY_KEY = "max_memory_allocated_gib"
# Characters of the synthetic transcripts: the demo corpus's German lowercase letters.
ALPHABET = list("abcdefghijklmnopqrstuvwxyzäöüß")
ROWS_PER_RECORD_BATCH = 64
# (metric, figure, unit, higher is better, headline) of each row.
FIGURES = (
    ("training speed", "audio_seconds_per_second", "audio s/s", True, True),
    ("peak GPU memory in use", "peak_device_memory_gib", "GiB", False, True),
    ("MFU", "mfu", "", True, False),
    ("median step time", "median_step_time", "s", False, False),
    ("process start to first optimizer step", "startup_seconds", "s", False, False),
)


def own_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dry_run",
        action="store_true",
        help="tiny, on CPU with CUDA hidden: fp32, the tiny preset, 3 steps; implies --quick",
    )
    presets = ("tiny", "base", "large")
    parser.add_argument("--presets", nargs="+", choices=presets, default=["base", "large"])
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup_steps", type=int, default=10, help="steps before timing")
    parser.add_argument("--audio_minutes", type=float, default=15.0, help="synthetic dataset")
    parser.add_argument("--test_timeout", type=float, default=180.0, help="seconds for tests/gpu")
    parser.add_argument(
        "--install_wheels", type=Path, metavar="DIR", help="first pip-install DIR's wheels, offline"
    )


# --- Inputs: wheels, synthetic shards ------------------------------------------------------------


def install_wheels(folder: Path) -> None:
    """Installs what benchmarks/gpu_wheels.sh put in `folder`, offline; present packages stay."""
    command = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(folder)]
    subprocess.run([*command, "-r", str(folder / "requirements.txt")], check=True)
    importlib.invalidate_caches()


def synthetic_clip(num_samples: int, rng: np.random.Generator) -> np.ndarray:
    """A voiced-speech-like float32 signal: a gliding harmonic tone over a little noise."""
    seconds = np.arange(num_samples) / SAMPLING_RATE
    vibrato = 1 + 0.1 * np.sin(2 * np.pi * rng.uniform(1, 4) * seconds)
    phase = 2 * np.pi * np.cumsum(rng.uniform(90, 220) * vibrato) / SAMPLING_RATE
    tone = np.sin(phase) + np.sin(2 * phase) / 2 + np.sin(3 * phase) / 3
    return (0.1 * tone + 0.01 * rng.standard_normal(num_samples)).astype(np.float32)


def synthetic_transcript(seconds: float, rng: np.random.Generator) -> str:
    """Random words at about speech rate (2.5 words, some 13 characters per second)."""
    words = max(1, round(2.5 * seconds))
    return " ".join("".join(rng.choice(ALPHABET, rng.integers(2, 8))) for _ in range(words))


def write_synthetic_dataset(directory: Path, num_samples: Sequence[int], seed: int) -> Path:
    """A dataset directory of synthetic clips, written as preprocess/prepare_dataset.py writes one:
    staged shards from ShardWriter, then commit_run (length index, vocab.json, dataset.json)."""
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    run_id = f"synthetic-seed{seed}"
    schema = shard_format.shard_schema([])
    writer = shard_format.ShardWriter(
        str(directory / shard_format.STAGING_DIR / run_id), f"shard-{run_id}", schema, 256 * 2**20
    )
    lengths = [int(n) for n in num_samples]
    transcripts = [synthetic_transcript(n / SAMPLING_RATE, rng) for n in lengths]
    for start in range(0, len(lengths), ROWS_PER_RECORD_BATCH):
        rows = range(start, min(start + ROWS_PER_RECORD_BATCH, len(lengths)))
        clips = [synthetic_clip(lengths[row], rng) for row in rows]
        columns = {
            "id": pa.array([f"{run_id}-{row:06d}" for row in rows]),
            "audio": shard_format.audio_array(clips),
            "num_samples": pa.array([lengths[row] for row in rows], pa.int64()),
            **shard_format.audio_statistics(clips),
            "text": pa.array([transcripts[row] for row in rows]),
            "sentence": pa.array([transcripts[row] for row in rows]),
        }
        writer.write(pa.RecordBatch.from_pydict(columns, schema=schema))
    run = shard_format.RunRecord(
        run_id=run_id,
        manifest="synthetic",
        accepted=len(lengths),
        rejected=0,
        skipped_already_processed=0,
        input_seconds=sum(lengths) / SAMPLING_RATE,
        wall_seconds=time.perf_counter() - started,
    )
    options = {"sampling_rate": SAMPLING_RATE, "synthetic_seed": seed}
    shard_format.commit_run(
        str(directory), None, writer.close(), [], build_vocab(transcripts), options, run
    )
    return directory


def benchmark_clip_lengths(audio_minutes: float, seed: int) -> np.ndarray:
    """Common Voice-like clip lengths in samples, just enough of them for `audio_minutes`."""
    total = int(audio_minutes * 60 * SAMPLING_RATE)
    # Every clip is at least a second long, so this many draws always reach the total.
    lengths = harness.common_voice_like_lengths(math.ceil(audio_minutes * 60) + 1, seed)
    return lengths[: int(np.searchsorted(np.cumsum(lengths), total)) + 1]


# --- Running the systems -------------------------------------------------------------------------


@contextlib.contextmanager
def device_memory_peak(enabled: bool, interval_seconds: float = 0.1) -> Iterator[dict[str, Any]]:
    """Yields a dict that gets "peak_device_memory_gib": GPU 0's peak use above its level before,
    device-wide (every process on it); None when not `enabled` (no GPU)."""
    result: dict[str, Any] = {"peak_device_memory_gib": None}
    if not enabled:
        yield result
        return
    import torch

    def used() -> int:
        free, total = torch.cuda.mem_get_info(0)
        return total - free

    baseline = peak = used()
    stop = threading.Event()

    def poll() -> None:
        nonlocal peak
        while not stop.wait(interval_seconds):
            peak = max(peak, used())

    thread = threading.Thread(target=poll, name="device-memory-poll", daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        result["peak_device_memory_gib"] = (peak - baseline) / 2**30


def run_ours(preset: str, dataset: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Our trainer, one rank, ZeRO-2; figures from its metrics.jsonl and startup.json."""
    config, steps = harness.ds_config(2, args.precision), args.warmup_steps + args.steps
    launch = (steps, args.max_batch_seconds, 1, args.dataloader_num_workers)
    run = harness.trainer_run(work, f"ours-{preset}", dataset, preset, config, *launch)
    allocated = [r[TRAINER_MEMORY_KEY] for r in run["records"] if TRAINER_MEMORY_KEY in r]
    return {**run, TRAINER_MEMORY_KEY: max(allocated) if allocated else None}


def run_hf_trainer(
    preset: str, dataset: Path, batch_size: int, work: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """The HF Trainer on the same shards (benchmarks/hf_trainer_baseline.py --dataset)."""
    options = ["--dataset", str(dataset), "--model", preset, "--seed", str(args.seed)]
    options += ["--per_device_train_batch_size", str(batch_size)]
    options += ["--max_steps", str(args.warmup_steps + args.steps)]
    options += ["--dataloader_num_workers", str(args.dataloader_num_workers)]
    options += ["--bf16"] if args.precision == "bf16" else []
    # One GPU, as ours: the Trainer would spread over all visible GPUs with DataParallel.
    first_gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    environment = {"CUDA_VISIBLE_DEVICES": first_gpu} if args.gpu else None
    result, process = hf_trainer_baseline.run_job(work, f"hf-{preset}", options, environment)
    startup = {"startup_seconds": result["total"], "startup_phases": result["phases"]}
    kept = {key: result[key] for key in ("records", TRAINER_MEMORY_KEY, "optimizer")}
    return {**kept, **startup, "process": process, "per_device_train_batch_size": batch_size}


def run_gpu_tests(work: Path, timeout_seconds: float) -> dict[str, Any]:
    """`pytest tests/gpu` in a subprocess, killed past `timeout_seconds`; counts from its JUnit XML.

    --confcutdir keeps tests/conftest.py (Ray, espeak-ng speech) out: the GPU machine lacks them.
    """
    junit = work / "gpu-tests.xml"
    command = [sys.executable, "-m", "pytest", "--confcutdir", str(TESTS_DIR), str(TESTS_DIR)]
    command += ["-p", "no:cacheprovider", f"--junitxml={junit}"]
    log_file = work / "gpu-tests.log"
    process = harness.run_sampled(command, log_file, timeout_seconds=timeout_seconds, check=False)
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    if junit.exists():
        for suite in ElementTree.parse(junit).getroot().iter("testsuite"):
            for key in counts:
                counts[key] += int(suite.get(key, 0))
    return {
        "command": " ".join(command),
        "returncode": None if process["timed_out"] else process["returncode"],
        "timed_out": process["timed_out"],
        "seconds": process["process_wall_seconds"],
        "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
        "failed": counts["failures"],
        "errors": counts["errors"],
        "skipped": counts["skipped"],
        "output_tail": log_file.read_text(encoding="utf-8", errors="replace")[-4000:],
    }


# --- Figures -------------------------------------------------------------------------------------


def training_flops_per_audio_second(config: Any, num_samples: np.ndarray) -> float:
    """Training FLOPs per second of audio over these clips, by the formula in the docstring."""
    frames = num_samples.astype(np.float64)
    conv = np.zeros_like(frames)
    channels_in = 1
    for channels, kernel, stride in zip(
        config.conv_dim, config.conv_kernel, config.conv_stride, strict=True
    ):
        frames = np.floor((frames - kernel) / stride) + 1
        conv += 2 * channels_in * channels * kernel * frames
        channels_in = channels
    hidden, groups = config.hidden_size, config.num_conv_pos_embedding_groups
    per_frame = 2 * channels_in * hidden
    per_frame += 2 * hidden * (hidden // groups) * config.num_conv_pos_embeddings
    layer = 2 * (4 * hidden**2 + 2 * hidden * config.intermediate_size)
    per_frame += config.num_hidden_layers * layer + 2 * hidden * config.vocab_size
    attention = config.num_hidden_layers * 4 * frames**2 * hidden
    trainable = per_frame * frames + attention
    return float((conv + 3 * trainable).sum() / (num_samples.sum() / SAMPLING_RATE))


def preset_flops(preset: str, dataset: Path) -> float:
    """training_flops_per_audio_second for a preset with the dataset's vocabulary and clips."""
    from transformers import Wav2Vec2Config

    from preprocess.shard_format import ShardDataset
    from train.wav2vec2_model import PRESETS

    shards = ShardDataset(str(dataset))
    config = Wav2Vec2Config(**PRESETS[preset], vocab_size=len(shards.vocab))
    return training_flops_per_audio_second(config, shards.num_samples)


def summarize(
    run: dict[str, Any], warmup_steps: int, flops: float, peak_flops: float | None
) -> dict[str, Any]:
    """A run's figures over its timed steps (its records are kept beside them)."""
    statistics = harness.step_statistics(run["records"], warmup_steps)
    speed = statistics["audio_seconds_per_second"]
    return {
        "ok": True,
        **statistics,
        "mfu": flops * speed / peak_flops if peak_flops else None,
        **{key: value for key, value in run.items() if key != "process"},
        "wall_seconds": run["process"]["process_wall_seconds"],
        "peak_host_pss_gib": run["process"]["peak_pss_gib"],
    }


def build_rows(runs: dict[str, dict[str, Any]], where: str) -> list[dict[str, Any]]:
    """Per preset where both systems ran: each of FIGURES that both have."""
    rows = []
    for preset, systems in runs.items():
        ours, other = systems.get("ours", {}), systems.get("hf_trainer", {})
        if ours.get("ok") and other.get("ok"):
            figures = [(f"{metric}, {preset}, {where}", *rest) for metric, *rest in FIGURES]
            rows += figure_rows(ours, other, SYSTEMS["hf_trainer"], figures)
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    shared = {"max_batch_seconds": 200.0, "dataloader_num_workers": 2, "seed": 0, "work_dir": None}
    quick = {"presets": ["base"], "steps": 5, "warmup_steps": 2}
    args = harness.parse_args(NAME, __doc__, argv, shared, quick, own_options)
    if args.dry_run:
        args.quick, args.presets, args.steps, args.warmup_steps = True, ["tiny"], 2, 1
        args.max_batch_seconds, args.audio_minutes, args.test_timeout = 8.0, 1.0, 120.0
        args.dataloader_num_workers = 1
        # Set before torch initializes CUDA here or in any child.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    args.precision = "fp32" if args.dry_run else "bf16"
    if args.install_wheels:
        install_wheels(args.install_wheels)

    started = time.perf_counter()
    device = harness.device_description(1)
    args.gpu = device["kind"] == "cuda"
    where = f"1 {'GPU' if args.gpu else 'CPU process'}, {args.precision}"
    peak_flops = next((f for name, f in PEAK_BF16_FLOPS.items() if name in device["name"]), None)
    peak_flops = peak_flops if args.precision == "bf16" else None
    runs: dict[str, dict[str, Any]] = {}
    settings = {
        key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()
    }
    settings |= {"peak_flops": peak_flops, "budget_seconds": BUDGET_SECONDS}
    details: dict[str, Any] = {"device": device, "settings": settings, "runs": runs}

    def stamp() -> None:
        details["seconds"] = time.perf_counter() - started
        details["within_budget"] = details["seconds"] <= BUDGET_SECONDS

    def save() -> None:
        stamp()
        write_results(NAME, __doc__, args, argv, build_rows(runs, where), details)

    with harness.work_directory(args.work_dir) as work:
        print(f"[{NAME}] pytest tests/gpu", flush=True)
        details["tests"] = run_gpu_tests(work, args.test_timeout)
        save()
        lengths = benchmark_clip_lengths(args.audio_minutes, args.seed)
        dataset = write_synthetic_dataset(work / "dataset", lengths, args.seed)
        budget = int(args.max_batch_seconds * SAMPLING_RATE)
        hf_batch_size = mean_matched_batch_size(lengths, budget, args.seed)
        details["dataset"] = {
            "clips": len(lengths),
            "audio_minutes": float(lengths.sum()) / SAMPLING_RATE / 60,
            "mean_clip_seconds": float(lengths.mean()) / SAMPLING_RATE,
            "hf_per_device_train_batch_size": hf_batch_size,
        }
        for preset in args.presets:
            flops = preset_flops(preset, dataset)
            runs[preset] = {"training_flops_per_audio_second": flops}
            for system, name in SYSTEMS.items():
                print(f"[{NAME}] {preset}: {name}", flush=True)
                try:
                    with device_memory_peak(args.gpu) as memory:
                        if system == "ours":
                            run = run_ours(preset, dataset, work, args)
                        else:
                            run = run_hf_trainer(preset, dataset, hf_batch_size, work, args)
                    run |= memory
                    runs[preset][system] = summarize(run, args.warmup_steps, flops, peak_flops)
                except (RuntimeError, OSError, ValueError, KeyError) as error:
                    runs[preset][system] = {"ok": False, "error": str(error)[-3000:]}
                    print(f"[{NAME}] failed: {str(error)[:300]}", flush=True)
                save()
    stamp()
    tests = details["tests"]
    print(
        f"tests/gpu: {tests['passed']} passed, {tests['failed']} failed, {tests['errors']} errors, "
        f"{tests['skipped']} skipped{' (timed out)' if tests['timed_out'] else ''}"
    )
    rows = build_rows(runs, where)
    finish(NAME, __doc__, args, argv, rows, details)
    print(f"{details['seconds']:.0f} s (budget {BUDGET_SECONDS} s)")
    runs_ok = all(runs[p][s].get("ok") for p in runs for s in SYSTEMS)
    return 0 if tests["returncode"] == 0 and runs_ok else 1


if __name__ == "__main__":
    sys.exit(main())
