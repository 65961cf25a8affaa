"""Ray Data sink that writes decoded rows into staged Arrow IPC shard files.

Ray fuses the decoding `map_batches` with this sink's write into one task, so decoded float32
audio goes from the decoder straight into the task's own shard file and never through the object
store; only shard names, length-index entries and rejects travel back to the driver.

When Ray retries a task whose worker died, the new attempt writes under new shard names. The
driver commits only the shards named in the results it received (one per task), so files of a
killed attempt, half-written or complete but never reported, are never committed, and no row is
committed twice; they stay in _staging/, which the commit deletes.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from ray.data import Datasink
from ray.data._internal.execution.interfaces import TaskContext
from ray.data.block import Block, BlockAccessor

from preprocess.shard_format import ShardWriter

REJECT_COLUMNS = ("id", "audio_uri", "reject_reason", "reject_detail")


class ArrowShardDatasink(Datasink[dict[str, Any]]):
    def __init__(
        self, staging_uri: str, run_id: str, schema: pa.Schema, max_shard_bytes: int
    ) -> None:
        self.staging_uri = staging_uri
        self.run_id = run_id
        self.schema = schema
        self.max_shard_bytes = max_shard_bytes
        self.results: list[dict[str, Any]] = []

    def write(self, blocks: Any, ctx: TaskContext) -> dict[str, Any]:
        writer = ShardWriter(
            self.staging_uri,
            f"shard-{self.run_id}-{ctx.task_idx:05d}-{uuid.uuid4().hex[:6]}",  # one per attempt
            self.schema,
            self.max_shard_bytes,
        )
        rejects: list[dict[str, Any]] = []
        input_seconds = 0.0
        block: Block
        for block in blocks:
            table = BlockAccessor.for_block(block).to_arrow()
            input_seconds += sum(table.column("input_seconds").to_pylist())
            rejected = table.column("reject_reason").is_valid()
            for row in table.select(list(REJECT_COLUMNS)).filter(rejected).to_pylist():
                rejects.append(
                    {
                        "id": row["id"],
                        "path": row["audio_uri"],
                        "reason": row["reject_reason"],
                        "detail": row["reject_detail"],
                    }
                )
            # Filtering copies every column, audio included: only when something was rejected.
            if pc.any(rejected).as_py():
                table = table.filter(pc.invert(rejected))
            accepted = table.select(self.schema.names)
            for batch in accepted.cast(self.schema).to_batches():
                writer.write(batch)
        shards = [asdict(shard) for shard in writer.close()]
        return {"shards": shards, "rejects": rejects, "input_seconds": input_seconds}

    def on_write_complete(self, write_result: Any) -> None:
        # Runs on the driver; committing is the caller's job once it has every task's result.
        self.results = list(write_result.write_returns)
