"""GPU validation in one command and one deadline: tests/gpu, then our trainer against the HF
Trainer on one GPU.

    python -m benchmarks.gpu_validation --install_wheels gpu_wheels   # 8 minutes at most
    python -m benchmarks.gpu_validation --dry_run   # tiny, on CPU: shows that it starts

Stages, in order: the wheel install (with --install_wheels), `pytest tests/gpu`, the synthetic
dataset, then per preset (`base` before `large`, so that a cut still leaves base's figures) our
trainer and the HF Trainer. One wall-clock deadline, --deadline_s from the process's start, bounds
it all: each subprocess is killed at its own limit or at the deadline, whichever comes first, and
a stage with too little time left is not started. Each stage's outcome (ok; failed, with its
error; timed_out at its own limit; cut by the deadline) goes into the JSON, which is written
before the first stage and after each, so whatever ran comes back.

Per preset (random init, so the feature encoder trains), warm-up then timed steps on synthetic
clips of Common Voice-like lengths: our trainer through the deepspeed launcher with ZeRO-2, and
the HF Trainer (bf16 autocast, no DeepSpeed; hf_trainer_baseline.py --dataset) on the same shards
with length-grouped batches of the mean-matched size (batching_padding.py). Figures: those of
harness.training_figures; peak GPU memory in use, device-wide; MFU = training FLOPs per audio
second × audio s/s / the device's dense bf16 peak (H100 SXM and H200: 989 TFLOP/s; empty
elsewhere). The GPU machine lacks Ray, audio codecs and a package index: nothing here loads the
first two, and `bash benchmarks/gpu_wheels.sh` builds the wheels it lacks into gpu_wheels/, for
`--install_wheels gpu_wheels`, which installs only what the machine lacks.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import itertools
import math
import os
import re
import shlex
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from packaging.requirements import Requirement

from benchmarks import harness, hf_trainer_baseline
from benchmarks.batching_padding import mean_matched_batch_size
from benchmarks.benchmark_results import REPO_ROOT, figure_rows, finish
from benchmarks.harness import SAMPLING_RATE
from benchmarks.harness import launch_trainer as launch_trainer  # tests/gpu launch through here
from preprocess import shard_format
from preprocess.text_normalization import build_vocab

NAME = "gpu_validation"
TESTS_DIR = REPO_ROOT / "tests" / "gpu"
SYSTEMS = {
    "ours": "ours (deepspeed launcher, ZeRO-2)",
    "hf_trainer": "HF Trainer (no DeepSpeed), length-grouped mean-matched batches",
}
# Dense bf16 tensor-core peak by a pattern of torch's device name; MFU stays empty elsewhere.
# NVIDIA's H100 and H200 Tensor Core GPU datasheets give "BF16 Tensor Core 1,979 teraFLOPS" with
# sparsity for the H100 SXM and the H200 SXM alike; dense is half, 989 TFLOP/s. torch names them
# "NVIDIA H100 80GB HBM3" and "NVIDIA H200". The PCIe and NVL boards have lower peaks and the
# GH200 is another product: none of them matches.
PEAK_BF16_FLOPS = {r"\bH100 (80GB HBM3|SXM)": 989e12, r"\bH200\b(?! NVL)": 989e12}
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
# Fewest seconds worth starting a stage with: with less it is cut, not started only to be killed.
# A tiny trainer launch takes 10 s to its first step on 2 CPUs; a GPU adds CUDA's and NCCL's start.
MIN_STAGE_SECONDS = {"install": 10.0, "tests": 60.0, "dataset": 10.0, "run": 30.0}
INSTALL_TIMEOUT_SECONDS = 120.0
# Kept back from every subprocess's limit: the last JSON and plot are written before the deadline.
FINISH_SECONDS = 5.0
# tests/gpu's per-test verbose line, "tests/gpu/x.py::test[id] PASSED  [ 5%]", written as it ends.
OUTCOME_LINE = re.compile(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b", re.M)
# What pytest -v has written of a test when it starts: the test's id, its outcome to follow.
STARTED_LINE = re.compile(r"^(\S+::\S+) ?$")


def own_options(parser: argparse.ArgumentParser) -> None:
    dry_run = "tiny, on CPU with CUDA hidden: fp32, the tiny preset, 3 steps; implies --quick"
    parser.add_argument("--dry_run", action="store_true", help=dry_run)
    presets = ("tiny", "base", "large")
    parser.add_argument("--presets", nargs="+", choices=presets, default=["base", "large"])
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup_steps", type=int, default=5, help="steps before timing")
    parser.add_argument("--audio_minutes", type=float, default=15.0, help="synthetic dataset")
    deadline = "seconds from this process's start to the end of the whole validation"
    parser.add_argument("--deadline_s", type=float, default=480.0, help=deadline)
    tests = "seconds for tests/gpu (five trainer launches)"
    parser.add_argument("--test_timeout", type=float, default=270.0, help=tests)
    parser.add_argument("--run_timeout", type=float, default=150.0, help="seconds per timed run")
    wheels = "first pip-install, offline, what DIR's requirements.txt names and this machine lacks"
    parser.add_argument("--install_wheels", type=Path, metavar="DIR", help=wheels)


@dataclass(frozen=True)
class Deadline:
    """The validation's one wall-clock deadline: `seconds` after `started` (Unix time)."""

    started: float
    seconds: float
    clock: Callable[[], float] = time.time

    @classmethod
    def from_process_start(cls, seconds: float) -> Deadline:
        """Counted from this process's start, so that its imports count too."""
        return cls(psutil.Process().create_time(), seconds)

    def elapsed(self) -> float:
        return self.clock() - self.started

    def left(self) -> float:
        """Seconds a stage may still take: to the deadline, less what finishing takes."""
        return self.seconds - FINISH_SECONDS - self.elapsed()


@dataclass
class Stages:
    """The validation's stages in order, each with its outcome; `save` runs after each stage, so
    that the JSON on disk is never more than one stage behind. A stage still "pending" there was
    not reached: the process was killed from outside."""

    names: Sequence[str]
    deadline: Deadline
    save: Callable[[], None]
    records: list[dict[str, Any]] = field(init=False)

    def __post_init__(self) -> None:
        self.records = [{"name": name, "status": "pending"} for name in self.names]

    def run(self, name: str, min_seconds: float, cap: float, work: Callable[[float], Any]) -> None:
        """work(limit), limit being `cap` or, if less, the seconds left before the deadline; with
        fewer than `min_seconds` left it is not started ("cut"). A failure is recorded, not raised,
        so that the next stage runs: "timed_out" if a subprocess was killed at `cap`, "cut" if at
        the deadline, else "failed" (the error's last 3000 characters, a log's tail included)."""
        record = self.records[self.names.index(name)]
        left = self.deadline.left()
        if left < min_seconds:
            record |= {"status": "cut", "reason": f"{max(left, 0):.0f} s left of {min_seconds:g}"}
        else:
            limit = min(cap, left)
            print(f"[{NAME}] {name} (at most {limit:.0f} s)", flush=True)
            started = self.deadline.clock()
            try:
                work(limit)
                record["status"] = "ok"
            except harness.RunTimedOut as error:
                status = "cut" if limit < cap else "timed_out"
                record |= {"status": status, "error": str(error)[-3000:]}
            except Exception as error:  # recorded, whatever it is: the other stages go on
                record |= {"status": "failed", "error": f"{type(error).__name__}: {error}"[-3000:]}
            record["seconds"] = self.deadline.clock() - started
        print(f"[{NAME}] {name}: {record['status']}", flush=True)
        self.save()

    def named(self, *statuses: str) -> list[str]:
        """The stages whose status is one of `statuses`, in order."""
        return [record["name"] for record in self.records if record["status"] in statuses]


def peak_bf16_flops(device_name: str) -> float | None:
    """The device's dense bf16 peak from PEAK_BF16_FLOPS, None if not listed."""
    return next(
        (peak for name, peak in PEAK_BF16_FLOPS.items() if re.search(name, device_name)), None
    )


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
        clip = synthetic_clip(length, rng)
        statistics = shard_format.audio_statistics(clip)
        assert statistics is not None  # a sum of sines and noise is finite
        writer.add({"id": f"{run_id}-{row:06d}", "text": text, "sentence": text}, clip, *statistics)
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


def missing_requirements(requirements_file: Path) -> tuple[list[str], dict[str, str]]:
    """(the requirements whose package is not installed, {package: version} of those that are).
    An installed package is kept whatever its version: the image's pytest, with the plugins it
    autoloads, and its torch stack are what the validation is meant to run on."""
    missing, present = [], {}
    for line in requirements_file.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name = Requirement(line).name
        try:
            present[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(line.strip())
    return missing, present


def install_wheels(directory: Path, requirements: list[str], log_file: Path, limit: float) -> None:
    """pip-installs `requirements` offline from `directory`'s wheels, killed after `limit` s."""
    if requirements:
        pip = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(directory)]
        harness.run_sampled([*pip, *requirements], log_file, timeout_seconds=limit)
        importlib.invalidate_caches()


def parse_test_outcomes(log: str) -> tuple[dict[str, str], str | None]:
    """({test id: outcome} from pytest -v output, the test it was in when it stopped or None)."""
    outcomes = dict(OUTCOME_LINE.findall(log))
    lines = log.rstrip("\n").splitlines()
    last = STARTED_LINE.match(lines[-1]) if lines else None
    return outcomes, last.group(1) if last and last.group(1) not in outcomes else None


def run_gpu_tests(work: Path, limit: float, tests_dir: Path = TESTS_DIR) -> dict[str, Any]:
    """`pytest -v` of `tests_dir` in a subprocess killed after `limit` seconds. Every test's
    outcome is read from its -v line, which pytest flushes as the test ends, so the outcomes of
    those that ended survive a kill, and the test it was killed in is named. --confcutdir keeps
    tests/conftest.py (Ray, espeak-ng speech), which needs more, out."""
    log_file = work / "gpu-tests.log"
    command = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider"]
    command += ["--confcutdir", str(tests_dir), str(tests_dir)]
    process = harness.run_sampled(command, log_file, timeout_seconds=limit, check=False)
    log = log_file.read_text(encoding="utf-8", errors="replace")
    outcomes, stopped_in = parse_test_outcomes(log)
    counts = Counter(outcomes.values())
    return {
        "command": shlex.join(command),
        "returncode": process["returncode"],
        "timed_out": process["timed_out"],
        "seconds": process["process_wall_seconds"],
        "passed": counts["PASSED"],
        "failed": counts["FAILED"],
        "errors": counts["ERROR"],
        "skipped": counts["SKIPPED"],
        "outcomes": outcomes,
        "stopped_in": stopped_in,
        "output_tail": log[-8000:],
    }


def raise_for_tests(tests: dict[str, Any], limit: float) -> None:
    """Raises RunTimedOut if tests/gpu was killed, RuntimeError if it failed."""
    if tests["timed_out"]:
        where = f"in {tests['stopped_in']}" if tests["stopped_in"] else "between tests"
        raise harness.RunTimedOut(f"tests/gpu killed after its {limit:.0f} s limit, {where}")
    if tests["returncode"] != 0:
        failing = [
            test for test, outcome in tests["outcomes"].items() if outcome in ("FAILED", "ERROR")
        ]
        raise RuntimeError(f"pytest exit code {tests['returncode']}: {failing}")


def training_flops_per_audio_second(
    config: Any, num_samples: np.ndarray, encoder_trains: bool
) -> float:
    """Training FLOPs per second of audio over these clips, 2 per multiply-add of convolutions
    and matrix products: what trains three times (forward, then gradients of inputs and of
    weights), the conv feature encoder once if frozen.

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
    transformer = per_frame * frames + attention
    total = (3 if encoder_trains else 1) * conv + 3 * transformer
    return float(total.sum() / (num_samples.sum() / SAMPLING_RATE))


@dataclass(frozen=True)
class SyntheticDataset:
    """The synthetic dataset both systems train on, and the HF Trainer's batch size for it."""

    path: Path
    hf_batch_size: int
    summary: dict[str, Any]


def prepare_dataset(
    directory: Path, audio_minutes: float, budget: int, seed: int
) -> SyntheticDataset:
    """Common Voice-like clips, just enough for `audio_minutes` (each lasts 1 s or more), and the
    mean-matched batch size of `budget` padded samples per batch."""
    seconds = audio_minutes * 60
    lengths = harness.common_voice_like_lengths(math.ceil(seconds) + 1, seed)
    lengths = lengths[: int(np.searchsorted(np.cumsum(lengths), seconds * SAMPLING_RATE)) + 1]
    path = write_synthetic_dataset(directory, lengths, seed)
    batch_size = mean_matched_batch_size(lengths, budget, seed)
    summary = {
        "clips": len(lengths),
        "audio_minutes": float(lengths.sum()) / SAMPLING_RATE / 60,
        "mean_clip_seconds": float(lengths.mean()) / SAMPLING_RATE,
        "hf_per_device_train_batch_size": batch_size,
    }
    return SyntheticDataset(path, batch_size, summary)


def run_system(
    system: str,
    preset: str,
    dataset: SyntheticDataset,
    work: Path,
    args: argparse.Namespace,
    limit: float,
) -> dict[str, Any]:
    """One system's timed run on one rank, killed after `limit` seconds: its figures (with MFU)
    and the device memory peak."""
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
            options = {"dataloader_num_workers": args.dataloader_num_workers}
            options["timeout_seconds"] = limit
            run = harness.trainer_run(dataset.path, work / f"ours-{preset}", *launch, **options)
        else:
            options = ["--dataset", str(dataset.path), "--model", preset, "--seed", str(args.seed)]
            options += ["--per_device_train_batch_size", str(dataset.hf_batch_size)]
            options += ["--max_steps", str(steps)]
            options += ["--dataloader_num_workers", str(args.dataloader_num_workers)]
            options += ["--bf16"] if args.precision == "bf16" else []
            # One GPU, as ours: the Trainer would spread over all visible GPUs with DataParallel.
            first_gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
            gpu = {"environment": {"CUDA_VISIBLE_DEVICES": first_gpu}} if args.gpu else {}
            label = f"hf-{preset}"
            run = hf_trainer_baseline.run_job(work, label, options, timeout_seconds=limit, **gpu)
            extra = {"optimizer": run["optimizer"]}
            extra["per_device_train_batch_size"] = dataset.hf_batch_size
    figures = harness.training_figures(run, args.warmup_steps)
    shards = ShardDataset(str(dataset.path))
    config = Wav2Vec2Config(**PRESETS[preset], vocab_size=len(shards.vocab))
    # Presets are random init, and build_model trains a random-init feature encoder (neither
    # system passes --freeze_feature_encoder).
    flops = training_flops_per_audio_second(config, shards.audio_lengths, preset in PRESETS)
    speed = figures["audio_seconds_per_second"]
    mfu = flops * speed / args.peak_flops if args.peak_flops else None
    return {**figures, **memory, "mfu": mfu, "training_flops_per_audio_second": flops, **extra}


def build_rows(runs: dict[str, dict[str, Any]], where: str) -> list[dict[str, Any]]:
    """Per preset where both systems ran: each of FIGURES that both have."""
    rows = []
    for preset, systems in runs.items():
        if set(SYSTEMS) <= set(systems):
            figures = [(f"{metric}, {preset}, {where}", *rest) for metric, *rest in FIGURES]
            rows += figure_rows(
                systems["ours"], systems["hf_trainer"], SYSTEMS["hf_trainer"], figures
            )
    return rows


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    """The options, --dry_run's applied."""
    shared = {"max_batch_seconds": 200.0, "dataloader_num_workers": 2, "seed": 0, "work_dir": None}
    quick = {"presets": ["base"], "steps": 5, "warmup_steps": 2}
    args = harness.parse_args(NAME, __doc__, argv, shared, quick, own_options)
    if args.dry_run:
        args.quick, args.presets, args.steps, args.warmup_steps = True, ["tiny"], 2, 1
        args.max_batch_seconds, args.audio_minutes, args.test_timeout = 8.0, 1.0, 120.0
        args.dataloader_num_workers = 1
        # Set before torch initializes CUDA here or in any child.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    return args


class Validation:
    """The stages' work, each given the seconds it may take; what they find goes into `details`,
    the JSON's."""

    def __init__(self, args: argparse.Namespace, work: Path, details: dict[str, Any]) -> None:
        self.args, self.work, self.details = args, work, details
        self.dataset: SyntheticDataset | None = None

    def plan(self) -> list[tuple[str, float, float, Callable[[float], None]]]:
        """Every stage in order: (name, fewest seconds worth starting it with, its own limit,
        its work)."""
        args, minimum = self.args, MIN_STAGE_SECONDS
        install = ("install", minimum["install"], INSTALL_TIMEOUT_SECONDS, self.install)
        plan = [install] if args.install_wheels else []
        plan += [("tests/gpu", minimum["tests"], args.test_timeout, self.gpu_tests)]
        # In this process, so no limit stops it: its minimum keeps it from overrunning the deadline.
        plan += [("dataset", minimum["dataset"], math.inf, self.prepare_dataset)]
        for preset, system in itertools.product(args.presets, SYSTEMS):
            measure = partial(self.measure, preset, system)
            plan += [(f"{preset}/{system}", minimum["run"], args.run_timeout, measure)]
        return plan

    def install(self, limit: float) -> None:
        """--install_wheels: what the directory's requirements.txt names and this machine lacks."""
        directory = self.args.install_wheels.resolve()
        missing, present = missing_requirements(directory / "requirements.txt")
        self.details["install"] = {"installed": missing, "kept": present}
        install_wheels(directory, missing, self.work / "pip-install.log", limit)

    def gpu_tests(self, limit: float) -> None:
        self.details["tests"] = run_gpu_tests(self.work, limit)
        raise_for_tests(self.details["tests"], limit)

    def prepare_dataset(self, limit: float) -> None:
        args = self.args
        budget = int(args.max_batch_seconds * SAMPLING_RATE)
        directory = self.work / "dataset"
        self.dataset = prepare_dataset(directory, args.audio_minutes, budget, args.seed)
        self.details["dataset"] = self.dataset.summary

    def measure(self, preset: str, system: str, limit: float) -> None:
        if self.dataset is None:
            raise RuntimeError("no dataset: its stage did not finish")
        figures = run_system(system, preset, self.dataset, self.work, self.args, limit)
        self.details["runs"].setdefault(preset, {})[system] = figures


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    deadline = Deadline.from_process_start(args.deadline_s)
    device = harness.device_description(1)
    args.gpu, args.precision = device["kind"] == "cuda", "fp32" if args.dry_run else "bf16"
    args.peak_flops = peak_bf16_flops(device["name"]) if args.precision == "bf16" else None
    where = f"1 {'GPU' if args.gpu else 'CPU process'}, {args.precision}"
    details: dict[str, Any] = {"device": device, "deadline_s": args.deadline_s, "runs": {}}

    def save(final: bool = False) -> None:
        details["seconds"] = deadline.elapsed()
        details["stages"] = stages.records
        details["cut_stages"] = stages.named("cut", "pending")
        details["complete"] = not details["cut_stages"]
        finish(args, build_rows(details["runs"], where), details, final)

    with harness.work_directory(args.work_dir) as work:
        validation = Validation(args, work, details)
        plan = validation.plan()
        stages = Stages([name for name, *_ in plan], deadline, save)
        save()  # before the first stage: a JSON comes back whatever happens next
        for name, min_seconds, cap, stage in plan:
            stages.run(name, min_seconds, cap, stage)
    save(final=True)
    summary = ", ".join(f"{record['name']} {record['status']}" for record in stages.records)
    print(f"{deadline.elapsed():.0f} s of {args.deadline_s:g}: {summary}")
    return 0 if stages.named("ok") == list(stages.names) else 1


if __name__ == "__main__":
    sys.exit(main())
