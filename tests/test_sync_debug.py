"""SyncRecorder's counting, on CPUs: only torch's sync warnings count, other warnings pass on.

Sync debug mode itself needs CUDA; tests/gpu/test_gpu_training.py makes a real sync that the
recorder must catch. Here the warnings are the ones torch issues, raised by hand.
"""

from __future__ import annotations

import inspect
import json
import warnings
from pathlib import Path

import pytest

from train.sync_debug import SYNC_WARNING, SyncRecorder

# The text torch's sync debug mode warns with, where it is triggered included.
TORCH_SYNC_MESSAGE = f"{SYNC_WARNING} (Triggered internally at c10/cuda/CUDAFunctions.cpp:159.)"


def warn_as_a_sync_does() -> int:
    """Issues torch's sync warning as `.item()` on a CUDA tensor would; returns its line."""
    line = inspect.currentframe().f_lineno + 1
    warnings.warn(TORCH_SYNC_MESSAGE, UserWarning, stacklevel=1)
    return line


def caught_in_a_step() -> tuple[list[warnings.WarningMessage], int]:
    """What `watch()` catches in a step with three syncs on one line and a project's own
    warning, and the line of the syncs."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lines = {warn_as_a_sync_does() for _ in range(3)}
        warnings.warn("a project's own deprecation", DeprecationWarning, stacklevel=1)
    (line,) = lines
    return caught, line


def test_only_sync_warnings_are_counted_and_the_others_pass_on() -> None:
    recorder = SyncRecorder(enabled=False)  # counting needs no CUDA
    caught, line = caught_in_a_step()
    with pytest.warns(DeprecationWarning, match="a project's own deprecation"):
        recorder.record(caught)
    assert recorder.seen == {(TORCH_SYNC_MESSAGE, __file__, line): 3}


def test_written_file_lists_each_sync_place_once_with_its_count(tmp_path: Path) -> None:
    recorder = SyncRecorder(enabled=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for _ in range(2):
            caught, line = caught_in_a_step()
            recorder.record(caught)
    recorder.write(str(tmp_path / "sync_debug.json"), is_main=True)
    written = json.loads((tmp_path / "sync_debug.json").read_text())
    assert written == [{"message": TORCH_SYNC_MESSAGE, "file": __file__, "line": line, "count": 6}]
    recorder.write(str(tmp_path / "other_rank.json"), is_main=False)
    assert not (tmp_path / "other_rank.json").exists()
