"""Seconds from launch to the first optimizer step as the corpus grows: ours vs the HF way.

Per corpus size, one after another (so load on a shared machine hits all three alike):

* ours: `python -m train.run_finetuning` as one plain process, tiny preset, on the
  dataset preprocessing made beforehand. Preprocessing happens once per corpus and is not
  counted (its seconds are in details). Phases come from the run's startup.json.
* HF, empty cache: benchmarks/hf_trainer_baseline.py, transformers' run_speech_recognition_ctc.py
  recipe (load_dataset("csv"), map decode + resample + feature extractor + tokenizer, then
  Trainer with length-grouped sampling) with a fresh HF_DATASETS_CACHE.
* HF, warm cache: the same again, reusing the cache the cold run filled.

Every run is a fresh interpreter; its phases start at process creation, and the wall clock from
Popen to exit is kept as a cross-check. Same model, feature extractor, tokenizer and text
normalization on both sides; the first batch holds about --max_batch_seconds of audio on both.

    python -m benchmarks.startup_time --hours 0.25 1 4 16
    python -m benchmarks.startup_time --quick
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from benchmarks.benchmark_inputs import work_directory
from benchmarks.benchmark_results import (
    add_output_arguments,
    new_figure,
    print_rows,
    result_row,
    save_figure,
    write_results,
)
from benchmarks.training_throughput import (
    ds_config,
    prepared_dataset,
    run_sampled,
    trainer_command,
)

NAME = "startup_time"
SYSTEMS = {
    "ours": "ours: trainer on preprocessed shards",
    "hf_cold": "HF datasets 3.6 + Trainer, empty cache",
    "hf_warm": "HF datasets 3.6 + Trainer, warm cache",
}
# startup.json is written at step 1 whatever max_steps is. Not 1: run_finetuning.py then
# hands DeepSpeed's WarmupDecayLR warmup_num_steps=0, which deepspeed 0.19 rejects.
OURS_MAX_STEPS = 2
# Both sides' phases in four groups, for the plot (the details keep every phase).
PHASE_GROUPS = {
    "imports": ("imports",),
    "data": (
        "dataset_open_and_batch_plan",
        "load_dataset",
        "text_and_vocab",
        "map_decode_resample_features",
    ),
    "model, engine, Trainer": (
        "distributed_init",
        "model_build",
        "deepspeed_initialize",
        "trainer_init",
    ),
    "first step": ("first_batch", "train_begin", "first_optimizer_step"),
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=f"python -m benchmarks.{NAME}", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--hours",
        type=float,
        nargs="+",
        default=[0.25, 1.0, 4.0, 16.0],
        help="corpus sizes (default: 0.25 1 4 16)",
    )
    parser.add_argument(
        "--unique_hours",
        type=float,
        default=0.25,
        help="distinct audio per corpus, the rest hard links (default: 0.25)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max_batch_seconds",
        type=float,
        default=16.0,
        help="ours' micro-batch budget; the HF batch size is this over the mean clip length "
        "(default: 16)",
    )
    parser.add_argument(
        "--dataloader_num_workers",
        type=int,
        default=2,
        help="DataLoader workers on both sides (default: 2, ours' default)",
    )
    parser.add_argument(
        "--num_proc",
        type=int,
        default=None,
        help="HF map workers, the recipe's preprocessing_num_workers (default: all cores)",
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="rounds of ours, HF cold, HF warm per size"
    )
    parser.add_argument("--num_cpus", type=int, default=None, help="Ray CPUs for preprocessing")
    parser.add_argument(
        "--work_dir",
        type=Path,
        default=None,
        help="corpora, datasets and runs; kept for reuse (default: a temporary directory)",
    )
    parser.add_argument(
        "--wait_for_idle",
        type=float,
        default=0.0,
        help="wait up to this many seconds for the machine to go idle before each run",
    )
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.hours, args.unique_hours = [0.02], 0.02
    if args.num_proc is None:
        args.num_proc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    return args


def run_ours(dataset: Path, work: Path, args: argparse.Namespace, gpu: bool) -> dict[str, Any]:
    """The trainer, one process, to its first optimizer step (then checkpoint and export)."""
    output = work / "startup-ours"
    shutil.rmtree(output, ignore_errors=True)
    config = ds_config(2, "bf16" if gpu else "fp32")
    command = trainer_command(
        dataset,
        output,
        "tiny",
        config,
        OURS_MAX_STEPS,
        args.max_batch_seconds,
        args.dataloader_num_workers,
        None,
    )
    process = run_sampled(command, work / "startup-ours.log", wait_for_idle=args.wait_for_idle)
    startup = json_file(output / "startup.json")
    shutil.rmtree(output, ignore_errors=True)
    total = startup.pop("total")
    return {"phases": startup, "total": total, **wall_and_process(process)}


def run_hf(
    manifest: Path, cache: Path, batch_size: int, work: Path, args: argparse.Namespace, gpu: bool
) -> dict[str, Any]:
    """The HF recipe in a fresh process with HF_DATASETS_CACHE=`cache`, to its first step."""
    output = work / "startup-hf"
    shutil.rmtree(output, ignore_errors=True)
    result_file = work / "startup-hf-result.json"
    command = [sys.executable, "-m", "benchmarks.hf_trainer_baseline"]
    command += ["--manifest", str(manifest), "--output_dir", str(output)]
    command += ["--result", str(result_file), "--per_device_train_batch_size", str(batch_size)]
    command += ["--dataloader_num_workers", str(args.dataloader_num_workers)]
    command += ["--num_proc", str(args.num_proc)] if args.num_proc > 1 else []
    command += ["--bf16"] if gpu else []
    arrow_files_before = len(list(cache.rglob("*.arrow")))
    process = run_sampled(
        command,
        work / "startup-hf.log",
        {"HF_DATASETS_CACHE": str(cache)},
        wait_for_idle=args.wait_for_idle,
    )
    result = json_file(result_file)
    shutil.rmtree(output, ignore_errors=True)
    return {
        "phases": result["phases"],
        "total": result["total"],
        **wall_and_process(process),
        "rows": result["rows"],
        "audio_hours": result["audio_hours"],
        # A warm run that writes cache files did not find its cache (changed fingerprints).
        "cache_arrow_files_written": len(list(cache.rglob("*.arrow"))) - arrow_files_before,
        "cache_gib": sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) / 2**30,
    }


def json_file(path: Path) -> dict[str, Any]:
    """A JSON file a child process wrote."""
    return json.loads(path.read_text(encoding="utf-8"))


def wall_and_process(process: dict[str, Any]) -> dict[str, Any]:
    """The parts of a process-tree summary worth keeping per startup run."""
    return {
        "wall_seconds": process["process_wall_seconds"],
        "peak_pss_gib": process["peak_pss_gib"],
        "machine_busy_before": process["machine_busy_before"],
        "cpu_seconds_by_kind": process["cpu_seconds_by_kind"],
    }


def fastest_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the shortest total: on a shared machine, the least disturbed one.

    One whole run rather than per-phase medians, so its phases add up to its total.
    """
    best = min(range(len(runs)), key=lambda index: runs[index]["total"])
    return {key: runs[best][key] for key in ("total", "wall_seconds", "phases")} | {"round": best}


def measure_size(hours: float, args: argparse.Namespace, work: Path, gpu: bool) -> dict[str, Any]:
    """Prepares the corpus once, then rounds of ours, HF cold and HF warm."""
    from preprocess.shard_format import ShardDataset

    manifest, dataset, preprocess_seconds = prepared_dataset(
        work, hours, args.unique_hours, args.seed, args.num_cpus
    )
    shards = ShardDataset(str(dataset))
    mean_clip_seconds = float(shards.num_samples.mean()) / shards.sampling_rate
    hf_batch_size = max(1, round(args.max_batch_seconds / mean_clip_seconds))
    cache = work / "startup-hf-datasets-cache"
    runs: dict[str, list[dict[str, Any]]] = {system: [] for system in SYSTEMS}
    for repeat in range(args.repeats):
        print(f"[{NAME}] {hours:g} h, round {repeat + 1}/{args.repeats}", flush=True)
        runs["ours"].append(run_ours(dataset, work, args, gpu))
        shutil.rmtree(cache, ignore_errors=True)
        for system in ("hf_cold", "hf_warm"):
            runs[system].append(run_hf(manifest, cache, hf_batch_size, work, args, gpu))
        shutil.rmtree(cache, ignore_errors=True)
    return {
        "hours": hours,
        "clips": len(shards),
        "audio_hours": float(shards.num_samples.sum()) / shards.sampling_rate / 3600,
        "mean_clip_seconds": mean_clip_seconds,
        "hf_per_device_train_batch_size": hf_batch_size,
        "preprocess_seconds_not_counted": preprocess_seconds,
        "fastest": {system: fastest_run(system_runs) for system, system_runs in runs.items()},
        "runs": runs,
    }


def build_rows(sizes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per size: ours against HF cold and against HF warm, fastest rounds."""
    rows = []
    for size in sizes:
        for baseline in ("hf_cold", "hf_warm"):
            rows.append(
                result_row(
                    f"launch to first optimizer step, {size['hours']:g} h corpus",
                    size["fastest"]["ours"]["total"],
                    size["fastest"][baseline]["total"],
                    SYSTEMS[baseline],
                    "s",
                    higher_is_better=False,
                )
            )
        # The very first launch on a new corpus: ours has to preprocess it first, too.
        rows.append(
            result_row(
                f"first launch incl. ours' one-off preprocessing, {size['hours']:g} h corpus",
                size["fastest"]["ours"]["total"] + size["preprocess_seconds_not_counted"],
                size["fastest"]["hf_cold"]["total"],
                SYSTEMS["hf_cold"],
                "s",
                higher_is_better=False,
                headline=False,
            )
        )
    return rows


def grouped_phases(phases: dict[str, float]) -> dict[str, float]:
    """Either side's phases summed into PHASE_GROUPS, so the plot compares like with like."""
    return {
        group: sum(phases.get(phase, 0.0) for phase in members)
        for group, members in PHASE_GROUPS.items()
    }


def plot(sizes: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """Left: startup seconds against corpus hours. Right: each run's phases, stacked."""
    figure, (line_axis, bar_axis) = new_figure(
        2, "Launch to first optimizer step (tiny model)", 6.0
    )
    hours = [size["hours"] for size in sizes]
    for system, label in SYSTEMS.items():
        totals = [size["fastest"][system]["total"] for size in sizes]
        line_axis.plot(hours, totals, marker="o", label=label)
    line_axis.set_xscale("log")
    line_axis.minorticks_off()
    line_axis.set_xticks(hours, [f"{h:g}" for h in hours])
    line_axis.set_xlabel("corpus hours")
    line_axis.set_ylabel("seconds (lower is better)")
    line_axis.set_ylim(bottom=0)
    line_axis.legend(fontsize=8)

    short = {"ours": "ours", "hf_cold": "HF cold", "hf_warm": "HF warm"}
    positions, labels = [], []
    bottoms: dict[tuple[int, str], float] = {}
    for group_index, size in enumerate(sizes):
        for system_index, system in enumerate(SYSTEMS):
            position = group_index * (len(SYSTEMS) + 1) + system_index
            positions.append(position)
            labels.append(f"{short[system]}, {size['hours']:g} h")
            bottoms[(position, system)] = 0.0
    for color_index, group in enumerate(PHASE_GROUPS):
        values = [
            grouped_phases(size["fastest"][system]["phases"])[group]
            for size in sizes
            for system in SYSTEMS
        ]
        bottom = [bottoms[key] for key in bottoms]
        bar_axis.bar(positions, values, bottom=bottom, label=group, color=f"C{color_index}")
        for key, value in zip(bottoms, values, strict=True):
            bottoms[key] += value
    bar_axis.set_xticks(positions, labels, fontsize=7, rotation=60, ha="right")
    bar_axis.set_ylabel("seconds by phase")
    bar_axis.legend(fontsize=8)
    save_figure(figure, args, NAME)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    import torch

    gpu = torch.cuda.is_available()
    with work_directory(args.work_dir) as work:
        sizes = [measure_size(hours, args, work, gpu) for hours in args.hours]
    rows = build_rows(sizes)
    notes = [
        "Seconds from process creation to the end of the first optimizer step (tiny random-init "
        "wav2vec2, one process, "
        + ("GPU, bf16" if gpu else "CPU, fp32")
        + f"); fastest of {args.repeats} round(s) of ours, HF cold, HF warm per size (the "
        "least disturbed by other work; every round is in details).",
        "Ours excludes preprocessing: it runs once per corpus (preprocess_seconds_not_counted in "
        "details, from dataset.json, Ray start included; the non-headline 'first launch' rows "
        "add it). HF cold includes its "
        "equivalent, the decode/resample/feature map into the datasets cache, which the HF way "
        "redoes whenever the cache is missing (new machine, new cache dir, changed map code or "
        "arguments); HF warm reloads that cache.",
        f"HF map with num_proc={args.num_proc}; DataLoader workers "
        f"{args.dataloader_num_workers} on both sides; HF batch size = "
        f"{args.max_batch_seconds:g} s over the mean clip length, so both first batches hold "
        "about the same audio.",
        "wall_seconds in details is Popen to exit: ours' also includes saving a DeepSpeed "
        "checkpoint and exporting the model after step 2 (it runs max_steps 2: with 1, "
        "run_finetuning.py gives DeepSpeed warmup_num_steps=0, which deepspeed 0.19 rejects).",
        "Corpora synthesize --unique_hours of espeak-ng speech and hard-link the rest; all input "
        "files and outputs sit in the page cache (nothing is read from disk). The machine may be "
        "shared: machine_busy_before records the load before each run.",
    ]
    details = {
        "systems": SYSTEMS,
        "phase_groups": PHASE_GROUPS,
        "device": "cuda" if gpu else "cpu",
        "num_proc": args.num_proc,
        "dataloader_num_workers": args.dataloader_num_workers,
        "max_batch_seconds": args.max_batch_seconds,
        "unique_hours": args.unique_hours,
        "sizes": sizes,
    }
    path = write_results(
        NAME, "Startup: launch to first optimizer step", args, argv, rows, details, notes
    )
    plot(sizes, args)
    print_rows(rows)
    for size in sizes:
        for system in SYSTEMS:
            fastest = size["fastest"][system]
            listing = ", ".join(f"{name} {s:.2f}" for name, s in fastest["phases"].items())
            print(f"{size['hours']:g} h {system}: {fastest['total']:.1f} s ({listing})")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
