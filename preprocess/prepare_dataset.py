"""Decode and resample a speech corpus once, in parallel on Ray, into memory-mapped Arrow shards.

    python -m preprocess.prepare_dataset --manifest cv/de/train.tsv --output_dir data/train
    ray submit cluster.yaml preprocess/prepare_dataset.py -- --manifest s3://... --output_dir s3://...

Rerunning on the same output directory processes only manifest rows it has not seen.
"""

from __future__ import annotations

import json
import math
import sys
import time
import uuid
from collections import Counter
from dataclasses import asdict
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from argument_classes import (
    ArgumentError,
    ManifestArguments,
    PreprocessArguments,
    parse_arguments,
)
from preprocess import shard_format, storage
from preprocess.audio_decoding import RejectReason
from preprocess.manifest import ManifestError, read_manifest
from preprocess.text_normalization import TextNormalizer, build_vocab, recorded_normalization

TASKS_PER_CPU = 4
MIN_ROWS_PER_TASK = 8
# Ray reruns a task whose worker died (killed, out of memory, node lost) this many times. Ray
# Data's default is without limit, which would loop forever on a file that crashes its decoder.
TASK_MAX_RETRIES = 3


def _check_compatible(previous: dict[str, Any], options: dict[str, Any]) -> None:
    """Rows added to an existing dataset must be made the same way as the rows already in it."""
    recorded = {
        "sampling_rate": previous["options"]["sampling_rate"],
        **recorded_normalization(previous["options"]),
    }
    for key, value in recorded.items():
        if value != options[key]:
            raise ArgumentError(
                f"{key} is {options[key]!r} but the dataset in this output_dir was built with "
                f"{value!r}; use a new --output_dir"
            )


def _split_rows(rows: pa.Table, known_ids: set[str]) -> tuple[pa.Table, list[dict[str, Any]], int]:
    """Rows to decode, rows rejected before decoding, and the count already processed."""
    ids = rows.column("id").to_pylist()
    texts = rows.column("text").to_pylist()
    uris = rows.column("audio_uri").to_pylist()
    keep, rejects, seen, skipped = [], [], set(), 0
    for position, (row_id, text, uri) in enumerate(zip(ids, texts, uris, strict=True)):
        if row_id in known_ids:
            skipped += 1
            continue
        reason = None
        if row_id in seen:
            reason = RejectReason.DUPLICATE_ID
        elif not text:
            reason = RejectReason.EMPTY_TRANSCRIPT
        seen.add(row_id)
        if reason is None:
            keep.append(position)
        else:
            rejects.append({"id": row_id, "path": uri, "reason": reason.value, "detail": ""})
    if len(keep) == rows.num_rows:
        return rows, rejects, skipped  # a copy of every row costs more than this whole loop
    return rows.take(pa.array(keep, pa.int64())), rejects, skipped


def _start_ray(preprocess_args: PreprocessArguments) -> None:
    """Join RAY_ADDRESS or --ray_address when given, else start a local instance."""
    import ray

    if ray.is_initialized():
        return
    init_args: dict[str, Any] = {"include_dashboard": False}
    if preprocess_args.ray_address:
        init_args["address"] = preprocess_args.ray_address
    else:
        init_args["num_cpus"] = preprocess_args.num_cpus
        init_args["object_store_memory"] = preprocess_args.object_store_memory
    ray.init(**init_args)


def task_rows(num_rows: int, cpus: int, max_rows: int) -> int:
    """Rows per decode+write task: at most `max_rows` (--rows_per_task), else small enough that
    every CPU gets TASKS_PER_CPU tasks but not below MIN_ROWS_PER_TASK, against per-task overhead.
    The task count is then rounded up to a multiple of the CPU count where that keeps tasks at
    that floor, so tasks come out about equal and the last wave does not leave cores idle."""
    floor = min(MIN_ROWS_PER_TASK, max_rows)
    rows = min(max_rows, max(floor, math.ceil(num_rows / (cpus * TASKS_PER_CPU))))
    tasks = math.ceil(num_rows / rows)
    rounded = math.ceil(tasks / cpus) * cpus
    if num_rows // rounded >= floor:
        tasks = rounded
    return math.ceil(num_rows / tasks)


def _run_ray_pipeline(
    rows: pa.Table,
    preprocess_args: PreprocessArguments,
    passthrough: list[str],
    run_id: str,
) -> tuple[list[dict[str, Any]], int]:
    """Every task's result, in manifest order, and the cluster's CPU count the tasks were
    sized for."""
    import ray

    from preprocess.arrow_shard_datasink import ArrowShardDatasink

    # One block per task-sized slice of the manifest: each becomes one decode+write task.
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    rows_per_task = task_rows(rows.num_rows, cpus, preprocess_args.rows_per_task)
    slices = [rows.slice(start, rows_per_task) for start in range(0, rows.num_rows, rows_per_task)]
    datasink = ArrowShardDatasink(
        staging_uri=storage.join(
            preprocess_args.output_dir, f"{shard_format.STAGING_DIR}/{run_id}"
        ),
        run_id=run_id,
        schema=shard_format.shard_schema(passthrough),
        max_shard_bytes=preprocess_args.max_shard_bytes,
        rows_per_batch=preprocess_args.decode_batch_size,
        sampling_rate=preprocess_args.sampling_rate,
        min_seconds=preprocess_args.min_duration_seconds,
        max_seconds=preprocess_args.max_duration_seconds,
    )
    # Progress bars for a person at a terminal; in logs they cost driver CPU and say little.
    ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()
    # One write task per slice: it decodes its rows and writes its shards, so the audio never
    # becomes a Ray block. from_blocks keeps one block per slice and takes the blocks' metadata
    # here; from_arrow would first run a remote task per slice for it, a round trip that
    # delayed the first write by about 0.6 s on 2 cores.
    ray.data.from_blocks(slices).write_datasink(
        datasink, ray_remote_args={"max_retries": TASK_MAX_RETRIES}
    )
    # Results arrive as tasks finish; in task order, the dataset's rows (and so every batch plan
    # drawn from its length index) follow the manifest whatever the timing of a run.
    return sorted(datasink.results, key=lambda result: result["task_index"]), cpus


def prepare(
    manifest_args: ManifestArguments, preprocess_args: PreprocessArguments
) -> dict[str, Any]:
    """Decode the manifest's new rows on Ray into the dataset directory, and commit them.

    Rows already in the dataset are skipped, so a rerun with a grown manifest adds only the new
    ones. Starts a local Ray instance unless Ray is initialized or an address is given.

    >>> summary = prepare(
    ...     ManifestArguments(manifest="cv-corpus/de/train.tsv"),
    ...     PreprocessArguments(output_dir="data/de-train"),
    ... )
    >>> summary["accepted"] + summary["rejected"] + summary["already_processed"]  # every row
    831

    Args:
        manifest_args: the manifest and how to read its columns.
        preprocess_args: the output directory, sample rate, duration limits, normalization and
            Ray settings.

    Returns:
        The run summary: row counts (rejects by reason), hours in and out, pipeline seconds,
        and the tasks' own wall and CPU seconds against the CPUs they were sized for.

    Raises:
        ManifestError: the manifest cannot be read or lacks a needed column.
        ArgumentError: the output directory holds a dataset made with other settings.
    """
    started = time.perf_counter()
    normalizer = TextNormalizer(
        preprocess_args.lowercase, preprocess_args.keep_apostrophes, preprocess_args.chars_to_drop
    )
    rows = read_manifest(
        manifest_args.manifest,
        normalizer,
        audio_column=manifest_args.audio_column,
        text_column=manifest_args.text_column,
        id_column=manifest_args.id_column,
        audio_root=manifest_args.audio_root,
        passthrough_columns=manifest_args.passthrough_columns,
    )
    passthrough = [n for n in rows.column_names if n not in ("id", "audio_uri", "sentence", "text")]
    options = {**asdict(manifest_args), **asdict(preprocess_args), **normalizer.options()}
    previous = shard_format.read_dataset_json(preprocess_args.output_dir)
    known_ids: set[str] = set()
    if previous:
        _check_compatible(previous, options)
        known_ids.update(
            shard_format.read_length_index(preprocess_args.output_dir, previous)["id"].to_pylist()
        )
        known_ids.update(
            r["id"] for r in shard_format.read_rejects(preprocess_args.output_dir, previous)
        )
    shard_format.remove_unreferenced(preprocess_args.output_dir, previous)

    to_decode, early_rejects, skipped = _split_rows(rows, known_ids)
    summary: dict[str, Any] = {"manifest_rows": rows.num_rows, "already_processed": skipped}
    if to_decode.num_rows == 0 and not early_rejects:
        summary["message"] = (
            f"nothing to do: all {rows.num_rows} manifest rows are already in "
            f"{preprocess_args.output_dir}"
        )
        return summary

    run_id = time.strftime("%Y%m%d%H%M%S") + "-" + uuid.uuid4().hex[:6]
    results: list[dict[str, Any]] = []
    pipeline_seconds, cpus = 0.0, 0
    if to_decode.num_rows:
        _start_ray(preprocess_args)
        pipeline_started = time.perf_counter()
        results, cpus = _run_ray_pipeline(to_decode, preprocess_args, passthrough, run_id)
        pipeline_seconds = time.perf_counter() - pipeline_started

    shards = [shard_format.ShardInfo(**s) for r in results for s in r["shards"]]
    rejects = early_rejects + [reject for r in results for reject in r["rejects"]]
    accepted_ids = pa.array([i for s in shards for i in s.ids], pa.string())
    accepted_texts = pc.filter(
        to_decode.column("text"), pc.is_in(to_decode.column("id"), accepted_ids)
    )
    previous_symbols = []
    if previous:
        vocab_uri = storage.join(preprocess_args.output_dir, previous["vocab"])
        previous_symbols = list(json.loads(storage.read_bytes(vocab_uri)))
    vocab = build_vocab(
        [*accepted_texts.to_pylist(), "".join(s for s in previous_symbols if len(s) == 1)]
    )
    output_seconds = sum(n for s in shards for n in s.num_samples) / preprocess_args.sampling_rate
    input_seconds = sum(r["input_seconds"] for r in results)
    task_seconds = sum(r["seconds"] for r in results)
    run = shard_format.RunRecord(
        run_id=run_id,
        manifest=manifest_args.manifest,
        accepted=len(accepted_ids),
        rejected=len(rejects),
        skipped_already_processed=skipped,
        input_seconds=input_seconds,
        wall_seconds=time.perf_counter() - started,
    )
    metadata = shard_format.commit_run(
        preprocess_args.output_dir, previous, shards, rejects, vocab, options, run
    )
    summary.update(
        accepted=run.accepted,
        rejected=run.rejected,
        rejected_by_reason=dict(Counter(reject["reason"] for reject in rejects)),
        hours_in=input_seconds / 3600,
        hours_out=output_seconds / 3600,
        pipeline_seconds=pipeline_seconds,
        real_time_factor=output_seconds / pipeline_seconds if pipeline_seconds else 0.0,
        tasks=len(results),
        cpus=cpus,
        task_seconds=task_seconds,
        task_cpu_seconds=sum(r["cpu_seconds"] for r in results),
        # Below 1: CPUs waited on task scheduling, on stragglers or on other jobs.
        task_busy_fraction=task_seconds / (cpus * pipeline_seconds) if results else 0.0,
        dataset=metadata["counts"],
        dataset_hours=metadata["total_hours"],
        shards=len(metadata["shards"]),
    )
    return summary


def _format_summary(summary: dict[str, Any]) -> str:
    if "message" in summary:
        return summary["message"]
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(summary["rejected_by_reason"].items()))
    tasks = ""
    if summary["tasks"]:
        tasks = (
            f"\ntasks: {summary['tasks']} decode+write tasks kept the cluster's "
            f"{summary['cpus']} CPUs {summary['task_busy_fraction']:.0%} busy"
        )
    return (
        f"rows: {summary['manifest_rows']} in manifest, {summary['already_processed']} already "
        f"processed, {summary['accepted']} accepted, {summary['rejected']} rejected"
        f"{' (' + reasons + ')' if reasons else ''}\n"
        f"audio: {summary['hours_in']:.3f} h in, {summary['hours_out']:.3f} h out in "
        f"{summary['pipeline_seconds']:.1f} s = {summary['real_time_factor']:.0f}x real time\n"
        f"dataset: {summary['dataset']['accepted']} rows, {summary['dataset_hours']:.3f} h in "
        f"{summary['shards']} shards{tasks}"
    )


def main(argv: list[str] | None = None) -> int:
    manifest_args, preprocess_args = parse_arguments(
        (ManifestArguments, PreprocessArguments), sys.argv[1:] if argv is None else argv
    )
    try:
        summary = prepare(manifest_args, preprocess_args)
    except (ManifestError, ArgumentError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(_format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
