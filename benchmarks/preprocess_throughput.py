"""Preprocessing speed (× real time) and peak memory: our Ray pipeline, the limit, HF datasets.

Task: Common Voice MP3 (48 kHz) -> 16 kHz float32 in Arrow files on N = --num_cpus cores, each
system in a fresh process whose whole tree is sampled (process_tree.py). Ours:
preprocess.prepare_dataset.prepare between a ray.init() and a ray.shutdown(), both timed apart
('incl. Ray start and shutdown' adds them: HF starts no cluster, and the CLI waits for both).
The limit: N processes decoding their shares with our preprocess.audio_decoding.load in a
tight loop, no writing, no scheduling; measured before and after the systems, the faster
counts. The write limit: the same loops, each also writing its share into shards with our
ShardWriter, so what no pipeline that writes the output can pass (the steady state is reported
against both); also the faster of before and after. HF datasets 3.6: the data path of
transformers' run_speech_recognition_ctc.py (hf_trainer_baseline.py) with num_proc=N; its first
run (numba and datasets caches cold) is reported apart from the best of its warm repeats.
× real time: seconds of 16 kHz audio out per wall second, imports excluded. Two corpus kinds:
Common Voice-like sentences (--hours) and short clips of --short_clip_words words, like
commands (--short_clip_hours; ours and the limit only). Steady state: wall seconds as
fixed + audio / rate through the smallest and largest corpus of a kind; the rate (goal: 90 %
of the limit) is what a large corpus mostly sees, the fixed cost (Ray start and shutdown
included) what a small one does. Corpora synthesize --unique_hours and hard-link the rest, so
reads hit the page cache. Memory: the PSS sum over the tree at one instant. Each measurement
is run --repeats times and the fastest run that other work disturbed at most 8 % counts (HF's
first run is one run); each limit's runs are split between before and after.

    python -m benchmarks.preprocess_throughput --hours 1 10 --short_clip_hours 1 5
    python -m benchmarks.preprocess_throughput --quick
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

from argument_classes import PreprocessArguments
from benchmarks import harness
from benchmarks.benchmark_results import figure_rows, finish, result_row
from benchmarks.harness import SAMPLING_RATE
from benchmarks.process_tree import fastest_calm, least_disturbed, machine_cores

NAME = "preprocess_throughput"
HF_NAME = "HF datasets 3.6 map(num_proc)"
HF_FIRST_NAME = f"{HF_NAME}, its first run"
# The write limit's shards are made as prepare_dataset makes them by default.
MAX_SHARD_BYTES = PreprocessArguments.max_shard_bytes
ROWS_PER_BATCH = PreprocessArguments.decode_batch_size
# What our run's summary tells of it: counts, the pipeline's seconds, and its tasks' own.
SUMMARY_KEYS = ("pipeline_seconds", "accepted", "rejected", "shards", "tasks", "cpus")
SUMMARY_KEYS += ("task_seconds", "task_cpu_seconds", "task_busy_fraction")


def own_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--skip_hf", action="store_true", help="measure ours and the limit only")
    parser.add_argument(
        "--short_clip_hours",
        type=float,
        nargs="*",
        default=[1.0, 5.0],
        help="sizes of the short-clip corpus (ours and the limit); none: skip it",
    )
    parser.add_argument(
        "--short_clip_words", type=int, default=4, help="words per short clip (commands)"
    )
    # Internal: the parent re-invokes this module to run one system in a fresh process.
    parser.add_argument("--child", choices=("ours", "hf"), help=argparse.SUPPRESS)
    parser.add_argument("--manifest", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child_output", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)


def run_ours(args: argparse.Namespace) -> dict[str, Any]:
    """Our CLI's code path, between the ray.init() that prepare() would make itself and the
    ray.shutdown() that the CLI waits for at exit."""
    import ray

    # The datasink's module brings ray.data (0.5 s here), which prepare() imports only when it
    # has rows to decode: imported before the clock, as HF's modules are.
    import preprocess.arrow_shard_datasink
    from argument_classes import ManifestArguments, PreprocessArguments
    from preprocess.prepare_dataset import prepare

    ray_options = {"num_cpus": args.num_cpus, "object_store_memory": args.object_store_memory}
    preprocess = PreprocessArguments(output_dir=str(args.child_output), **ray_options)
    started = time.perf_counter()
    ray.init(**ray_options, include_dashboard=False)
    ray_started = time.perf_counter()
    summary = prepare(ManifestArguments(manifest=str(args.manifest)), preprocess)
    finished = time.perf_counter()
    ray.shutdown()
    return {
        "audio_seconds": summary["hours_out"] * 3600,
        "seconds": finished - ray_started,
        "ray_start_seconds": ray_started - started,
        "ray_shutdown_seconds": time.perf_counter() - finished,
        **{key: summary[key] for key in SUMMARY_KEYS},
    }


def run_hf(args: argparse.Namespace) -> dict[str, Any]:
    """The data path of transformers' CTC recipe (benchmarks/hf_trainer_baseline.py) into the
    datasets cache (HF_DATASETS_CACHE), modules imported beforehand."""
    import datasets

    import train.wav2vec2_model  # noqa: F401  (imported before the clock starts)
    from argument_classes import ModelArguments
    from benchmarks.hf_trainer_baseline import recipe_dataset
    from train.phase_clock import PhaseClock

    datasets.disable_progress_bars()
    clock, started = PhaseClock(), time.perf_counter()
    clock.mark("imports")
    model_args = ModelArguments(model_name_or_path="tiny")
    num_proc = args.num_cpus if args.num_cpus > 1 else None
    dataset, _, _ = recipe_dataset(args.manifest, args.child_output, model_args, num_proc, clock)
    seconds = time.perf_counter() - started
    lengths = dataset["input_length"]
    return {
        "audio_seconds": sum(lengths) / SAMPLING_RATE,
        "seconds": seconds,
        "phases": clock.phases,
        "rows": len(lengths),
        "cache_files": len(dataset.cache_files),
    }


def decode_share(files: list[str], barrier: Any, results: Any, output: str | None) -> None:
    """One process of the limit: waits for the others, then decodes its files in a tight loop,
    writing them with our ShardWriter into shards under `output` where one is given."""
    from preprocess import shard_format
    from preprocess.audio_decoding import load

    writer = None
    if output is not None:
        schema, name = shard_format.shard_schema([]), f"limit-{os.getpid()}"
        writer = shard_format.ShardWriter(output, name, schema, MAX_SHARD_BYTES, ROWS_PER_BATCH)
    barrier.wait()
    started, cpu_started, samples = time.monotonic(), time.process_time(), 0
    for path in files:
        decoded = load(path, SAMPLING_RATE)
        if decoded.samples is None:
            continue
        samples += decoded.samples.size
        if writer is not None:
            row = {"id": path, "text": "", "sentence": ""}
            writer.add(row, decoded.samples, decoded.mean, decoded.std)
    if writer is not None:
        writer.close()
    results.put((samples, started, time.monotonic(), time.process_time() - cpu_started))


def measure_limit(files: list[str], processes: int, output: Path | None = None) -> dict[str, Any]:
    """`processes` decode loops over interleaved shares of `files`, from the common start to
    the last one's end (the monotonic clock is the same in every process); with `output`, each
    also writes its shards there, which are then removed."""
    context = multiprocessing.get_context("spawn")  # nothing inherited from this process
    barrier, results = context.Barrier(processes), context.Queue()
    target = None if output is None else str(output)
    workers = [
        context.Process(target=decode_share, args=(files[i::processes], barrier, results, target))
        for i in range(processes)
    ]
    for worker in workers:
        worker.start()
    shares = [results.get(timeout=harness.RUN_TIMEOUT_SECONDS) for _ in workers]
    for worker in workers:
        worker.join()
    if output is not None:
        shutil.rmtree(output, ignore_errors=True)
    audio_seconds = sum(share[0] for share in shares) / SAMPLING_RATE
    seconds = max(share[2] for share in shares) - min(share[1] for share in shares)
    cpu_seconds, share_seconds = sum(s[3] for s in shares), [s[2] - s[1] for s in shares]
    return {
        "processes": processes,
        "writes_shards": output is not None,
        "audio_seconds": audio_seconds,
        "seconds": seconds,
        "x_real_time": audio_seconds / seconds,
        "cpu_seconds": cpu_seconds,
        "cpu_seconds_per_audio_hour": cpu_seconds / audio_seconds * 3600,
        "share_seconds": share_seconds,
        "busy_fraction": sum(share_seconds) / (processes * seconds),
    }


def run_system(system: str, args: argparse.Namespace, manifest: Path, work: Path) -> dict[str, Any]:
    """One system in a fresh interpreter (this module with --child), its tree sampled."""
    output = work / f"output-{system}-{manifest.parent.name}"
    shutil.rmtree(output, ignore_errors=True)
    command = [sys.executable, "-m", f"benchmarks.{NAME}", "--child", system]
    command += ["--manifest", str(manifest), "--child_output", str(output)]
    for option in ("num_cpus", "object_store_memory"):
        value = getattr(args, option)
        command += [] if value is None else [f"--{option}", str(value)]
    # HF's cache goes to `output` too, so both sides' output is measured and removed alike.
    environment = {"HF_DATASETS_CACHE": str(output)}
    label = f"{system}-{manifest.parent.name}"
    result, memory = harness.run_job(command, work, label, environment=environment)
    output_bytes = sum(f.stat().st_size for f in output.rglob("*") if f.is_file())
    shutil.rmtree(output, ignore_errors=True)  # frees disk and page cache for the next system
    speed = result["audio_seconds"] / result["seconds"]
    return {**result, "x_real_time": speed, "output_gib": output_bytes / 2**30, "memory": memory}


def limit_runs(repeats: int) -> tuple[int, int]:
    """Runs of each limit before the systems and after them. The faster of the two counts, so
    together they are as many draws as each system gets (twice as many favoured the limit);
    at least one on each side, to expose drift."""
    before = max(1, repeats // 2)
    return before, max(1, repeats - before)


def measure_size(
    hours: float, args: argparse.Namespace, work: Path, max_words: int | None
) -> dict[str, Any]:
    """Every system on one corpus; the limit is taken before and after to expose drift. HF's
    first run (its caches cold in this process tree: numba, datasets) is kept apart from its
    warm repeats; short-clip corpora (`max_words`) are measured against the limit only."""
    manifest = harness.make_corpus(work, hours, args.unique_hours, args.seed, max_words)
    files = harness.manifest_audio_files(manifest)
    measured: dict[str, Any] = {"hours": hours, "rows": len(files), "max_words": max_words}
    measured["unique_files"] = len({os.stat(path).st_ino for path in files})
    with_hf = max_words is None and not args.skip_hf
    calm = partial(fastest_calm, wait_for_idle=args.wait_for_idle)
    before, after = limit_runs(args.repeats)
    decode = partial(measure_limit, files, args.num_cpus)
    write = partial(decode, output=work / f"output-limit-{manifest.parent.name}")
    hf = partial(run_system, "hf", args, manifest, work)
    measures = {
        "limit_before": partial(calm, decode, before),
        "write_limit_before": partial(calm, write, before),
        "ours": partial(calm, partial(run_system, "ours", args, manifest, work), args.repeats),
        "hf_first": partial(least_disturbed, hf, 1, args.wait_for_idle),
        "hf": partial(calm, hf, args.repeats),
        "limit_after": partial(calm, decode, after),
        "write_limit_after": partial(calm, write, after),
    }
    for key, measure in measures.items():
        if with_hf or not key.startswith("hf"):
            measured[key] = measure()
    for name in ("limit", "write_limit"):
        runs_of_it = (measured[f"{name}_before"], measured[f"{name}_after"])
        fastest = max(runs_of_it, key=lambda run: run["x_real_time"])
        keys = ("x_real_time", "processes", "cpu_seconds_per_audio_hour", "busy_fraction")
        measured[name] = {key: fastest[key] for key in keys}
    measured["mean_clip_seconds"] = measured["limit_after"]["audio_seconds"] / len(files)
    ours = measured["ours"]
    whole_seconds = ours["ray_start_seconds"] + ours["seconds"] + ours["ray_shutdown_seconds"]
    ours["x_real_time_with_ray"] = ours["audio_seconds"] / whole_seconds
    ours["x_real_time_pipeline_only"] = ours["audio_seconds"] / ours["pipeline_seconds"]
    ours["fraction_of_limit"] = ours["x_real_time"] / measured["limit"]["x_real_time"]
    # The pipeline apart: the CPU its tasks spend per audio hour (the decode+write work
    # itself); how much of the CPUs' time after Ray's start they fill is in its summary.
    audio_hours = ours["audio_seconds"] / 3600
    ours["task_cpu_seconds_per_audio_hour"] = ours["task_cpu_seconds"] / audio_hours
    memory = ours["memory"]
    seconds = {**memory["cpu_seconds_by_kind"], "idle": memory["cpu_seconds_idle"]}
    seconds["other work on the machine"] = memory["cpu_seconds_outside_tree"]
    capacity = machine_cores() * memory["process_wall_seconds"]
    ours["cpu_share_by_group"] = {group: value / capacity for group, value in seconds.items()}
    return measured


def steady_state(small: dict[str, Any], large: dict[str, Any]) -> dict[str, float] | None:
    """Wall seconds as fixed + audio / rate through one system's runs on two corpus sizes: the
    marginal rate (extra audio over extra seconds after Ray's start, for a system that starts
    Ray) and the fixed cost, Ray's start and shutdown included, averaged over both runs. None
    when the larger corpus was not slower (noise on tiny ones)."""
    if large["seconds"] <= small["seconds"]:
        return None
    rate = (large["audio_seconds"] - small["audio_seconds"]) / (large["seconds"] - small["seconds"])
    ray_start, ray_shutdown = (
        (small.get(key, 0.0) + large.get(key, 0.0)) / 2
        for key in ("ray_start_seconds", "ray_shutdown_seconds")
    )
    audio_small, seconds_small = small["audio_seconds"], small["seconds"]
    pipeline_fixed = seconds_small - audio_small / rate
    return {
        "x_real_time": rate,
        "fixed_seconds": ray_start + pipeline_fixed + ray_shutdown,
        "ray_start_seconds": ray_start,
        "ray_shutdown_seconds": ray_shutdown,
        "fixed_seconds_between_ray_start_and_shutdown": pipeline_fixed,
    }


def build_rows(sizes: list[dict[str, Any]], num_cpus: int) -> list[dict[str, Any]]:
    """Against the limit: the pipeline's efficiency, in steady state per clip kind, and apart
    into its tasks' CPU per audio hour and how busy they keep the CPUs; against HF:
    what a user waits for (warm HF headline, its first run beside) and needs; and how ours'
    peak memory grows from the smallest corpus to the largest."""
    limit_name = f"decode+resample limit ({num_cpus} processes)"
    write_name = f"decode+resample+write limit ({num_cpus} processes)"
    speed = partial(result_row, unit="× real time", higher_is_better=True)
    rows = []
    for size in sizes:
        ours, limit, hf = size["ours"], size["limit"]["x_real_time"], size.get("hf")
        kind = "" if size["max_words"] is None else ", short clips"
        where = f"{size['hours']:g} h corpus{kind}, {num_cpus} cores"
        whole, with_ray = ours["x_real_time_with_ray"], f"incl. Ray start and shutdown, {where}"
        rows.append(
            speed(
                f"preprocessing speed, {where}",
                ours["x_real_time"],
                limit,
                limit_name,
                headline=False,
            )
        )
        # Where a pipeline loses against the write limit: slower work in its tasks, or CPUs
        # left idle between and around them.
        write_limit = size["write_limit"]
        rows += [
            result_row(
                f"CPU time per audio hour in the decode+write tasks, {where}",
                ours["task_cpu_seconds_per_audio_hour"],
                write_limit["cpu_seconds_per_audio_hour"],
                write_name,
                "s",
                higher_is_better=False,
                headline=False,
            ),
            result_row(
                f"CPUs' time in decode+write tasks, after Ray's start, {where}",
                100 * ours["task_busy_fraction"],
                100 * write_limit["busy_fraction"],
                write_name,
                "%",
                higher_is_better=True,
                headline=False,
            ),
        ]
        if hf is not None:
            # HF starts no cluster, so the user-visible comparison charges us Ray's start and
            # shutdown.
            rows.append(speed(f"preprocessing speed {with_ray}", whole, hf["x_real_time"], HF_NAME))
            first = size["hf_first"]["x_real_time"]
            rows.append(
                speed(
                    f"preprocessing speed {with_ray}", whole, first, HF_FIRST_NAME, headline=False
                )
            )
            ours_pss, hf_pss = ours["memory"]["peak_pss_gib"], hf["memory"]["peak_pss_gib"]
            memory = f"peak memory of all processes (PSS), {where}"
            rows.append(result_row(memory, ours_pss, hf_pss, HF_NAME, "GiB", False, False))
    for short in (False, True):
        kind = [size for size in sizes if (size["max_words"] is not None) == short]
        if len(kind) < 2:
            continue
        small, large = min(kind, key=lambda s: s["hours"]), max(kind, key=lambda s: s["hours"])
        clips = "short clips" if short else "Common Voice-like clips"
        clips += f" ({large['mean_clip_seconds']:.1f} s mean)"
        fit = steady_state(small["ours"], large["ours"])
        if fit is None:
            continue
        large["steady_state"] = fit
        span = f"{small['hours']:g} h to {large['hours']:g} h, {num_cpus} cores"
        limit = large["limit"]["x_real_time"]
        metric = f"preprocessing speed in steady state, {clips}, {span}"
        rows.append(speed(metric, fit["x_real_time"], limit, limit_name))
        # What any pipeline that writes our shards could reach: the rest is the pipeline's.
        write_limit = large["write_limit"]["x_real_time"]
        rows.append(speed(metric, fit["x_real_time"], write_limit, write_name, headline=False))
        if not short and small.get("hf") and large.get("hf"):
            hf_fit = steady_state(small["hf"], large["hf"])
            if hf_fit is not None:
                large["hf_steady_state"] = hf_fit
                metric = f"fixed cost of a run (Ray start and shutdown included), {clips}, {span}"
                rows.append(
                    result_row(
                        metric, fit["fixed_seconds"], hf_fit["fixed_seconds"], HF_NAME, "s", False
                    )
                )
    cv = [size for size in sizes if size["max_words"] is None]
    if len(cv) > 1:
        small, large = min(cv, key=lambda s: s["hours"]), max(cv, key=lambda s: s["hours"])
        metric = f"peak memory (PSS) at {large['hours']:g} h, {num_cpus} cores"
        figure, anchor = (
            [(metric, "peak_pss_gib", "GiB", False, True)],
            f"ours at {small['hours']:g} h",
        )
        rows += figure_rows(large["ours"]["memory"], small["ours"]["memory"], anchor, figure)
    return rows


def main(argv: list[str] | None = None) -> int:
    shared = {"hours": [1.0, 10.0], "unique_hours": 0.5, "seed": 0, "num_cpus": None}
    shared |= {"object_store_memory": None, "repeats": 3, "wait_for_idle": 0.0, "work_dir": None}
    quick = {"hours": [0.02], "short_clip_hours": [], "unique_hours": 0.02}
    args = harness.parse_args(NAME, __doc__, argv, shared, quick, own_options)
    args.num_cpus = args.num_cpus or machine_cores()
    if args.child:
        result = run_ours(args) if args.child == "ours" else run_hf(args)
        args.result.write_text(json.dumps(result), encoding="utf-8")
        return 0
    with harness.work_directory(args.work_dir) as work:
        sizes = [measure_size(hours, args, work, None) for hours in args.hours]
        sizes += [
            measure_size(hours, args, work, args.short_clip_words)
            for hours in args.short_clip_hours
        ]
    return finish(args, build_rows(sizes, args.num_cpus), {"sizes": sizes})


if __name__ == "__main__":
    sys.exit(main())
