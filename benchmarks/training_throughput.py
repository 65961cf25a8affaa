"""Training throughput (audio seconds per second, step time) by model size and ZeRO stage.

train/run_finetuning.py through the deepspeed launcher (every GPU; without one, 2 CPU gloo
ranks) per preset × ZeRO stage (ds_configs/zero{1,2,3}_{bf16,fp32}.json) × precision on a
prepared demo-corpus dataset, one micro-batch of at most max_batch_seconds of padded audio per
rank and step. Anchors: ZeRO-2 with the same model, precision and batches; fp32 with the same
model and stage. Audio s/s: harness.step_statistics after --warmup_steps, the fastest of
--repeats runs, taken in turn over all configurations (failed ones in details.runs).

    python -m benchmarks.training_throughput                      # tiny and base, ZeRO-1/2/3
    python -m benchmarks.training_throughput --presets large --stages 2 --steps 2
    python -m benchmarks.training_throughput --quick
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from benchmarks import harness
from benchmarks.benchmark_results import figure_rows, finish

NAME = "training_throughput"


@dataclass(frozen=True)
class Configuration:
    """One training run's variables."""

    preset: str
    stage: int
    precision: str
    max_batch_seconds: float

    def label(self) -> str:
        return f"{self.preset}, ZeRO-{self.stage}, {self.precision}"


def own_options(parser: argparse.ArgumentParser) -> None:
    presets = ("tiny", "base", "large")
    parser.add_argument("--presets", nargs="+", choices=presets, default=["tiny", "base"])
    parser.add_argument("--stages", type=int, nargs="+", choices=(1, 2, 3), default=[1, 2, 3])
    parser.add_argument("--precision", nargs="+", choices=("bf16", "fp32"), default=["bf16"])
    parser.add_argument("--steps", type=int, default=5, help="measured steps")
    parser.add_argument("--warmup_steps", type=int, default=2, help="steps before measuring")
    batch = "per rank, one value or one per preset; None: 200 on GPUs, 16 on CPU"
    parser.add_argument("--max_batch_seconds", type=float, nargs="+", help=batch)
    parser.add_argument("--num_ranks", type=int, help="launcher ranks; None: GPUs, else 2")
    parser.add_argument("--dataloader_num_workers", type=int, help="None: 2 on GPUs, 1 on CPU")


def resolve_defaults(args: argparse.Namespace) -> dict[str, Any]:
    """Fills the device-dependent defaults in `args`; returns the device description."""
    import torch

    gpus = torch.cuda.device_count()
    if args.max_batch_seconds and len(args.max_batch_seconds) not in (1, len(args.presets)):
        raise SystemExit("--max_batch_seconds takes one value or one per preset")
    args.num_ranks = args.num_ranks or gpus or 2
    if args.dataloader_num_workers is None:
        args.dataloader_num_workers = 2 if gpus else 1
    args.max_batch_seconds = args.max_batch_seconds or [200.0 if gpus else 16.0]
    if len(args.max_batch_seconds) == 1:
        args.max_batch_seconds = args.max_batch_seconds * len(args.presets)
    if args.hours is None:
        # Every rank's batches of the longest run fit in one epoch, so no run wraps around one.
        needed = args.num_ranks * max(args.max_batch_seconds) * (args.steps + args.warmup_steps)
        args.hours = max(args.unique_hours, math.ceil(needed * 1.25 / 36) / 100)
    return harness.device_description(args.num_ranks)


def run_configuration(
    configuration: Configuration, dataset: Path, args: argparse.Namespace, work: Path, repeat: int
) -> dict[str, Any]:
    """One launcher run's harness.training_figures; a failure is returned, not raised."""
    c = configuration
    print(f"[{NAME}] {c.label()} (repeat {repeat})", flush=True)
    output = work / f"run-{c.preset}-zero{c.stage}-{c.precision}-{repeat}"
    steps, config = args.warmup_steps + args.steps, harness.ds_config(c.stage, c.precision)
    launch = (c.preset, config, steps, c.max_batch_seconds, args.num_ranks)
    options = {"dataloader_num_workers": args.dataloader_num_workers}
    options["wait_for_idle"] = args.wait_for_idle

    def measure() -> dict[str, Any]:
        run = harness.trainer_run(dataset, output, *launch, **options)
        return harness.training_figures(run, args.warmup_steps)

    return {**asdict(c), "repeat": repeat, **harness.attempt(NAME, measure)}


def summarize(runs: list[dict[str, Any]]) -> dict[Configuration, dict[str, Any]]:
    """Per configuration, its fastest successful repeat (on a shared machine, the least
    disturbed): one whole run rather than medians of each figure, so the figures agree."""
    best: dict[Configuration, dict[str, Any]] = {}
    for run in filter(lambda run: run["ok"], runs):
        key = Configuration(run["preset"], run["stage"], run["precision"], run["max_batch_seconds"])
        speed = run["audio_seconds_per_second"]
        if key not in best or speed > best[key]["audio_seconds_per_second"]:
            best[key] = run
    figures = ("audio_seconds_per_second", "median_step_time", "audio_seconds_per_step", "repeat")
    return {key: {figure: run[figure] for figure in figures} for key, run in best.items()}


def build_rows(summary: dict[Configuration, dict], device: dict[str, Any]) -> list[dict[str, Any]]:
    """Each stage vs ZeRO-2, and bf16 vs fp32, for the same preset; step time as detail rows."""
    where = f"{device['ranks']} {'GPU' if device['kind'] == 'cuda' else 'CPU'} ranks"
    stages = [(c, replace(c, stage=2), "ZeRO-2") for c in summary if c.stage != 2]
    dtypes = [(c, replace(c, precision="fp32"), "fp32") for c in summary if c.precision == "bf16"]
    rows = []
    for ours, anchor, changed in stages + dtypes:
        if anchor not in summary:
            continue
        anchor_name = f"{changed}, same model and {'precision' if changed == 'ZeRO-2' else 'stage'}"
        speed = f"training speed, {ours.label()}, {ours.max_batch_seconds:g} s batches, {where}"
        figures = [
            (speed, "audio_seconds_per_second", "audio s/s", True, True),
            (f"median step time, {ours.label()}, {where}", "median_step_time", "s", False, False),
        ]
        rows += figure_rows(summary[ours], summary[anchor], anchor_name, figures)
    return rows


def main(argv: list[str] | None = None) -> int:
    shared = {"dataset": None, "hours": None, "unique_hours": 0.25, "seed": 0, "num_cpus": None}
    shared |= {"repeats": 1, "wait_for_idle": 0.0, "work_dir": None}
    quick = {"presets": ["tiny"], "stages": [2, 3], "precision": ["bf16"], "steps": 2}
    quick |= {"warmup_steps": 1, "unique_hours": 0.02, "max_batch_seconds": [8.0]}
    args = harness.parse_args(NAME, __doc__, argv, shared, quick, own_options)
    device = resolve_defaults(args)
    configurations = [
        Configuration(preset, stage, precision, batch_seconds)
        for preset, batch_seconds in zip(args.presets, args.max_batch_seconds, strict=True)
        for precision in args.precision
        for stage in args.stages
    ]
    with harness.work_directory(args.work_dir) as work:
        dataset, preprocess_seconds = harness.args_dataset(args, work)
        # Repeats go round all configurations, so drift on a shared machine hits each alike.
        runs = [
            run_configuration(configuration, dataset, args, work, repeat)
            for repeat in range(args.repeats)
            for configuration in configurations
        ]
    summary = summarize(runs)
    details = {"device": device, "dataset": str(dataset), "preprocess_seconds": preprocess_seconds}
    details |= {"summary": [{**asdict(c), **v} for c, v in summary.items()], "runs": runs}
    return finish(args, build_rows(summary, device), details)


if __name__ == "__main__":
    sys.exit(main())
