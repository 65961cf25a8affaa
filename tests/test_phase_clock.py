"""PhaseClock: startup phases counted from the process's creation, as the kernel recorded it."""

from __future__ import annotations

import json
import time

import psutil
import pytest

from train.phase_clock import PhaseClock


def test_the_first_phase_starts_at_the_process_creation_not_at_the_clock(tmp_path):
    created = psutil.Process().create_time()
    clock = PhaseClock()
    before = time.time()
    clock.mark("imports")
    after = time.time()
    # The interpreter and pytest started well before this clock: that time is in the phase.
    assert before - created <= clock.phases["imports"] <= after - created
    time.sleep(0.01)
    clock.mark("work")
    assert clock.phases["work"] >= 0.01
    assert clock.last_mark == pytest.approx(created + clock.total(), abs=1e-6)

    clock.write(str(tmp_path / "startup.json"))
    written = json.loads((tmp_path / "startup.json").read_text())
    assert written == {**clock.phases, "total": clock.total()}
    assert list(written) == ["imports", "work", "total"]
