"""Training throughput (audio seconds per second, step time) by model size and ZeRO stage.

Runs train/run_finetuning.py through the deepspeed launcher exactly as a user would (every GPU;
on a machine without one, 2 CPU ranks over gloo), once per preset (random-init `tiny`, `base`,
`large`) × ZeRO stage (ds_configs/zero{1,2,3}_{bf16,fp32}.json) × precision, for a fixed number
of optimizer steps after a few warm-up steps, and reads the per-step records of metrics.jsonl.
Rows compare each stage with ZeRO-2 (the recommended default) for the same model and precision,
and bf16 with fp32 where both ran; configurations that fail (out of memory, unsupported dtype)
are recorded with their error and skipped.

    python -m benchmarks.training_throughput                      # tiny and base, ZeRO-1/2/3
    python -m benchmarks.training_throughput --presets large --stages 2 --steps 2
    python -m benchmarks.training_throughput --quick
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from benchmarks.benchmark_inputs import make_corpus, prepare_dataset, work_directory
from benchmarks.benchmark_results import (
    REPO_ROOT,
    add_output_arguments,
    grouped_bars,
    machine_info,
    new_figure,
    print_rows,
    result_row,
    save_figure,
    write_results,
)
from benchmarks.process_tree import wait_sampled, wait_until_idle

NAME = "training_throughput"
PRESETS = ("tiny", "base", "large")
STAGES = (1, 2, 3)
PRECISIONS = ("bf16", "fp32")
BASELINE_STAGE = 2
RUN_TIMEOUT_SECONDS = 3600
# Offline: nothing may look for models or datasets on the Hub.
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


# --- Shared with benchmarks/startup_time.py: datasets, trainer commands, timed children --------


def free_port() -> int:
    """A port for the launcher's rendezvous; its default may be taken by another job."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prepared_dataset(
    work: Path, hours: float, unique_hours: float, seed: int, num_cpus: int | None
) -> tuple[Path, Path, float]:
    """(manifest, dataset dir, preprocessing seconds) for a demo corpus, made if missing.

    The seconds are the runs' wall_seconds from dataset.json (Ray start included), so they are
    known for a reused dataset too. Named as benchmarks/loader_throughput.py names its datasets,
    so a shared --work_dir reuses corpora and datasets across benchmarks.
    """
    from preprocess.shard_format import read_dataset_json

    manifest = make_corpus(work, hours, unique_hours, seed)
    dataset = work / f"dataset-{manifest.parent.name}"
    if not (dataset / "dataset.json").exists():
        prepare_dataset(manifest, dataset, num_cpus, None)
    metadata = read_dataset_json(str(dataset)) or {}
    return manifest, dataset, sum(run["wall_seconds"] for run in metadata.get("runs", []))


def ds_config(stage: int, precision: str) -> Path:
    """The repository's DeepSpeed config for a ZeRO stage and precision."""
    return REPO_ROOT / "ds_configs" / f"zero{stage}_{precision}.json"


def trainer_command(
    dataset: Path,
    output_dir: Path,
    preset: str,
    config: Path,
    max_steps: int,
    max_batch_seconds: float,
    dataloader_num_workers: int,
    num_ranks: int | None,
) -> list[str]:
    """run_finetuning.py through the deepspeed launcher, or as one plain process if no ranks."""
    if num_ranks is None:
        command = [sys.executable, "-m", "train.run_finetuning"]
    else:
        command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus"]
        command += [str(num_ranks), "--master_port", str(free_port())]
        command += [str(REPO_ROOT / "train" / "run_finetuning.py")]
    options = {
        "deepspeed": config,
        "train_dir": dataset,
        "model_name_or_path": preset,
        "output_dir": output_dir,
        "max_steps": max_steps,
        "logging_steps": 1,
        "warmup_steps": 1,
        "max_batch_seconds": max_batch_seconds,
        "dataloader_num_workers": dataloader_num_workers,
    }
    return command + [f"--{key}={value}" for key, value in options.items()]


def run_sampled(
    command: list[str],
    log_file: Path,
    environment: dict[str, str] | None = None,
    wait_for_idle: float = 0.0,
) -> dict[str, Any]:
    """Runs `command` from the repository root, logging to `log_file`, sampling its process tree.

    Returns the sampler's summary (peak PSS, CPU seconds, process_wall_seconds from Popen to
    exit) and how busy the machine was just before; raises RuntimeError with the log's tail if
    the command fails or runs past RUN_TIMEOUT_SECONDS.
    """
    busy_before = wait_until_idle(wait_for_idle, window_seconds=1.0)
    env = {**os.environ, **OFFLINE, **(environment or {})}
    with open(log_file, "w", encoding="utf-8") as log:
        process = psutil.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        watchdog = threading.Timer(RUN_TIMEOUT_SECONDS, kill_tree, args=(process,))
        watchdog.start()
        try:
            summary = wait_sampled(process, interval_seconds=0.2)
        finally:
            watchdog.cancel()
    if process.returncode != 0:
        tail = log_file.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise RuntimeError(f"exit code {process.returncode}: {' '.join(command)}\n{tail}")
    return {**summary, "machine_busy_before": busy_before}


def kill_tree(process: psutil.Process) -> None:
    """Kills a child that outlived its time limit, and everything it started."""
    try:
        descendants = process.children(recursive=True)
    except psutil.Error:
        descendants = []
    for member in [*descendants, process]:
        try:
            member.kill()
        except psutil.Error:
            pass


# --- This benchmark ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Configuration:
    """One training run's variables."""

    preset: str
    stage: int
    precision: str
    max_batch_seconds: float

    def label(self) -> str:
        return f"{self.preset}, ZeRO-{self.stage}, {self.precision}"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=f"python -m benchmarks.{NAME}", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--presets",
        nargs="+",
        choices=PRESETS,
        default=["tiny", "base"],
        help="(default: tiny base)",
    )
    parser.add_argument(
        "--stages", type=int, nargs="+", choices=STAGES, default=list(STAGES), help="ZeRO stages"
    )
    parser.add_argument(
        "--precision",
        nargs="+",
        choices=PRECISIONS,
        default=["bf16"],
        help="ds_configs precision (default: bf16; torch runs bf16 on CPUs too)",
    )
    parser.add_argument("--steps", type=int, default=5, help="measured steps (default: 5)")
    parser.add_argument(
        "--warmup_steps", type=int, default=2, help="steps run before measuring (default: 2)"
    )
    parser.add_argument(
        "--max_batch_seconds",
        type=float,
        nargs="+",
        default=None,
        help="padded audio seconds per micro-batch per rank: one value, or one per preset "
        "(default: 200 on GPUs, 16 on CPU)",
    )
    parser.add_argument(
        "--num_ranks", type=int, default=None, help="launcher ranks (default: GPUs, else 2)"
    )
    parser.add_argument(
        "--dataloader_num_workers", type=int, default=None, help="(default: 2 on GPUs, 1 on CPU)"
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs of every configuration, interleaved"
    )
    parser.add_argument(
        "--dataset", type=Path, default=None, help="prepared dataset (default: build one)"
    )
    parser.add_argument(
        "--hours",
        type=float,
        default=None,
        help="demo corpus size (default: enough that no run wraps around an epoch)",
    )
    parser.add_argument("--unique_hours", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_cpus", type=int, default=None, help="Ray CPUs for preprocessing")
    parser.add_argument("--work_dir", type=Path, default=None, help="corpora, datasets, runs")
    parser.add_argument(
        "--wait_for_idle",
        type=float,
        default=0.0,
        help="wait up to this many seconds for the machine to go idle before each run",
    )
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.presets, args.stages, args.precision = ["tiny"], [2, 3], args.precision[:1]
        args.steps, args.warmup_steps, args.unique_hours = 2, 1, 0.02
        args.max_batch_seconds = args.max_batch_seconds or [8.0]
    if args.max_batch_seconds and len(args.max_batch_seconds) not in (1, len(args.presets)):
        parser.error("--max_batch_seconds takes one value or one per preset")
    return args


def device_description(num_ranks: int) -> dict[str, Any]:
    """What the ranks ran on, as torch sees it."""
    import torch

    if torch.cuda.is_available():
        return {
            "kind": "cuda",
            "name": torch.cuda.get_device_name(0),
            "devices": torch.cuda.device_count(),
            "ranks": num_ranks,
            "bf16_supported": torch.cuda.is_bf16_supported(),
        }
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "kind": "cpu",
        "name": machine_info()["cpu_model"],
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": cores,
        "ranks": num_ranks,
        # run_finetuning.py gives each CPU rank an equal share of the cores.
        "torch_threads_per_rank": max(1, (os.cpu_count() or 1) // num_ranks),
    }


def device_label(device: dict[str, Any]) -> str:
    """E.g. '8 ranks on NVIDIA H100 80GB HBM3' or '2 ranks on AMD EPYC (2 cores)'."""
    cores = f" ({device['cores']} cores)" if device["kind"] == "cpu" else ""
    return f"{device['ranks']} ranks on {device['name']}{cores}"


def step_statistics(records: list[dict[str, Any]], warmup_steps: int) -> dict[str, Any]:
    """Throughput over the measured steps: total audio over total time, and median step time."""
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


def run_configuration(
    configuration: Configuration,
    dataset: Path,
    args: argparse.Namespace,
    work: Path,
    repeat: int,
) -> dict[str, Any]:
    """One launcher run; a failure is returned as {'ok': False, 'error': ...}, not raised."""
    run_dir = (
        work / f"run-{configuration.preset}-zero{configuration.stage}-{configuration.precision}"
    )
    shutil.rmtree(run_dir, ignore_errors=True)
    log_file = work / f"{run_dir.name}-{repeat}.log"
    command = trainer_command(
        dataset,
        run_dir,
        configuration.preset,
        ds_config(configuration.stage, configuration.precision),
        args.warmup_steps + args.steps,
        configuration.max_batch_seconds,
        args.dataloader_num_workers,
        args.num_ranks,
    )
    result: dict[str, Any] = {**asdict(configuration), "repeat": repeat, "log": str(log_file)}
    print(f"[{NAME}] {configuration.label()} (repeat {repeat})", flush=True)
    try:
        process = run_sampled(command, log_file, wait_for_idle=args.wait_for_idle)
        lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
        records = [json.loads(line) for line in lines]
        result.update(step_statistics(records, args.warmup_steps))
        result["startup"] = json.loads((run_dir / "startup.json").read_text(encoding="utf-8"))
        result["steps"] = [r for r in records if "loss" in r]
        result["process"] = process
        result["ok"] = True
    except (RuntimeError, OSError, ValueError) as error:
        result.update(ok=False, error=str(error)[-3000:])
        print(f"[{NAME}] failed: {str(error)[:300]}", flush=True)
    # Checkpoints and the exported model of a large preset are gigabytes; only figures stay.
    shutil.rmtree(run_dir, ignore_errors=True)
    return result


def summarize(runs: list[dict[str, Any]]) -> dict[Configuration, dict[str, Any]]:
    """Per configuration, its fastest successful repeat: on a shared machine, the least disturbed.

    One whole run rather than medians of each figure, so the figures stay consistent.
    """
    best: dict[Configuration, dict[str, Any]] = {}
    for run in runs:
        if not run["ok"]:
            continue
        key = Configuration(run["preset"], run["stage"], run["precision"], run["max_batch_seconds"])
        if (
            key not in best
            or run["audio_seconds_per_second"] > best[key]["audio_seconds_per_second"]
        ):
            best[key] = run
    figures = ("audio_seconds_per_second", "median_step_time", "audio_seconds_per_step", "repeat")
    return {key: {figure: run[figure] for figure in figures} for key, run in best.items()}


def build_rows(
    summary: dict[Configuration, dict[str, Any]], device: dict[str, Any]
) -> list[dict[str, Any]]:
    """Each stage vs ZeRO-2, and bf16 vs fp32, for the same preset; step time as detail rows."""
    where = f"{device['ranks']} {'GPU' if device['kind'] == 'cuda' else 'CPU'} ranks"
    rows = []

    def compare(ours: Configuration, other: Configuration, other_name: str) -> None:
        if ours not in summary or other not in summary:
            return
        rows.append(
            result_row(
                f"training speed, {ours.label()}, {ours.max_batch_seconds:g} s batches, {where}",
                summary[ours]["audio_seconds_per_second"],
                summary[other]["audio_seconds_per_second"],
                other_name,
                "audio s/s",
                higher_is_better=True,
            )
        )
        rows.append(
            result_row(
                f"median step time, {ours.label()}, {where}",
                summary[ours]["median_step_time"],
                summary[other]["median_step_time"],
                other_name,
                "s",
                higher_is_better=False,
                headline=False,
            )
        )

    for configuration in summary:
        if configuration.stage != BASELINE_STAGE:
            baseline = Configuration(
                configuration.preset,
                BASELINE_STAGE,
                configuration.precision,
                configuration.max_batch_seconds,
            )
            compare(configuration, baseline, "ZeRO-2, same model and precision")
    for configuration in summary:
        if configuration.precision == "bf16":
            fp32 = Configuration(
                configuration.preset, configuration.stage, "fp32", configuration.max_batch_seconds
            )
            compare(configuration, fp32, "fp32, same model and stage")
    return rows


def plot(
    summary: dict[Configuration, dict[str, Any]], args: argparse.Namespace, device: dict[str, Any]
) -> None:
    """One panel per preset: audio seconds per second by stage, one bar per precision."""
    presets = [p for p in args.presets if any(c.preset == p for c in summary)] or args.presets
    figure, axes = new_figure(
        len(presets),
        f"Training throughput, {device_label(device)}",
        4.5,
    )
    for axis, preset in zip(axes, presets, strict=True):
        stages = [
            s for s in args.stages if any(c.preset == preset and c.stage == s for c in summary)
        ]
        series = {}
        for precision in args.precision:
            values = []
            for stage in stages:
                match = [
                    v["audio_seconds_per_second"]
                    for c, v in summary.items()
                    if (c.preset, c.stage, c.precision) == (preset, stage, precision)
                ]
                values.append(match[0] if match else 0.0)
            series[precision] = values
        grouped_bars(
            axis, [f"ZeRO-{s}" for s in stages], series, "audio seconds / second", "{:.3g}"
        )
        axis.set_title(preset)
    save_figure(figure, args, NAME)


def resolve_defaults(args: argparse.Namespace) -> dict[str, Any]:
    """Fills the device-dependent defaults in `args`; returns the device description."""
    import torch

    gpus = torch.cuda.device_count()
    args.num_ranks = args.num_ranks or gpus or 2
    if args.dataloader_num_workers is None:
        args.dataloader_num_workers = 2 if gpus else 1
    if not args.max_batch_seconds:
        args.max_batch_seconds = [200.0 if gpus else 16.0]
    if len(args.max_batch_seconds) == 1:
        args.max_batch_seconds = args.max_batch_seconds * len(args.presets)
    if args.hours is None:
        # Every rank's batches of the longest run fit in one epoch, so no run wraps around one.
        needed = args.num_ranks * max(args.max_batch_seconds) * (args.steps + args.warmup_steps)
        args.hours = max(args.unique_hours, math.ceil(needed * 1.25 / 36) / 100)
    return device_description(args.num_ranks)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    device = resolve_defaults(args)
    configurations = [
        Configuration(preset, stage, precision, batch_seconds)
        for preset, batch_seconds in zip(args.presets, args.max_batch_seconds, strict=True)
        for precision in args.precision
        for stage in args.stages
    ]
    runs = []
    with work_directory(args.work_dir) as work:
        if args.dataset is not None:
            dataset = args.dataset
            preprocess_seconds = None
        else:
            _, dataset, preprocess_seconds = prepared_dataset(
                work, args.hours, args.unique_hours, args.seed, args.num_cpus
            )
        # Repeats go round all configurations, so drift on a shared machine hits each alike.
        for repeat in range(args.repeats):
            for configuration in configurations:
                runs.append(run_configuration(configuration, dataset, args, work, repeat))
    summary = summarize(runs)
    rows = build_rows(summary, device)
    failed = sorted(
        {
            Configuration(r["preset"], r["stage"], r["precision"], r["max_batch_seconds"]).label()
            for r in runs
            if not r["ok"]
        }
    )
    notes = [
        "audio s/s = unpadded audio seconds trained per wall second over all ranks, summed over "
        f"the {args.steps} measured steps (after {args.warmup_steps} warm-up steps) and divided "
        "by their summed step time, from metrics.jsonl (logging_steps=1); the fastest of "
        f"{args.repeats} repeat(s), run in turn over all configurations (every run is in "
        "details.runs).",
        "Each run is a fresh `deepspeed` launcher job (train/run_finetuning.py) on a prepared "
        "demo-corpus dataset, random-init presets, frozen feature encoder, one micro-batch per "
        "step holding at most max_batch_seconds of padded audio per rank.",
        "Rows: each ZeRO stage against ZeRO-2 with the same model, precision and batches; "
        "bf16 against fp32 where both ran. Absolute figures of every run (ZeRO-2 included) are "
        "in details.runs and details.summary.",
    ]
    if device["kind"] == "cpu":
        notes.append(
            f"CPU: {device['ranks']} gloo ranks with {device['torch_threads_per_rank']} torch "
            "thread(s) each on a machine shared with other work; step times are noisy "
            "(machine_busy_before in details records the load just before each run)."
        )
    if failed:
        notes.append(f"Failed, see details.runs: {', '.join(failed)}.")
    details = {
        "device": device,
        "num_ranks": args.num_ranks,
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "dataloader_num_workers": args.dataloader_num_workers,
        "dataset": str(dataset),
        "corpus_hours": None if args.dataset else args.hours,
        "preprocess_seconds": preprocess_seconds,
        "summary": [{**asdict(c), **v} for c, v in summary.items()],
        "runs": runs,
    }
    path = write_results(
        NAME, "Training throughput by model and ZeRO stage", args, argv, rows, details, notes
    )
    plot(summary, args, device)
    print_rows(rows)
    for configuration, values in summary.items():
        print(
            f"{configuration.label()}: {values['audio_seconds_per_second']:.3g} audio s/s, "
            f"median step {values['median_step_time']:.3g} s"
        )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
