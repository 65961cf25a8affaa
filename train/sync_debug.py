"""Finding the host syncs inside the training step: `W2V2_SYNC_DEBUG=1` on a CUDA machine."""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Iterator

import torch

ENVIRONMENT_VARIABLE = "W2V2_SYNC_DEBUG"
# How torch's sync debug mode words every warning it raises (c10/cuda/CUDAFunctions.cpp);
# torch appends where in its C++ code the warning was triggered.
SYNC_WARNING = "called a synchronizing CUDA operation"


def is_sync_warning(warning: warnings.WarningMessage) -> bool:
    """Whether `warning` is torch's sync debug mode reporting a host synchronization."""
    return str(warning.message).startswith(SYNC_WARNING)


class SyncRecorder:
    """Records where CUDA host synchronizations happen inside `watch()` blocks.

    torch's sync debug mode warns on every synchronizing CUDA call (`.item()`, a blocking copy,
    a data-dependent shape). The warnings are attributed to the Python line that made the
    call, so the file says whether the sync is ours or a library's. Only those warnings are
    counted: any other warning raised in the block is passed on as if it had not been caught,
    so neither is it taken for a sync nor is it lost. Off, `watch()` costs nothing; it is off
    unless the variable is set and CUDA is present.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.seen: dict[tuple[str, str, int], int] = {}
        # What warnings' own module registries do: a "default"-filtered warning re-issued on
        # every micro-step is shown once per place, not once per micro-step.
        self._passed_on: dict = {}

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
        self.record(caught)

    def record(self, caught: list[warnings.WarningMessage]) -> None:
        """Counts the sync warnings among `caught` by (message, file, line); re-issues the rest.

        Re-issued with their own category and place, the other warnings meet the filters they
        would have met had `watch()` not caught them.
        """
        for warning in caught:
            if is_sync_warning(warning):
                key = (str(warning.message).splitlines()[0], warning.filename, warning.lineno)
                self.seen[key] = self.seen.get(key, 0) + 1
            else:
                warnings.warn_explicit(
                    warning.message,
                    warning.category,
                    warning.filename,
                    warning.lineno,
                    registry=self._passed_on,
                )

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
