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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Marks this folder's tests `gpu`, and skips them without CUDA (CI, CPU machines)."""
    no_cuda = None if torch.cuda.is_available() else pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if GPU_TESTS in item.path.parents:
            item.add_marker(pytest.mark.gpu)
            if no_cuda is not None:
                item.add_marker(no_cuda)
