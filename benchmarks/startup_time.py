"""Startup: seconds from launch to the first optimizer step as the corpus grows, and planning.

Per corpus size, the fastest of --repeats rounds (one whole run, so its phases add up), each
run a fresh interpreter on the tiny preset (GPU: bf16; CPU: fp32). Ours: `python -m
train.run_finetuning` on the dataset preprocessed beforehand (the 'first launch' rows add that
time), phases from its startup.json. HF: hf_trainer_baseline.py, transformers' CTC recipe
(datasets `map` with --num_proc workers, Trainer with length-grouped batches of the same mean
audio) with an empty datasets cache (cold) and a filled one (warm). The launchers: the whole
`deepspeed --num_gpus 1` command against the warm HF run under `torchrun --standalone`.
Planning: DurationBucketSampler (200 s batches, 64 ranks) over 7.5 M Common Voice-like clip
lengths to its first batch, against LengthGroupedSampler with a batch of the same mean audio:
seconds, and peak resident memory above the start.

First start (--first_start, measured alone): the whole launcher command of the tiny preset on 2
ranks (GPU: up to 2) with an empty TORCH_EXTENSIONS_DIR, as after a fresh install, where
DeepSpeed would JIT-build its ops, against the warm start that follows on the same directory;
per round both, the fastest of each over --repeats rounds.

    python -m benchmarks.startup_time --hours 0.25 1 4 16
    python -m benchmarks.startup_time --quick
    python -m benchmarks.startup_time --first_start --hours 0.02 --unique_hours 0.02 --repeats 3
"""

from __future__ import annotations

import argparse
import gc
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import harness, hf_trainer_baseline
from benchmarks.benchmark_results import figure_rows, finish
from benchmarks.harness import SAMPLING_RATE
from benchmarks.process_tree import machine_cores

NAME = "startup_time"
SYSTEMS = {
    "ours": "ours: trainer on preprocessed shards",
    "hf_cold": "HF datasets 3.6 + Trainer, empty cache",
    "hf_warm": "HF datasets 3.6 + Trainer, warm cache",
    "ours_launcher": "ours: whole `deepspeed` launcher command, 1 rank",
    "hf_torchrun": "HF datasets 3.6 + Trainer under `torchrun`, 1 rank, warm cache",
}
# (ours, anchor, metric, headline) of each size's rows.
PAIRS = (
    ("ours", "hf_cold", "launch to first optimizer step", True),
    ("ours", "hf_warm", "launch to first optimizer step", True),
    ("ours_launcher", "hf_torchrun", "launcher command to first optimizer step", True),
    ("ours_first_launch", "hf_cold", "first launch incl. ours' one-off preprocessing", False),
)
# startup.json is written at step 1 whatever max_steps is. Not 1: run_finetuning.py then
# hands DeepSpeed's WarmupDecayLR warmup_num_steps=0, which deepspeed 0.19 rejects.
OURS_MAX_STEPS = 2
PLANNING_RANKS, PLANNING_BATCH_SECONDS = 64, 200.0
FIRST_START_RANKS = 2


def own_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num_proc", type=int, default=machine_cores(), help="HF map workers")
    utterances = "utterances of the simulated length index"
    parser.add_argument("--planning_utterances", type=int, default=7_500_000, help=utterances)
    first_start = "only the first start against a warm one, in startup_time-first_start.json"
    parser.add_argument("--first_start", action="store_true", help=first_start)


def peak_extra_memory(action: Callable[[], Any]) -> dict[str, float]:
    """Seconds `action` takes and this process's peak resident memory above the start, in GiB
    (the kernel's high-water mark reset first; what it returns is alive until it is read)."""

    def status_bytes(field: str) -> int:
        lines = Path("/proc/self/status").read_text(encoding="utf-8").splitlines()
        return next(int(line.split()[1]) * 1024 for line in lines if line.startswith(field))

    Path("/proc/self/clear_refs").write_text("5", encoding="utf-8")
    before, started = status_bytes("VmRSS:"), time.perf_counter()
    result = action()
    seconds = time.perf_counter() - started
    extra = (status_bytes("VmHWM:") - before) / 2**30
    del result
    gc.collect()
    return {"seconds": seconds, "peak_extra_gib": extra}


def measure_planning(utterances: int, seed: int) -> dict[str, Any]:
    """Ours and LengthGroupedSampler from a length index to the first batch, one after another."""
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from train.duration_bucket_sampler import DurationBucketSampler

    lengths = harness.common_voice_like_lengths(utterances, seed)
    # A fixed batch holding on average what our budget holds.
    batch_size = round(PLANNING_BATCH_SECONDS / (float(lengths.mean()) / SAMPLING_RATE))

    plan = {"max_batch_seconds": PLANNING_BATCH_SECONDS, "world_size": PLANNING_RANKS, "rank": 0}

    def ours() -> Any:
        sampler = DurationBucketSampler(audio_lengths=lengths, sampling_rate=SAMPLING_RATE, **plan)
        return sampler, sampler.plan_epoch(0), next(iter(sampler))

    # The Trainer gets the length column as a list; made here, outside the measurement.
    as_list = lengths.tolist()

    def hf() -> Any:
        generator = torch.Generator().manual_seed(seed)
        sampler = LengthGroupedSampler(batch_size, lengths=as_list, generator=generator)
        return sampler, next(iter(sampler))

    return {
        "utterances": utterances,
        "hours": float(lengths.sum()) / SAMPLING_RATE / 3600,
        "ranks": PLANNING_RANKS,
        "max_batch_seconds": PLANNING_BATCH_SECONDS,
        "hf_batch_size": batch_size,
        "ours": peak_extra_memory(ours),
        "hf": peak_extra_memory(hf),
    }


def startup_figures(run: dict[str, Any], launcher: bool) -> dict[str, Any]:
    """A trainer_run's or hf_trainer_baseline.run_job's phases and total to the first optimizer
    step, from process creation, or for a `launcher` from its launch (a "launcher" phase first),
    with the bulk of the process tree's summary left out."""
    phases, total, process = run["startup_phases"], run["startup_seconds"], run["process"]
    if launcher:
        from_launch = run["first_step_unix"] - process["launched_unix"]
        phases, total = {"launcher": from_launch - total, **phases}, from_launch
    kept = ("peak_pss_gib", "machine_busy_before", "cpu_seconds_by_kind")
    figures = {"phases": phases, "total": total, "wall_seconds": process["process_wall_seconds"]}
    return figures | {key: process[key] for key in kept}


def run_ours(dataset: Path, work: Path, args: argparse.Namespace, launcher: bool) -> dict[str, Any]:
    """Our trainer to its first optimizer step: one plain process, or the deepspeed launcher."""
    config, ranks = harness.ds_config(2, args.precision), 1 if launcher else None
    launch = ("tiny", config, OURS_MAX_STEPS, args.max_batch_seconds, ranks)
    options = {"dataloader_num_workers": args.dataloader_num_workers}
    options["wait_for_idle"] = args.wait_for_idle  # as the HF runs wait
    run = harness.trainer_run(dataset, work / "startup-ours", *launch, **options)
    return startup_figures(run, launcher)


def first_start_round(dataset: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Our launcher command to its first optimizer step with an empty TORCH_EXTENSIONS_DIR
    (where DeepSpeed builds and finds its JIT ops), then again on what it left there."""
    import torch

    extensions = work / "startup-torch-extensions"
    shutil.rmtree(extensions, ignore_errors=True)
    extensions.mkdir()
    ranks = min(FIRST_START_RANKS, torch.cuda.device_count()) or FIRST_START_RANKS
    config = harness.ds_config(2, args.precision)
    launch = ("tiny", config, OURS_MAX_STEPS, args.max_batch_seconds, ranks)
    options = {"dataloader_num_workers": args.dataloader_num_workers}
    options |= {"wait_for_idle": args.wait_for_idle}
    options |= {"environment": {"TORCH_EXTENSIONS_DIR": str(extensions)}}
    output = work / "startup-first-start"
    first = startup_figures(harness.trainer_run(dataset, output, *launch, **options), True)
    warm = startup_figures(harness.trainer_run(dataset, output, *launch, **options), True)
    built = sorted(path.name for path in extensions.iterdir())
    shutil.rmtree(extensions)
    return {"ranks": ranks, "first": first, "warm": warm, "extensions_built": built}


def measure_first_start(hours: float, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """--repeats first-start rounds on the corpus of `hours`; the fastest first and warm start."""
    _, dataset, _ = harness.prepared_dataset(work, args, hours)
    rounds = [first_start_round(dataset, work, args) for _ in range(args.repeats)]
    fastest = {
        start: min((each[start] for each in rounds), key=lambda run: run["total"])
        for start in ("first", "warm")
    }
    return {"hours": hours, "ranks": rounds[0]["ranks"], "fastest": fastest, "rounds": rounds}


def first_start_rows(first_start: dict[str, Any]) -> list[dict[str, Any]]:
    """The row of the fastest first start against the fastest warm one."""
    fastest, ranks = first_start["fastest"], first_start["ranks"]
    metric = f"first start (empty TORCH_EXTENSIONS_DIR), launcher command, {ranks} ranks"
    anchor = "ours: the warm start after it"
    return figure_rows(
        fastest["first"], fastest["warm"], anchor, [(metric, "total", "s", False, True)]
    )


def run_hf(
    manifest: Path, cache: Path, batch: int, work: Path, args: argparse.Namespace, torchrun: bool
) -> dict[str, Any]:
    """The HF recipe with HF_DATASETS_CACHE=`cache`, alone or under torchrun, to its first step."""
    options = ["--manifest", str(manifest), "--per_device_train_batch_size", str(batch)]
    options += ["--dataloader_num_workers", str(args.dataloader_num_workers)]
    options += ["--num_proc", str(args.num_proc)] if args.num_proc > 1 else []
    options += ["--bf16"] if args.precision == "bf16" else []
    arrow_files_before = len(list(cache.rglob("*.arrow")))
    environment = {"HF_DATASETS_CACHE": str(cache)}
    sampling = {"environment": environment, "wait_for_idle": args.wait_for_idle}
    run = hf_trainer_baseline.run_job(work, "startup-hf", options, torchrun, **sampling)
    return startup_figures(run, torchrun) | {
        "rows": run["rows"],
        "audio_hours": run["audio_hours"],
        # A warm run that writes cache files did not find its cache (changed fingerprints).
        "cache_arrow_files_written": len(list(cache.rglob("*.arrow"))) - arrow_files_before,
        "cache_gib": sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) / 2**30,
    }


def measure_size(hours: float, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Prepares the corpus once, then rounds of every system."""
    from preprocess.shard_format import ShardDataset

    manifest, dataset, preprocess_seconds = harness.prepared_dataset(work, args, hours)
    shards = ShardDataset(str(dataset))
    mean_clip_seconds = float(shards.audio_lengths.mean()) / shards.sampling_rate
    hf_batch_size = max(1, round(args.max_batch_seconds / mean_clip_seconds))
    cache = work / "startup-hf-datasets-cache"
    runs: dict[str, list[dict[str, Any]]] = {system: [] for system in SYSTEMS}
    for repeat in range(args.repeats):
        print(f"[{NAME}] {hours:g} h, round {repeat + 1}/{args.repeats}", flush=True)
        shutil.rmtree(cache, ignore_errors=True)
        for system in SYSTEMS:
            if system.startswith("ours"):
                run = run_ours(dataset, work, args, launcher=system == "ours_launcher")
            else:
                run = run_hf(manifest, cache, hf_batch_size, work, args, system == "hf_torchrun")
            runs[system].append(run)
        shutil.rmtree(cache, ignore_errors=True)
    return {
        "hours": hours,
        "clips": len(shards),
        "audio_hours": float(shards.audio_lengths.sum()) / shards.sampling_rate / 3600,
        "mean_clip_seconds": mean_clip_seconds,
        "hf_per_device_train_batch_size": hf_batch_size,
        "preprocess_seconds_not_counted": preprocess_seconds,
        # Each system's least disturbed round: its fastest, one whole run (the phases add up).
        "fastest": {system: min(runs[system], key=lambda run: run["total"]) for system in runs},
        "runs": runs,
    }


def build_rows(sizes: list[dict[str, Any]], planning: dict[str, Any]) -> list[dict[str, Any]]:
    """Per size: each PAIRS row, from the fastest round of each system; the planning."""
    rows = []
    for size in sizes:
        fastest, where = dict(size["fastest"]), f"{size['hours']:g} h corpus"
        # The very first launch on a new corpus: ours has to preprocess it first, too.
        first_launch = fastest["ours"]["total"] + size["preprocess_seconds_not_counted"]
        fastest["ours_first_launch"] = {"total": first_launch}
        for ours, anchor, metric, headline in PAIRS:
            figure = [(f"{metric}, {where}", "total", "s", False, headline)]
            rows += figure_rows(fastest[ours], fastest[anchor], SYSTEMS[anchor], figure)
    utterances = f"{planning['utterances'] / 1e6:.2g} M utterances"
    where = f"{planning['hours']:,.0f} h ({utterances}), {planning['ranks']} ranks"
    anchor = f"HF LengthGroupedSampler, batch size {planning['hf_batch_size']}"
    figures = [
        (f"batch planning, {where}", "seconds", "s", False, True),
        (f"peak extra memory of batch planning, {where}", "peak_extra_gib", "GiB", False, True),
    ]
    return rows + figure_rows(planning["ours"], planning["hf"], anchor, figures)


def main(argv: list[str] | None = None) -> int:
    shared = {"hours": [0.25, 1.0, 4.0, 16.0], "unique_hours": 0.25, "seed": 0}
    shared |= {"max_batch_seconds": 16.0, "dataloader_num_workers": 2, "repeats": 1}
    shared |= {"num_cpus": None, "wait_for_idle": 0.0, "work_dir": None}
    quick = {"hours": [0.02], "unique_hours": 0.02, "planning_utterances": 200_000}
    args = harness.parse_args(NAME, __doc__, argv, shared, quick, own_options)
    import torch

    args.precision = "bf16" if torch.cuda.is_available() else "fp32"
    if args.first_start:
        args.tag = args.tag or "first_start"  # a file of its own: the full result stays
        with harness.work_directory(args.work_dir) as work:
            first_start = measure_first_start(min(args.hours), args, work)
        return finish(args, first_start_rows(first_start), {"first_start": first_start})
    planning = measure_planning(args.planning_utterances, args.seed)
    with harness.work_directory(args.work_dir) as work:
        sizes = [measure_size(hours, args, work) for hours in args.hours]
    details = {"systems": SYSTEMS, "planning": planning, "sizes": sizes}
    return finish(args, build_rows(sizes, planning), details)


if __name__ == "__main__":
    sys.exit(main())
