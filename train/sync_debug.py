"""Finding the host syncs inside the training step: `W2V2_SYNC_DEBUG=1` on a CUDA machine."""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Iterator

import torch

ENVIRONMENT_VARIABLE = "W2V2_SYNC_DEBUG"


class SyncRecorder:
    """Records where CUDA host synchronizations happen inside `watch()` blocks.

    torch's sync debug mode warns on every synchronizing CUDA call (`.item()`, a blocking copy,
    a data-dependent shape). The warnings are attributed to the Python line that made the
    call, so the file says whether the sync is ours or a library's. Off, `watch()` costs
    nothing; it is off unless the variable is set and CUDA is present.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.seen: dict[tuple[str, str, int], int] = {}

    @classmethod
    def from_environment(cls) -> SyncRecorder:
        return cls(os.environ.get(ENVIRONMENT_VARIABLE) == "1" and torch.cuda.is_available())

    @contextlib.contextmanager
    def watch(self) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield
            finally:
                torch.cuda.set_sync_debug_mode("default")
        for warning in caught:
            key = (str(warning.message).splitlines()[0], warning.filename, warning.lineno)
            self.seen[key] = self.seen.get(key, 0) + 1

    def write(self, path: str, is_main: bool) -> None:
        """The distinct syncs seen, with counts, as JSON (rank 0 only)."""
        if not (self.enabled and is_main):
            return
        records = [
            {"message": message, "file": file, "line": line, "count": count}
            for (message, file, line), count in sorted(self.seen.items())
        ]
        with open(path, "w", encoding="utf-8") as file:
            json.dump(records, file, indent=1)
