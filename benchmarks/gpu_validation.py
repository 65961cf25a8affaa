"""GPU validation in one command: tests/gpu, then our trainer against the HF Trainer on one GPU.

    python -m benchmarks.gpu_validation             # about 5 minutes on one H200
    python -m benchmarks.gpu_validation --dry_run   # tiny, on CPU: shows that it starts

`pytest tests/gpu` first, with a time limit. Then per preset (`base`, `large`, random init,
frozen feature encoder), warm-up then timed steps on synthetic clips of Common Voice-like
lengths: our trainer through the deepspeed launcher with ZeRO-2, and the HF Trainer (bf16
autocast, no DeepSpeed; hf_trainer_baseline.py --dataset) on the same shards with
length-grouped batches of the mean-matched size (batching_padding.py). Figures: those of
harness.training_figures; peak GPU memory in use, device-wide; MFU = training FLOPs per audio
second × audio s/s / the device's dense bf16 peak (H200: 989 TFLOP/s; empty elsewhere). The JSON
is written after each stage. The GPU machine lacks Ray, audio codecs and a package index:
nothing here loads the first two, and `bash benchmarks/gpu_wheels.sh` builds the wheels it
lacks into gpu_wheels/, for `--install_wheels gpu_wheels`.
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
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import harness, hf_trainer_baseline
from benchmarks.batching_padding import mean_matched_batch_size
from benchmarks.benchmark_results import REPO_ROOT, figure_rows, finish
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
    dry_run = "tiny, on CPU with CUDA hidden: fp32, the tiny preset, 3 steps; implies --quick"
    parser.add_argument("--dry_run", action="store_true", help=dry_run)
    presets = ("tiny", "base", "large")
    parser.add_argument("--presets", nargs="+", choices=presets, default=["base", "large"])
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup_steps", type=int, default=10, help="steps before timing")
    parser.add_argument("--audio_minutes", type=float, default=15.0, help="synthetic dataset")
    parser.add_argument("--test_timeout", type=float, default=180.0, help="seconds for tests/gpu")
    wheels = "first pip-install DIR's wheels, offline"
    parser.add_argument("--install_wheels", type=Path, metavar="DIR", help=wheels)


def synthetic_clip(num_samples: int, rng: np.random.Generator) -> np.ndarray:
    """A voiced-speech-like float32 signal: a gliding harmonic tone over a little noise."""
    seconds = np.arange(num_samples) / SAMPLING_RATE
    vibrato = 1 + 0.1 * np.sin(2 * np.pi * rng.uniform(1, 4) * seconds)
    phase = 2 * np.pi * np.cumsum(rng.uniform(90, 220) * vibrato) / SAMPLING_RATE
    tone = np.sin(phase) + np.sin(2 * phase) / 2 + np.sin(3 * phase) / 3
    return (0.1 * tone + 0.01 * rng.standard_normal(num_samples)).astype(np.float32)


def write_synthetic_dataset(directory: Path, num_samples: Sequence[int], seed: int) -> Path:
    """A dataset directory of synthetic clips, written as preprocess/prepare_dataset.py writes one:
    staged shards from ShardWriter, then commit_run (length index, vocab.json, dataset.json)."""
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    run_id = f"synthetic-seed{seed}"
    schema = shard_format.shard_schema([])
    writer = shard_format.ShardWriter(
        str(directory / shard_format.STAGING_DIR / run_id),
        f"shard-{run_id}",
        schema,
        256 * 2**20,
        ROWS_PER_RECORD_BATCH,
    )
    lengths = [int(n) for n in num_samples]
    # Random words at about speech rate: 2.5 words, some 13 characters, per second.
    words = [range(max(1, round(2.5 * n / SAMPLING_RATE))) for n in lengths]
    transcripts = [
        " ".join("".join(rng.choice(ALPHABET, rng.integers(2, 8))) for _ in w) for w in words
    ]
    for row, length in enumerate(lengths):
        text = transcripts[row]
        writer.add(
            {"id": f"{run_id}-{row:06d}", "text": text, "sentence": text},
            synthetic_clip(length, rng),
        )
    seconds, wall_seconds = sum(lengths) / SAMPLING_RATE, time.perf_counter() - started
    # Run id, manifest, rows accepted, rejected and skipped (as already processed), seconds.
    run = shard_format.RunRecord(run_id, "synthetic", len(lengths), 0, 0, seconds, wall_seconds)
    options = {"sampling_rate": SAMPLING_RATE, "synthetic_seed": seed}
    shard_format.commit_run(
        str(directory), None, writer.close(), [], build_vocab(transcripts), options, run
    )
    return directory


@contextlib.contextmanager
def device_memory_peak() -> Iterator[dict[str, Any]]:
    """Yields a dict that gets "peak_device_memory_gib": GPU 0's peak use above its level before,
    device-wide (every process on it), polled every 0.1 s."""
    import torch

    def used() -> int:
        free, total = torch.cuda.mem_get_info(0)
        return total - free

    result, baseline, peak, stop = {}, used(), [0], threading.Event()

    def poll() -> None:
        while not stop.wait(0.1):
            peak[0] = max(peak[0], used() - baseline)

    thread = threading.Thread(target=poll, name="device-memory-poll", daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        result["peak_device_memory_gib"] = peak[0] / 2**30


def run_system(
    system: str, preset: str, dataset: Path, batch_size: int, work: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """One system's timed run on one rank, its figures (with MFU) and the device memory peak."""
    from transformers import Wav2Vec2Config

    from preprocess.shard_format import ShardDataset
    from train.wav2vec2_model import PRESETS

    steps = args.warmup_steps + args.steps
    extra: dict[str, Any] = {}
    no_gpu = contextlib.nullcontext({"peak_device_memory_gib": None})
    with device_memory_peak() if args.gpu else no_gpu as memory:
        if system == "ours":
            config = harness.ds_config(2, args.precision)
            launch = (preset, config, steps, args.max_batch_seconds, 1)
            workers = {"dataloader_num_workers": args.dataloader_num_workers}
            run = harness.trainer_run(dataset, work / f"ours-{preset}", *launch, **workers)
        else:
            options = ["--dataset", str(dataset), "--model", preset, "--seed", str(args.seed)]
            options += ["--per_device_train_batch_size", str(batch_size), "--max_steps", str(steps)]
            options += ["--dataloader_num_workers", str(args.dataloader_num_workers)]
            options += ["--bf16"] if args.precision == "bf16" else []
            # One GPU, as ours: the Trainer would spread over all visible GPUs with DataParallel.
            first_gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
            gpu = {"environment": {"CUDA_VISIBLE_DEVICES": first_gpu}} if args.gpu else {}
            run = hf_trainer_baseline.run_job(work, f"hf-{preset}", options, **gpu)
            extra = {"optimizer": run["optimizer"], "per_device_train_batch_size": batch_size}
    figures = harness.training_figures(run, args.warmup_steps)
    shards = ShardDataset(str(dataset))
    config = Wav2Vec2Config(**PRESETS[preset], vocab_size=len(shards.vocab))
    flops = training_flops_per_audio_second(config, shards.num_samples)
    speed = figures["audio_seconds_per_second"]
    mfu = flops * speed / args.peak_flops if args.peak_flops else None
    return {**figures, **memory, "mfu": mfu, "training_flops_per_audio_second": flops, **extra}


def run_gpu_tests(work: Path, timeout_seconds: float) -> dict[str, Any]:
    """`pytest tests/gpu` in a subprocess, killed past `timeout_seconds`; counts from its JUnit
    XML. --confcutdir keeps tests/conftest.py (Ray, espeak-ng speech), which needs more, out."""
    junit, log_file = work / "gpu-tests.xml", work / "gpu-tests.log"
    command = [sys.executable, "-m", "pytest", "--confcutdir", str(TESTS_DIR), str(TESTS_DIR)]
    command += ["-p", "no:cacheprovider", f"--junitxml={junit}"]
    process = harness.run_sampled(command, log_file, timeout_seconds=timeout_seconds, check=False)
    counts = dict.fromkeys(("tests", "failures", "errors", "skipped"), 0)
    suites = ElementTree.parse(junit).getroot().iter("testsuite") if junit.exists() else []
    for suite in suites:
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


def training_flops_per_audio_second(config: Any, num_samples: np.ndarray) -> float:
    """Training FLOPs per second of audio over these clips, 2 per multiply-add of convolutions
    and matrix products: the frozen conv encoder's forward once, the rest three times.

    Conv layer i (kernel k, stride s, C_{i-1} -> C_i channels, C_0 = 1) over L_i = floor((L_{i-1}
    - k) / s) + 1 frames (L_0 = samples): 2·C_{i-1}·C_i·k·L_i. Per frame of T (hidden size h, FFN
    f, V outputs, positional conv K in g groups): projection 2·C·h, positional conv 2·h·(h/g)·K,
    each layer 2·(4h² + 2hf) + 4·T·h, head 2·h·V."""
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
    shared = {"max_batch_seconds": 200.0, "dataloader_num_workers": 2, "seed": 0, "work_dir": None}
    quick = {"presets": ["base"], "steps": 5, "warmup_steps": 2}
    args = harness.parse_args(NAME, __doc__, argv, shared, quick, own_options)
    if args.dry_run:
        args.quick, args.presets, args.steps, args.warmup_steps = True, ["tiny"], 2, 1
        args.max_batch_seconds, args.audio_minutes, args.test_timeout = 8.0, 1.0, 120.0
        args.dataloader_num_workers = 1
        # Set before torch initializes CUDA here or in any child.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    if args.install_wheels:  # what benchmarks/gpu_wheels.sh built; present packages stay
        pip = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links"]
        requirements = ["-r", str(args.install_wheels / "requirements.txt")]
        subprocess.run([*pip, str(args.install_wheels), *requirements], check=True)
        importlib.invalidate_caches()

    started = time.perf_counter()
    device = harness.device_description(1)
    args.gpu, args.precision = device["kind"] == "cuda", "fp32" if args.dry_run else "bf16"
    peak = next((flops for name, flops in PEAK_BF16_FLOPS.items() if name in device["name"]), None)
    args.peak_flops = peak if args.precision == "bf16" else None
    where = f"1 {'GPU' if args.gpu else 'CPU process'}, {args.precision}"
    runs: dict[str, dict[str, Any]] = {}
    details: dict[str, Any] = {"device": device, "runs": runs}

    def save(final: bool = False) -> None:
        details["seconds"] = time.perf_counter() - started
        details["within_budget"] = details["seconds"] <= BUDGET_SECONDS
        finish(args, build_rows(runs, where), details, final)

    with harness.work_directory(args.work_dir) as work:
        print(f"[{NAME}] pytest tests/gpu", flush=True)
        details["tests"] = tests = run_gpu_tests(work, args.test_timeout)
        save()
        seconds = args.audio_minutes * 60
        # Common Voice-like clips, just enough for --audio_minutes (each lasts 1 s or more).
        lengths = harness.common_voice_like_lengths(math.ceil(seconds) + 1, args.seed)
        lengths = lengths[: int(np.searchsorted(np.cumsum(lengths), seconds * SAMPLING_RATE)) + 1]
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
            runs[preset] = {}
            for system, name in SYSTEMS.items():
                print(f"[{NAME}] {preset}: {name}", flush=True)
                measure = partial(run_system, system, preset, dataset, hf_batch_size, work, args)
                runs[preset][system] = harness.attempt(NAME, measure)
                save()
    counts = ", ".join(f"{tests[key]} {key}" for key in ("passed", "failed", "errors", "skipped"))
    print(f"tests/gpu: {counts}{' (timed out)' if tests['timed_out'] else ''}")
    save(final=True)
    print(f"{details['seconds']:.0f} s (budget {BUDGET_SECONDS} s)")
    runs_ok = all(run["ok"] for systems in runs.values() for run in systems.values())
    return 0 if tests["returncode"] == 0 and runs_ok else 1


if __name__ == "__main__":
    sys.exit(main())
