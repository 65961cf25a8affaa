"""The run's logs: metrics as JSON lines in OUTPUT/metrics.jsonl and TensorBoard scalars, and
the optional trace of every micro-batch's utterances."""

from __future__ import annotations

import json
import os
from typing import Any


class MetricsLog:
    """Appends records to OUTPUT/metrics.jsonl and OUTPUT/tensorboard, on the main rank only.

    Appending keeps a resumed run's records after the interrupted run's. The TensorBoard writer
    is created at the first record: importing it would delay the first step by about a second.
    """

    def __init__(self, output_dir: str, enabled: bool) -> None:
        self.output_dir = output_dir
        self.enabled = enabled
        self._file = open(os.path.join(output_dir, "metrics.jsonl"), "a") if enabled else None
        self._tensorboard: Any = None

    def write(self, record: dict[str, Any]) -> None:
        """One record; its numbers (but the step) become scalars at its step."""
        if self._file is None:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tensorboard is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(os.path.join(self.output_dir, "tensorboard"))
        for key, value in record.items():
            if isinstance(value, (int, float)) and key != "step":
                self._tensorboard.add_scalar(key, value, record["step"])


class BatchTrace:
    """Each micro-batch's utterance ids as {step, micro_step, epoch, ids}, appended on every rank
    to OUTPUT/batch_trace/rank{R}.jsonl (--trace_batches): an audit of what a run trained on,
    across resumes. Disabled, `write` does nothing.
    """

    def __init__(self, output_dir: str, rank: int, enabled: bool) -> None:
        self._file = None
        if enabled:
            os.makedirs(os.path.join(output_dir, "batch_trace"), exist_ok=True)
            path = os.path.join(output_dir, "batch_trace", f"rank{rank}.jsonl")
            # Line-buffered: a killed run's trace ends with the last micro-batch it trained.
            self._file = open(path, "a", buffering=1)

    def write(self, step: int, micro_step: int, epoch: int, ids: list[str]) -> None:
        if self._file is not None:
            trace = {"step": step, "micro_step": micro_step, "epoch": epoch, "ids": ids}
            self._file.write(json.dumps(trace) + "\n")
