"""Ray Data sink that decodes manifest rows and writes them into staged Arrow IPC shard files.

Each write task gets one task-sized block of manifest rows (paths and transcripts, not audio),
decodes every row and appends it to the task's own shards. Decoded audio goes from the decoder
into the shard file and never becomes a Ray block or touches the object store; only shard names,
length-index entries and rejects travel back to the driver.

When Ray retries a task whose worker died, the new attempt writes under new shard names. The
driver commits only the shards named in the results it received (one per task), so files of a
killed attempt, half-written or complete but never reported, are never committed, and no row is
committed twice; they stay in _staging/, which the commit deletes.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict
from typing import Any

import pyarrow as pa
from ray.data import Datasink
from ray.data._internal.execution.interfaces import TaskContext
from ray.data.block import Block, BlockAccessor

from preprocess import audio_decoding
from preprocess.shard_format import ShardWriter


class ArrowShardDatasink(Datasink[dict[str, Any]]):
    def __init__(
        self,
        staging_uri: str,
        run_id: str,
        schema: pa.Schema,
        max_shard_bytes: int,
        rows_per_batch: int,
        sampling_rate: int,
        min_seconds: float,
        max_seconds: float,
    ) -> None:
        self.staging_uri = staging_uri
        self.run_id = run_id
        self.schema = schema
        self.max_shard_bytes = max_shard_bytes
        self.rows_per_batch = rows_per_batch
        self.sampling_rate = sampling_rate
        self.min_seconds = min_seconds
        self.max_seconds = max_seconds
        self.results: list[dict[str, Any]] = []

    def write(self, blocks: Any, ctx: TaskContext) -> dict[str, Any]:
        started, cpu_started = time.perf_counter(), time.process_time()
        writer = ShardWriter(
            self.staging_uri,
            f"shard-{self.run_id}-{ctx.task_idx:05d}-{uuid.uuid4().hex[:6]}",  # one per attempt
            self.schema,
            self.max_shard_bytes,
            self.rows_per_batch,
        )
        rejects: list[dict[str, Any]] = []
        input_seconds = 0.0
        block: Block
        for block in blocks:
            for row in BlockAccessor.for_block(block).to_arrow().to_pylist():
                decoded = audio_decoding.load_utterance(
                    row["audio_uri"], self.sampling_rate, self.min_seconds, self.max_seconds
                )
                input_seconds += decoded.seconds
                if decoded.samples is None:
                    assert decoded.reject_reason is not None  # every failure names its reason
                    rejects.append(
                        {
                            "id": row["id"],
                            "path": row["audio_uri"],
                            "reason": decoded.reject_reason.value,
                            "detail": decoded.detail,
                        }
                    )
                    continue
                writer.add(row, decoded.samples, decoded.mean, decoded.std)
        shards = [asdict(shard) for shard in writer.close()]
        return {
            "task_index": ctx.task_idx,  # the slice's position in the manifest
            "shards": shards,
            "rejects": rejects,
            "input_seconds": input_seconds,
            # The task's own wall and CPU time: the run summary sets them against the
            # pipeline's, which tells scheduling gaps apart from slow decoding.
            "seconds": time.perf_counter() - started,
            "cpu_seconds": time.process_time() - cpu_started,
        }

    def on_write_complete(self, write_result: Any) -> None:
        # Runs on the driver; committing is the caller's job once it has every task's result.
        self.results = list(write_result.write_returns)
