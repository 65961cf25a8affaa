"""The harness every benchmark runs on: shared options, inputs and timed child processes
with their process trees sampled; results go through benchmark_results.py. Importing it loads
no Ray and no audio codec, which the GPU machine lacks."""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from benchmarks.benchmark_results import REPO_ROOT, RESULTS_DIR, machine_info
from benchmarks.process_tree import machine_cores, wait_sampled, wait_until_idle
from train.free_port import free_port

SAMPLING_RATE = 16_000
RUN_TIMEOUT_SECONDS = 3600
# What our trainer (and hf_trainer_baseline) logs torch.cuda.max_memory_allocated under, in GiB.
MEMORY_KEY = "max_memory_allocated_gib"
# Offline: nothing may look for models or datasets on the Hub.
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
# Common Voice-like clip lengths: lognormal with a 4.5 s median and sigma 0.35 (mean 4.8 s,
# 95 % between 2.3 and 8.9 s), redrawn outside [1, 10] s: the Common Voice recorder stops at
# 10 s and clips under a second are rejected at validation.
CV_MEDIAN_SECONDS, CV_SIGMA, CV_RANGE_SECONDS = 4.5, 0.35, (1.0, 10.0)
CV_DESCRIPTION = f"lognormal, median {CV_MEDIAN_SECONDS} s, sigma {CV_SIGMA}, redrawn outside "
CV_DESCRIPTION += "{:g}-{:g} s".format(*CV_RANGE_SECONDS)
# Options several benchmarks have, (type, help); each gives its defaults (a list: 1+ values).
SHARED_OPTIONS: dict[str, tuple[type, str]] = {
    "hours": (float, "demo corpus size(s) in hours"),
    "unique_hours": (float, "distinct audio synthesized per corpus, the rest hard links"),
    "seed": (int, "seed of corpora and samplers"),
    "num_cpus": (int, "Ray CPUs for preprocessing; None: all"),
    "object_store_memory": (int, "bytes of Ray's object store; None: Ray's default"),
    "dataset": (Path, "a prepared dataset instead of a demo corpus"),
    "max_batch_seconds": (float, "padded audio seconds per micro-batch"),
    "dataloader_num_workers": (int, "DataLoader workers"),
    "repeats": (int, "runs of each measurement; the least disturbed (or fastest) is kept"),
    "wait_for_idle": (float, "seconds to wait for an idle machine before each run"),
    "work_dir": (Path, "corpora, datasets and runs, kept for reuse; None: a temporary dir"),
}


def parse_args(
    name: str, doc: str | None, argv: list[str] | None, shared: dict, quick: dict, own: Callable
) -> argparse.Namespace:
    """Benchmark `name`'s options: the `shared` ones (name: default), its `own`, the output ones;
    --quick sets the options in `quick` (name: value), for a smoke run of a minute or two."""
    parser = argparse.ArgumentParser(
        prog=f"python -m benchmarks.{name}",
        description=(doc or "").split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for option, default in shared.items():
        kind, text = SHARED_OPTIONS[option]
        nargs = "+" if isinstance(default, list) else None
        parser.add_argument(f"--{option}", type=kind, nargs=nargs, default=default, help=text)
    own(parser)
    parser.add_argument("--output_dir", type=Path, default=RESULTS_DIR, help="JSON and PNG")
    parser.add_argument("--tag", default="", help="file name suffix, e.g. the machine")
    parser.add_argument("--quick", action="store_true", help="smoke run; -quick files")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.quick:
        vars(args).update(quick)
    args.benchmark = (name, doc, argv)  # for benchmark_results.finish
    return args


@contextlib.contextmanager
def work_directory(path: Path | None) -> Iterator[Path]:
    """`path` if given (kept afterwards, so corpora are reused), else a temporary directory."""
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="benchmark-") as temporary:
        yield Path(temporary)


def make_corpus(
    parent: Path, hours: float, unique_hours: float | None, seed: int, max_words: int | None = None
) -> Path:
    """A demo corpus under `parent` (reused if there) and a manifest of all its rows, all.tsv;
    `unique_hours` synthesized, the rest hard links, so that benchmarks read the page cache;
    `max_words` makes short clips (generate_corpus)."""
    # Imported here: the GPU machine imports this module and has no espeak-ng or audio codecs.
    from train.demo_corpus import SPLITS, generate_corpus

    unique = hours if unique_hours is None else min(unique_hours, hours)
    short = "" if max_words is None else f"-words{max_words}"
    directory = parent / f"corpus-{hours:g}h-unique{unique:g}h-seed{seed}{short}"
    manifest = directory / "all.tsv"
    if manifest.exists():
        return manifest
    generate_corpus(directory, hours=hours, unique_hours=unique, seed=seed, max_words=max_words)
    with open(manifest.with_suffix(".tmp"), "w", encoding="utf-8") as combined:
        for position, split in enumerate(SPLITS):
            lines = (directory / f"{split}.tsv").read_text(encoding="utf-8").splitlines(True)
            combined.writelines(lines if position == 0 else lines[1:])
    manifest.with_suffix(".tmp").replace(manifest)
    return manifest


def manifest_audio_files(manifest: Path) -> list[str]:
    """Audio file of every row, in manifest order, resolved as preprocessing resolves them."""
    with open(manifest, encoding="utf-8", newline="") as file:
        rows = csv.DictReader(file, delimiter="\t", quoting=csv.QUOTE_NONE)
        return [str(manifest.parent / "clips" / row["path"]) for row in rows]


def common_voice_like_lengths(count: int, seed: int) -> np.ndarray:
    """`count` clip lengths in samples from the truncated lognormal above."""
    rng = np.random.default_rng(seed)
    seconds = np.empty(0)
    while seconds.size < count:
        draws = rng.lognormal(np.log(CV_MEDIAN_SECONDS), CV_SIGMA, count)
        low, high = CV_RANGE_SECONDS
        seconds = np.concatenate([seconds, draws[(draws >= low) & (draws <= high)]])
    return np.round(seconds[:count] * SAMPLING_RATE).astype(np.int64)


def prepared_dataset(
    work: Path, args: argparse.Namespace, hours: float
) -> tuple[Path, Path, float]:
    """(manifest, dataset dir, preprocessing seconds from dataset.json) of the demo corpus of
    `hours` with args' --unique_hours and --seed, preprocessed if needed by our CLI (with args'
    --num_cpus and --object_store_memory) in its own process: Ray stays out of the benchmark,
    whose DataLoader workers fork."""
    from preprocess.shard_format import read_dataset_json

    manifest = make_corpus(work, hours, args.unique_hours, args.seed)
    dataset = work / f"dataset-{manifest.parent.name}"
    if not (dataset / "dataset.json").exists():
        command = [sys.executable, "-m", "preprocess.prepare_dataset", "--manifest", str(manifest)]
        command += ["--output_dir", str(dataset)]
        for option in ("num_cpus", "object_store_memory"):
            value = getattr(args, option, None)
            command += [f"--{option}", str(value)] if value else []
        run_sampled(command, work / f"{dataset.name}.log")
    metadata = read_dataset_json(str(dataset)) or {}
    return manifest, dataset, sum(run["wall_seconds"] for run in metadata.get("runs", []))


def args_dataset(args: argparse.Namespace, work: Path) -> tuple[Path, float | None]:
    """--dataset, or the demo corpus of --hours, preprocessed, with its preprocessing seconds."""
    if args.dataset is not None:
        return args.dataset, None
    _, dataset, seconds = prepared_dataset(work, args, args.hours)
    return dataset, seconds


class RunTimedOut(RuntimeError):
    """A run_sampled command killed at its time limit (a RuntimeError, as other failures)."""


def run_sampled(
    command: list[str],
    log_file: Path,
    environment: dict[str, str] | None = None,
    wait_for_idle: float = 0.0,
    timeout_seconds: float = RUN_TIMEOUT_SECONDS,
    check: bool = True,
) -> dict[str, Any]:
    """Runs `command` offline from the repository root, logging to `log_file`, sampling its tree;
    past `timeout_seconds` it is killed with its children, and with `check` a failure raises
    RuntimeError (RunTimedOut if killed) with the log's tail. The tree's summary, exit code and
    launch's Unix time."""
    busy_before = wait_until_idle(wait_for_idle)
    # Launchers run scripts by path, and the GPU machine does not install the project.
    python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, **OFFLINE, "PYTHONPATH": python_path, **(environment or {})}
    expired = threading.Event()
    launched = time.time()
    with open(log_file, "w", encoding="utf-8") as log:
        process = psutil.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=log)

        def expire() -> None:  # kills the child and everything it started
            expired.set()
            with contextlib.suppress(psutil.Error):
                for member in [*process.children(recursive=True), process]:
                    with contextlib.suppress(psutil.Error):
                        member.kill()

        watchdog = threading.Timer(timeout_seconds, expire)
        watchdog.start()
        try:
            summary = wait_sampled(process, interval_seconds=0.2)
        finally:
            watchdog.cancel()
    if check and process.returncode != 0:
        tail = log_file.read_text(encoding="utf-8", errors="replace")[-3000:]
        if expired.is_set():
            limit = f"killed after its {timeout_seconds:.0f} s limit"
            raise RunTimedOut(f"{limit}: {shlex.join(command)}\n{tail}")
        raise RuntimeError(f"exit code {process.returncode}: {shlex.join(command)}\n{tail}")
    summary |= {"returncode": process.returncode, "timed_out": expired.is_set()}
    return summary | {"launched_unix": launched, "machine_busy_before": busy_before}


def run_job(command: list[str], work: Path, label: str, **sampling: Any) -> tuple[dict, dict]:
    """Runs `command --result FILE` sampled (run_sampled's `sampling` options); returns (the JSON
    it wrote there, its tree summary)."""
    result_file = work / f"{label}-result.json"
    result_file.unlink(missing_ok=True)
    command = [*command, "--result", str(result_file)]
    process = run_sampled(command, work / f"{label}.log", **sampling)
    return json.loads(result_file.read_text(encoding="utf-8")), process


def ds_config(stage: int, precision: str) -> Path:
    """The repository's DeepSpeed config for a ZeRO stage and precision."""
    return REPO_ROOT / "ds_configs" / f"zero{stage}_{precision}.json"


def launch_trainer(
    dataset: Path,
    output_dir: Path,
    preset: str,
    config: Path,
    max_steps: int,
    max_batch_seconds: float,
    num_ranks: int | None,
    log_file: Path | None = None,
    dataloader_num_workers: int = 1,
    environment: dict[str, str] | None = None,
    wait_for_idle: float = 0.0,
    timeout_seconds: float = RUN_TIMEOUT_SECONDS,
) -> dict[str, Any]:
    """Our trainer as a user runs it, through the deepspeed launcher (`num_ranks` None: as one
    plain process), logging every step to output_dir/metrics.jsonl and its output to `log_file`
    (None: OUTPUT_DIR.log), killed past `timeout_seconds`; returns run_sampled's summary."""
    command = [sys.executable, "-m", "train.run_finetuning"]
    if num_ranks is not None:
        port = free_port()  # the launcher's default port may be taken by another job
        command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(num_ranks)]
        command += ["--master_port", str(port), str(REPO_ROOT / "train" / "run_finetuning.py")]
    options = [("deepspeed", config), ("train_dir", dataset), ("model_name_or_path", preset)]
    options += [("output_dir", output_dir), ("max_steps", max_steps), ("logging_steps", 1)]
    options += [("warmup_steps", 1), ("max_batch_seconds", max_batch_seconds)]
    options += [("dataloader_num_workers", dataloader_num_workers)]
    command += [f"--{key}={value}" for key, value in options]
    log_file = log_file or output_dir.with_suffix(".log")
    return run_sampled(command, log_file, environment, wait_for_idle, timeout_seconds)


def trainer_run(dataset: Path, output: Path, *launch: Any, **options: Any) -> dict[str, Any]:
    """launch_trainer(dataset, output, *launch, **options), then `output` removed (a large
    preset's checkpoints are gigabytes). "records": metrics.jsonl; "startup_phases" and
    "startup_seconds": startup.json, written at the end of the first optimizer step (its time:
    "first_step_unix"); "process": the tree's summary. hf_trainer_baseline.run_job's too."""
    shutil.rmtree(output, ignore_errors=True)
    try:
        process = launch_trainer(dataset, output, *launch, **options)
        lines = (output / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
        startup = output / "startup.json"
        phases = json.loads(startup.read_text(encoding="utf-8"))
        return {
            "records": [json.loads(line) for line in lines],
            "startup_seconds": phases.pop("total"),
            "startup_phases": phases,
            "first_step_unix": startup.stat().st_mtime,
            "process": process,
        }
    finally:
        shutil.rmtree(output, ignore_errors=True)


def step_statistics(records: list[dict[str, Any]], warmup_steps: int) -> dict[str, Any]:
    """Throughput over the steps after the warm-up: total audio over total time, median step."""
    measured = [r for r in records if "loss" in r and r["step"] > warmup_steps]
    if not measured:
        raise RuntimeError("metrics.jsonl has no step after the warm-up")
    # With logging_steps=1 each record covers one step: its audio = rate × step time.
    audio = sum(r["audio_seconds_per_second"] * r["step_time"] for r in measured)
    seconds = sum(r["step_time"] for r in measured)
    return {
        "measured_steps": len(measured),
        "audio_seconds_per_second": audio / seconds,
        "audio_seconds_per_step": audio / len(measured),
        "median_step_time": statistics.median(r["step_time"] for r in measured),
        "mean_padding_fraction": statistics.fmean(r["padding_fraction"] for r in measured),
        "all_losses_finite": all(math.isfinite(r["loss"]) for r in measured),
    }


def training_figures(run: dict[str, Any], warmup_steps: int) -> dict[str, Any]:
    """A trainer_run's (or hf_trainer_baseline.run_job's) figures: step_statistics, startup, the
    peak torch.cuda.max_memory_allocated the steps logged, wall time and peak PSS; its records."""
    allocated = [r.get(MEMORY_KEY) for r in run["records"]]
    return {
        **step_statistics(run["records"], warmup_steps),
        "startup_seconds": run["startup_seconds"],
        "startup_phases": run["startup_phases"],
        MEMORY_KEY: max(filter(None, allocated), default=None),
        "wall_seconds": run["process"]["process_wall_seconds"],
        "peak_host_pss_gib": run["process"]["peak_pss_gib"],
        "records": run["records"],
    }


def attempt(name: str, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """measure() with "ok": True, or for a run that failed (out of memory, unsupported dtype) the
    error with "ok": False, printed, not raised: the other runs go on."""
    try:
        return {"ok": True, **measure()}
    except (RuntimeError, OSError, ValueError, KeyError) as error:
        print(f"[{name}] failed: {str(error)[:300]}", flush=True)
        return {"ok": False, "error": str(error)[-3000:]}


def device_description(num_ranks: int) -> dict[str, Any]:
    """What the ranks ran on, as torch sees it."""
    import torch

    if torch.cuda.is_available():
        name, kind = torch.cuda.get_device_name(0), "cuda"
        extra = {"devices": torch.cuda.device_count(), "bf16": torch.cuda.is_bf16_supported()}
    else:
        name, kind = machine_info()["cpu_model"], "cpu"
        # run_finetuning.py gives each CPU rank an equal share of the cores.
        threads = max(1, (os.cpu_count() or 1) // num_ranks)
        extra = {"cores": machine_cores(), "torch_threads_per_rank": threads}
    return {"kind": kind, "name": name, "ranks": num_ranks, **extra}
