"""Every test in tests/gpu is marked `gpu` and skipped where torch sees no CUDA device.

Collecting them imports no Ray, soundfile, soxr or espeak-ng, which the GPU machine lacks. Run
them there with `python -m pytest --confcutdir tests/gpu tests/gpu`: --confcutdir keeps
tests/conftest.py (Ray, espeak-ng speech) from loading.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

GPU_TESTS = Path(__file__).resolve().parent
# Each test's limit where pytest-timeout is installed (the GPU image has it): one trainer launch,
# which test_gpu_training.py kills at 120 s itself, and the checks after it.
TEST_TIMEOUT_SECONDS = 150


def launch_position(item: pytest.Item) -> int:
    """Where the trainer launch a test looks at comes in its module's LAUNCHES; a test not
    parametrized over them looks at the first."""
    launches = getattr(getattr(item, "module", None), "LAUNCHES", [])
    params = item.callspec.params if hasattr(item, "callspec") else {}
    launch = (params.get("config"), params.get("num_ranks"))
    return launches.index(launch) if launch in launches else 0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Marks this folder's tests `gpu` and skips them without CUDA (CI, CPU machines); runs them
    in the order of the launches they look at, so that a run stopped at its time limit has the
    most telling results; limits each where pytest-timeout is installed."""
    no_cuda = None if torch.cuda.is_available() else pytest.mark.skip(reason="needs a CUDA GPU")
    timeout = config.pluginmanager.hasplugin("timeout")
    slots = [i for i, item in enumerate(items) if GPU_TESTS in item.path.parents]
    for item in (items[i] for i in slots):
        item.add_marker(pytest.mark.gpu)
        if no_cuda is not None:
            item.add_marker(no_cuda)
        if timeout:
            item.add_marker(pytest.mark.timeout(TEST_TIMEOUT_SECONDS))
    # Reordered in their own places: tests elsewhere in the session keep theirs.
    ordered = sorted((items[i] for i in slots), key=launch_position)
    for slot, item in zip(slots, ordered, strict=True):
        items[slot] = item
