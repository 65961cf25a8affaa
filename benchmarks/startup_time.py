"""Startup: seconds from launch to the first optimizer step as the corpus grows, and planning.

Per corpus size, in --repeats rounds (load on a shared machine hits every system alike; the
fastest round counts, one whole run so its phases add up), each run a fresh interpreter on the
tiny preset (GPU: bf16; CPU: fp32), the first batch holding about --max_batch_seconds of audio:

* ours: `python -m train.run_finetuning` as one process on the dataset preprocessing made once
  per corpus beforehand (not counted: preprocess_seconds_not_counted, from dataset.json; the
  'first launch' rows add it); phases from startup.json, from process creation. It runs 2 steps
  (with 1, deepspeed rejects the schedule's warmup of 0); wall_seconds, Popen to exit, includes
  its checkpoint and export.
* HF: benchmarks/hf_trainer_baseline.py, transformers' CTC recipe (load_dataset, `map` decode +
  resample + features + tokens into the datasets cache with --num_proc workers, Trainer with
  length-grouped batches of --max_batch_seconds over the mean clip length), with an empty cache
  (cold: includes what our preprocessing does) and with the filled cache (warm).
* The launchers: the whole `deepspeed --num_gpus 1` command against the warm HF run under
  `torchrun --standalone --nproc_per_node 1`, each from launch to its first optimizer step.

Planning at 10,000 hours: DurationBucketSampler(num_samples, 16 kHz, max_batch_seconds 200,
world_size 64, rank 0) over 7.5 M Common Voice-like clip lengths, plan_epoch(0) and
next(iter(sampler)), against LengthGroupedSampler over the same lengths (as a list, made
beforehand as the Trainer reads it) with a batch of the same mean audio and next(iter(sampler)):
seconds, and this process's peak resident memory above its start (high-water mark reset first).

    python -m benchmarks.startup_time --hours 0.25 1 4 16
    python -m benchmarks.startup_time --quick
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
from benchmarks.benchmark_results import figure_rows, finish, result_row
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
# (ours, anchor, metric) of each size's headline rows.
PAIRS = (
    ("ours", "hf_cold", "launch to first optimizer step"),
    ("ours", "hf_warm", "launch to first optimizer step"),
    ("ours_launcher", "hf_torchrun", "launcher command to first optimizer step"),
)
# startup.json is written at step 1 whatever max_steps is. Not 1: run_finetuning.py then
# hands DeepSpeed's WarmupDecayLR warmup_num_steps=0, which deepspeed 0.19 rejects.
OURS_MAX_STEPS = 2
PLANNING_RANKS, PLANNING_BATCH_SECONDS = 64, 200.0


def own_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num_proc", type=int, default=machine_cores(), help="HF map workers")
    parser.add_argument(
        "--planning_utterances", type=int, default=7_500_000, help="simulated length index"
    )


def peak_extra_memory(action: Callable[[], Any]) -> dict[str, float]:
    """Seconds `action` takes and this process's peak resident memory above the start, in GiB.

    Resets the kernel's high-water mark first (/proc/self/clear_refs), so the peak is exactly
    the action's; what it returns stays alive until the peak is read.
    """

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

    def ours() -> Any:
        sampler = DurationBucketSampler(
            num_samples=lengths,
            sampling_rate=SAMPLING_RATE,
            max_batch_seconds=PLANNING_BATCH_SECONDS,
            world_size=PLANNING_RANKS,
            rank=0,
        )
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


def launcher_run(run: dict[str, Any], first_step_unix: float) -> dict[str, Any]:
    """A run timed from the launcher's start: its phases after a "launcher" one."""
    total = first_step_unix - run["process"]["launched_unix"]
    return {**run, "phases": {"launcher": total - run["total"], **run["phases"]}, "total": total}


def run_ours(dataset: Path, work: Path, args: argparse.Namespace, launcher: bool) -> dict[str, Any]:
    """Our trainer to its first optimizer step: one plain process, or the deepspeed launcher."""
    ranks, config = (1 if launcher else None), harness.ds_config(2, args.precision)
    launch = (OURS_MAX_STEPS, args.max_batch_seconds, ranks, args.dataloader_num_workers)
    run = harness.trainer_run(work, "startup-ours", dataset, "tiny", config, *launch)
    ours = {"phases": run["startup_phases"], "total": run["startup_seconds"]}
    ours["process"] = run["process"]
    return launcher_run(ours, run["first_step_unix"]) if launcher else ours


def run_hf(
    manifest: Path,
    cache: Path,
    batch_size: int,
    work: Path,
    args: argparse.Namespace,
    torchrun: bool,
) -> dict[str, Any]:
    """The HF recipe with HF_DATASETS_CACHE=`cache`, alone or under torchrun, to its first step."""
    options = ["--manifest", str(manifest), "--per_device_train_batch_size", str(batch_size)]
    options += ["--dataloader_num_workers", str(args.dataloader_num_workers)]
    options += ["--num_proc", str(args.num_proc)] if args.num_proc > 1 else []
    options += ["--bf16"] if args.precision == "bf16" else []
    arrow_files_before = len(list(cache.rglob("*.arrow")))
    environment = {"HF_DATASETS_CACHE": str(cache)}
    job = (work, "startup-hf", options, environment, torchrun, args.wait_for_idle)
    result, process = hf_trainer_baseline.run_job(*job)
    run = {
        "phases": result["phases"],
        "total": result["total"],
        "process": process,
        "rows": result["rows"],
        "audio_hours": result["audio_hours"],
        # A warm run that writes cache files did not find its cache (changed fingerprints).
        "cache_arrow_files_written": len(list(cache.rglob("*.arrow"))) - arrow_files_before,
        "cache_gib": sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) / 2**30,
    }
    return launcher_run(run, result["first_step_unix"]) if torchrun else run


def kept_figures(run: dict[str, Any]) -> dict[str, Any]:
    """A run without the bulk of its process-tree summary."""
    process = run.pop("process")
    run["wall_seconds"] = process["process_wall_seconds"]
    for key in ("peak_pss_gib", "machine_busy_before", "cpu_seconds_by_kind"):
        run[key] = process[key]
    return run


def measure_size(hours: float, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Prepares the corpus once, then rounds of every system."""
    from preprocess.shard_format import ShardDataset

    manifest, dataset, preprocess_seconds = harness.prepared_dataset(
        work, hours, args.unique_hours, args.seed, args.num_cpus
    )
    shards = ShardDataset(str(dataset))
    mean_clip_seconds = float(shards.num_samples.mean()) / shards.sampling_rate
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
            runs[system].append(kept_figures(run))
        shutil.rmtree(cache, ignore_errors=True)
    return {
        "hours": hours,
        "clips": len(shards),
        "audio_hours": float(shards.num_samples.sum()) / shards.sampling_rate / 3600,
        "mean_clip_seconds": mean_clip_seconds,
        "hf_per_device_train_batch_size": hf_batch_size,
        "preprocess_seconds_not_counted": preprocess_seconds,
        # The fastest round of each system, on a shared machine the least disturbed; one whole
        # run, so its phases add up to its total.
        "fastest": {system: min(runs[system], key=lambda run: run["total"]) for system in runs},
        "runs": runs,
    }


def build_rows(sizes: list[dict[str, Any]], planning: dict[str, Any]) -> list[dict[str, Any]]:
    """Per size: each PAIRS row and ours' first launch with its preprocessing; the planning."""
    rows = []
    for size in sizes:
        fastest, where = size["fastest"], f"{size['hours']:g} h corpus"
        for ours, anchor, metric in PAIRS:
            total, anchor_total = fastest[ours]["total"], fastest[anchor]["total"]
            rows.append(
                result_row(f"{metric}, {where}", total, anchor_total, SYSTEMS[anchor], "s", False)
            )
        # The very first launch on a new corpus: ours has to preprocess it first, too.
        rows.append(
            result_row(
                f"first launch incl. ours' one-off preprocessing, {where}",
                fastest["ours"]["total"] + size["preprocess_seconds_not_counted"],
                fastest["hf_cold"]["total"],
                SYSTEMS["hf_cold"],
                "s",
                higher_is_better=False,
                headline=False,
            )
        )
    where = (
        f"{planning['hours']:,.0f} h ({planning['utterances'] / 1e6:.2g} M utterances), "
        f"{planning['ranks']} ranks"
    )
    anchor = f"HF LengthGroupedSampler, batch size {planning['hf_batch_size']}"
    figures = [
        (f"batch planning, {where}", "seconds", "s", False, True),
        (f"peak extra memory of batch planning, {where}", "peak_extra_gib", "GiB", False, True),
    ]
    return rows + figure_rows(planning["ours"], planning["hf"], anchor, figures)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    shared = {"hours": [0.25, 1.0, 4.0, 16.0], "unique_hours": 0.25, "seed": 0}
    shared |= {"max_batch_seconds": 16.0, "dataloader_num_workers": 2, "repeats": 1}
    shared |= {"num_cpus": None, "wait_for_idle": 0.0, "work_dir": None}
    quick = {"hours": [0.02], "unique_hours": 0.02, "planning_utterances": 200_000}
    args = harness.parse_args(NAME, __doc__, argv, shared, quick, own_options)
    import torch

    args.precision = "bf16" if torch.cuda.is_available() else "fp32"
    planning = measure_planning(args.planning_utterances, args.seed)
    with harness.work_directory(args.work_dir) as work:
        sizes = [measure_size(hours, args, work) for hours in args.hours]
    details = {
        "systems": SYSTEMS,
        "precision": args.precision,
        "num_proc": args.num_proc,
        "dataloader_num_workers": args.dataloader_num_workers,
        "max_batch_seconds": args.max_batch_seconds,
        "unique_hours": args.unique_hours,
        "planning": planning,
        "sizes": sizes,
    }
    return finish(NAME, __doc__, args, argv, build_rows(sizes, planning), details)


if __name__ == "__main__":
    sys.exit(main())
