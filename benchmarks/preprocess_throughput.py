"""Preprocessing speed (× real time) and peak memory: our Ray pipeline vs the limit and HF datasets.

Task: Common Voice style MP3 (48 kHz) -> 16 kHz float32 in Arrow files, on N cores. Compared:

* ours: `preprocess.prepare_dataset.prepare` (Ray Data decode+resample fused with the Arrow
  shard writer), in a fresh process with a fresh local Ray instance.
* limit: `preprocess.audio_decoding.load` (soundfile decode + soxr HQ resample, our exact code
  path) in one tight loop in one process over the same files, times N cores. No writing, no
  scheduling: what N cores could do if all overhead were zero.
* Hugging Face datasets 3.6: load_dataset("csv") on the TSV, cast_column("audio",
  Audio(sampling_rate=16000)), then the `map` of transformers' run_speech_recognition_ctc.py
  (decode, resample, Wav2Vec2FeatureExtractor per example) with num_proc=N into a fresh cache.

Each system runs in a child process whose whole process tree (driver, Ray daemons and workers,
datasets' forked workers) is sampled for peak memory (PSS, see benchmarks/process_tree.py).

    python -m benchmarks.preprocess_throughput --hours 1 4
    python -m benchmarks.preprocess_throughput --quick
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from benchmarks.benchmark_inputs import make_corpus, manifest_audio_files, work_directory
from benchmarks.benchmark_results import (
    REPO_ROOT,
    add_output_arguments,
    grouped_bars,
    new_figure,
    print_rows,
    result_row,
    save_figure,
    write_results,
)
from benchmarks.process_tree import other_work_meter, run_least_disturbed, wait_sampled

NAME = "preprocess_throughput"
SAMPLING_RATE = 16_000
TARGET_FRACTION_OF_LIMIT = 0.8
SYSTEMS = ("ours", "hf")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=f"python -m benchmarks.{NAME}", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--hours", type=float, nargs="+", default=[1.0, 4.0], help="corpus sizes (default: 1 4)"
    )
    parser.add_argument(
        "--unique_hours",
        type=float,
        default=0.5,
        help="distinct audio synthesized per corpus; the rest are hard links (default: 0.5)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--num_cpus", type=int, default=None, help="cores for every system (default: all)"
    )
    parser.add_argument(
        "--object_store_memory", type=int, default=None, help="bytes for Ray's object store"
    )
    parser.add_argument(
        "--rows_per_task", type=int, default=None, help="PreprocessArguments.rows_per_task"
    )
    parser.add_argument(
        "--decode_batch_size", type=int, default=None, help="PreprocessArguments.decode_batch_size"
    )
    parser.add_argument("--skip_hf", action="store_true", help="measure ours and the limit only")
    parser.add_argument(
        "--work_dir",
        type=Path,
        default=None,
        help="where corpora and outputs go; kept for reuse (default: a temporary directory)",
    )
    parser.add_argument(
        "--wait_for_idle",
        type=float,
        default=0.0,
        help="before each measurement wait up to this many seconds for other work on the "
        "machine to stop (default: 0, just record how busy it was)",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=2,
        help="reruns of a measurement that other work on the machine disturbed; the least "
        "disturbed run is kept (default: 2)",
    )
    parser.add_argument(
        "--sample_interval", type=float, default=0.2, help="memory sampling period in seconds"
    )
    add_output_arguments(parser)
    # Internal: the parent re-invokes this module to run one system in a fresh process.
    parser.add_argument("--child", choices=SYSTEMS, help=argparse.SUPPRESS)
    parser.add_argument("--manifest", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child_output", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child_result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.hours, args.unique_hours = [0.02], 0.02
    args.num_cpus = args.num_cpus or len(os.sched_getaffinity(0))
    return args


# --- Child processes: one system each, timing only its own work --------------------------------


def run_ours(args: argparse.Namespace) -> dict[str, Any]:
    """Our CLI's code path; Ray is started explicitly first so its start-up is timed apart."""
    import ray

    from argument_classes import ManifestArguments, PreprocessArguments
    from preprocess.prepare_dataset import prepare

    overrides = {
        key: getattr(args, key)
        for key in ("rows_per_task", "decode_batch_size")
        if getattr(args, key) is not None
    }
    preprocess = PreprocessArguments(
        output_dir=str(args.child_output),
        num_cpus=args.num_cpus,
        object_store_memory=args.object_store_memory,
        **overrides,
    )
    started = time.perf_counter()
    # The same call prepare() makes when Ray is not running yet.
    ray.init(
        num_cpus=args.num_cpus,
        object_store_memory=args.object_store_memory,
        include_dashboard=False,
    )
    ray_started = time.perf_counter()
    summary = prepare(ManifestArguments(manifest=str(args.manifest)), preprocess)
    finished = time.perf_counter()
    ray.shutdown()
    return {
        "audio_seconds": summary["hours_out"] * 3600,
        "seconds": finished - ray_started,
        "ray_start_seconds": ray_started - started,
        "pipeline_seconds": summary["pipeline_seconds"],
        "accepted": summary["accepted"],
        "rejected": summary["rejected"],
        "shards": summary["shards"],
        "preprocess_arguments": {
            "rows_per_task": preprocess.rows_per_task,
            "decode_batch_size": preprocess.decode_batch_size,
        },
    }


def _hf_prepare_example(example: dict[str, Any]) -> dict[str, Any]:
    """The per-example `map` of transformers' examples/pytorch/speech-recognition recipe."""
    audio = example["audio"]
    example["input_values"] = _FEATURE_EXTRACTOR(
        audio["array"], sampling_rate=audio["sampling_rate"]
    ).input_values[0]
    example["input_length"] = len(example["input_values"])
    return example


_FEATURE_EXTRACTOR: Any = None


def run_hf(args: argparse.Namespace) -> dict[str, Any]:
    """Hugging Face datasets 3.6 decoding (soundfile + librosa/soxr) into its Arrow cache."""
    global _FEATURE_EXTRACTOR
    import datasets
    from transformers import Wav2Vec2FeatureExtractor

    datasets.disable_progress_bars()
    # The wav2vec2-base defaults, built locally: nothing is downloaded.
    _FEATURE_EXTRACTOR = Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=SAMPLING_RATE, do_normalize=True, return_attention_mask=True
    )
    clips = str(args.manifest.parent / "clips")
    started = time.perf_counter()
    dataset = datasets.load_dataset(
        "csv",
        data_files=str(args.manifest),
        delimiter="\t",
        quoting=csv.QUOTE_NONE,
        split="train",
        cache_dir=str(args.child_output),
    )
    # Common Voice on the Hub stores absolute paths; the TSV's are relative to clips/.
    dataset = dataset.map(
        lambda batch: {"audio": [os.path.join(clips, path) for path in batch["path"]]},
        batched=True,
    )
    dataset = dataset.cast_column("audio", datasets.Audio(sampling_rate=SAMPLING_RATE))
    dataset = dataset.map(
        _hf_prepare_example,
        remove_columns=dataset.column_names,
        num_proc=args.num_cpus if args.num_cpus > 1 else None,
    )
    finished = time.perf_counter()
    lengths = dataset["input_length"]
    return {
        "audio_seconds": sum(lengths) / SAMPLING_RATE,
        "seconds": finished - started,
        "rows": len(lengths),
        "cache_files": len(dataset.cache_files),
    }


def run_child(args: argparse.Namespace) -> None:
    result = run_ours(args) if args.child == "ours" else run_hf(args)
    args.child_result.write_text(json.dumps(result))


# --- Parent: corpus, limit, children, results ---------------------------------------------------


def measure_limit(files: list[str]) -> dict[str, Any]:
    """Single-process decode+resample speed over `files`, in audio seconds per second."""
    from preprocess.audio_decoding import load

    audio_samples = 0
    with other_work_meter() as other_work:
        started = time.perf_counter()
        for path in files:
            decoded = load(path, SAMPLING_RATE)
            if decoded.samples is not None:
                audio_samples += decoded.samples.size
        seconds = time.perf_counter() - started
    audio_seconds = audio_samples / SAMPLING_RATE
    return {
        "audio_seconds": audio_seconds,
        "seconds": seconds,
        "x_real_time": audio_seconds / seconds,
        **other_work,
    }


def spawn_system(
    system: str, args: argparse.Namespace, manifest: Path, work: Path
) -> dict[str, Any]:
    """Runs one system in a fresh interpreter while sampling its process tree."""
    output = work / f"output-{system}-{manifest.parent.name}"
    shutil.rmtree(output, ignore_errors=True)
    result_file = work / f"result-{system}.json"
    log_file = work / f"log-{system}-{manifest.parent.name}.txt"
    command = [sys.executable, "-m", f"benchmarks.{NAME}", "--child", system]
    command += ["--manifest", str(manifest), "--child_output", str(output)]
    command += ["--child_result", str(result_file), "--num_cpus", str(args.num_cpus)]
    for option in ("object_store_memory", "rows_per_task", "decode_batch_size"):
        if getattr(args, option) is not None:
            command += [f"--{option}", str(getattr(args, option))]
    # Offline: datasets must not look for scripts or metadata on the Hub.
    environment = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    with open(log_file, "w", encoding="utf-8") as log:
        process = psutil.Popen(
            command, cwd=REPO_ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT
        )
        memory = wait_sampled(process, args.sample_interval)
    if process.returncode != 0:
        tail = log_file.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise RuntimeError(f"{system} failed with exit code {process.returncode}:\n{tail}")
    result = json.loads(result_file.read_text())
    output_bytes = sum(f.stat().st_size for f in output.rglob("*") if f.is_file())
    # Free the disk and page cache before the next system runs.
    shutil.rmtree(output, ignore_errors=True)
    return {
        **result,
        "x_real_time": result["audio_seconds"] / result["seconds"],
        "output_gib": output_bytes / 2**30,
        "memory": memory,
    }


def measure_size(hours: float, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Every system on one corpus; the limit is taken before and after to expose drift."""
    manifest = make_corpus(work, hours, args.unique_hours, args.seed)
    files = manifest_audio_files(manifest)
    measured: dict[str, Any] = {"hours": hours, "rows": len(files)}
    measured["unique_files"] = len({os.stat(path).st_ino for path in files})
    machine_cores = len(os.sched_getaffinity(0))

    def disturbance(result: dict[str, Any]) -> float:
        """Share of the machine's CPU capacity other work took during a measurement."""
        if "memory" in result:
            memory = result["memory"]
            other_seconds, wall = memory["cpu_seconds_outside_tree"], memory["process_wall_seconds"]
        else:
            other_seconds, wall = result["cpu_seconds_outside_process"], result["seconds"]
        return other_seconds / (wall * machine_cores)

    def least_disturbed(measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        return run_least_disturbed(measure, disturbance, args.retries, args.wait_for_idle)

    measured["limit_before"] = least_disturbed(lambda: measure_limit(files))
    measured["ours"] = least_disturbed(lambda: spawn_system("ours", args, manifest, work))
    if not args.skip_hf:
        measured["hf"] = least_disturbed(lambda: spawn_system("hf", args, manifest, work))
    measured["limit_after"] = least_disturbed(lambda: measure_limit(files))
    # The faster of the two single-core runs: the stricter bar for us.
    single_core = max(
        measured["limit_before"]["x_real_time"], measured["limit_after"]["x_real_time"]
    )
    measured["limit"] = {
        "x_real_time_one_core": single_core,
        "x_real_time": single_core * args.num_cpus,
    }
    ours = measured["ours"]
    ours["x_real_time_with_ray_start"] = ours["audio_seconds"] / (
        ours["seconds"] + ours["ray_start_seconds"]
    )
    ours["x_real_time_pipeline_only"] = ours["audio_seconds"] / ours["pipeline_seconds"]
    ours["fraction_of_limit"] = ours["x_real_time"] / measured["limit"]["x_real_time"]
    ours["meets_target"] = ours["fraction_of_limit"] >= TARGET_FRACTION_OF_LIMIT
    return measured


def build_rows(sizes: list[dict[str, Any]], num_cpus: int) -> list[dict[str, Any]]:
    """Pipeline efficiency against the limit; what a user waits for against HF."""
    limit_name = "decode+resample limit (1 process × cores)"
    hf_name = "HF datasets 3.6 map(num_proc)"
    rows = []
    for size in sizes:
        where = f"{size['hours']:g} h corpus, {num_cpus} cores"
        ours, limit = size["ours"], size["limit"]["x_real_time"]
        speed = f"preprocessing speed, {where}"
        speed_from_cold = f"preprocessing speed incl. Ray start, {where}"
        rows.append(
            result_row(
                speed, ours["x_real_time"], limit, limit_name, "× real time", higher_is_better=True
            )
        )
        rows.append(
            result_row(
                speed_from_cold,
                ours["x_real_time_with_ray_start"],
                limit,
                limit_name,
                "× real time",
                higher_is_better=True,
                headline=False,
            )
        )
        if "hf" not in size:
            continue
        hf = size["hf"]
        # HF starts no cluster, so the user-visible comparison charges us Ray's start-up.
        rows.append(
            result_row(
                speed_from_cold,
                ours["x_real_time_with_ray_start"],
                hf["x_real_time"],
                hf_name,
                "× real time",
                higher_is_better=True,
            )
        )
        rows.append(
            result_row(
                f"peak memory of all processes (PSS), {where}",
                ours["memory"]["peak_pss_gib"],
                hf["memory"]["peak_pss_gib"],
                hf_name,
                "GiB",
                higher_is_better=False,
            )
        )
    return rows


def plot(sizes: list[dict[str, Any]], args: argparse.Namespace) -> None:
    labels = [f"{size['hours']:g} h" for size in sizes]
    speed = {
        "limit (1 process × cores)": [s["limit"]["x_real_time"] for s in sizes],
        "ours": [s["ours"]["x_real_time"] for s in sizes],
        "ours incl. Ray start": [s["ours"]["x_real_time_with_ray_start"] for s in sizes],
    }
    memory = {"ours": [s["ours"]["memory"]["peak_pss_gib"] for s in sizes]}
    if not args.skip_hf:
        speed["HF datasets map"] = [s["hf"]["x_real_time"] for s in sizes]
        memory["HF datasets map"] = [s["hf"]["memory"]["peak_pss_gib"] for s in sizes]
    figure, (speed_axis, memory_axis) = new_figure(
        2, f"MP3 48 kHz -> 16 kHz float32 Arrow on {args.num_cpus} cores"
    )
    grouped_bars(speed_axis, labels, speed, "× real time (higher is better)")
    grouped_bars(
        memory_axis, labels, memory, "peak PSS of all processes, GiB", value_format="{:.2f}"
    )
    save_figure(figure, args, NAME)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.child:
        run_child(args)
        return 0
    with work_directory(args.work_dir) as work:
        sizes = [measure_size(hours, args, work) for hours in args.hours]
    rows = build_rows(sizes, args.num_cpus)
    notes = [
        "× real time = seconds of 16 kHz audio written / wall seconds. 'ours' times prepare() "
        "with Ray already started (worker processes still cold: first-task imports count); "
        "'incl. Ray start' adds ray.init(). HF times load_dataset + cast_column + map.",
        f"Target from the issue: ours >= {TARGET_FRACTION_OF_LIMIT:.0%} of the limit.",
        "The limit is one process running preprocess.audio_decoding.load over every manifest "
        "row, times the core count; it was measured before and after the systems and the "
        "faster run is used. It includes no writing, hashing or scheduling.",
        "Corpora synthesize only --unique_hours and hard-link the rest, and were written just "
        "before: every system reads the MP3s from the page cache, never from disk. All rows are "
        "still decoded; only the file reads are cheap.",
        "HF map follows transformers' run_speech_recognition_ctc.py (per-example "
        "Wav2Vec2FeatureExtractor, which also normalizes) minus tokenization; our pipeline "
        "normalizes text and leaves audio normalization to the collator. HF decodes in float64 "
        "(soundfile) and resamples with librosa's soxr_hq; ours soundfile float32 + soxr HQ.",
        "Against HF, ours includes ray.init(): HF starts no cluster, and a user of either waits "
        "for the whole run (Python imports excluded on both sides).",
        "Memory: PSS summed over the child process and all its descendants at one instant (RSS "
        f"sum every {args.sample_interval} s, PSS re-read whenever the RSS sum grew 5 % or every "
        "2 s; see benchmarks/process_tree.py). RSS sums, which count shared pages once per "
        "process, are in details, with CPU seconds by process kind (where non-decoding time "
        "goes) and cpu_seconds_outside_tree (other work on the machine during the run).",
        "Shared machines: every measurement records the share of CPU capacity other work took "
        "during it ('disturbance'); above 8 % it is rerun (up to --retries times) and the "
        "least disturbed run is kept.",
    ]
    details = {"num_cpus": args.num_cpus, "unique_hours": args.unique_hours, "sizes": sizes}
    path = write_results(
        NAME, "Preprocessing throughput and memory", args, argv, rows, details, notes
    )
    plot(sizes, args)
    print_rows(rows)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
