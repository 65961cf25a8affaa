"""Seconds per startup phase, counted from the process's creation: the trainer's startup.json
and the Hugging Face baseline's phases (benchmarks/hf_trainer_baseline.py) start alike."""

from __future__ import annotations

import json
import time

import psutil


class PhaseClock:
    """Seconds spent in each phase, each ending at its `mark`.

    The first phase starts at the process's creation as the kernel recorded it, not at this
    object's: the interpreter's start and the imports before it count too.
    """

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        # Unix time of the last mark: when the latest phase ended.
        self.last_mark = psutil.Process().create_time()

    def mark(self, phase: str) -> None:
        """Ends `phase` now; the next phase starts here."""
        now = time.time()
        self.phases[phase], self.last_mark = now - self.last_mark, now

    def total(self) -> float:
        """Seconds from the process's creation to the last mark."""
        return sum(self.phases.values())

    def write(self, path: str) -> None:
        """The phases and their "total" as a JSON object (the trainer's startup.json)."""
        with open(path, "w", encoding="utf-8") as file:
            json.dump({**self.phases, "total": self.total()}, file, indent=1)
