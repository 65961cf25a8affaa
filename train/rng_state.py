"""Each rank's random generators, saved with a checkpoint so that a resumed run draws the same.

Dropout and SpecAugment draw from torch's generators, which differ per rank (the ranks draw
for batches of different shapes). DeepSpeed's checkpoints do not hold them, so without this a
resumed run trains on the same batches with other dropout masks.
"""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch


def rng_state_file(checkpoint_dir: str, tag: str, rank: int) -> str:
    return os.path.join(checkpoint_dir, tag, f"rng_state_rank{rank}.pt")


def save_rng_state(path: str) -> None:
    """Writes this process's generator states; the checkpoint's `latest` is written after."""
    state = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(state, f"{path}.tmp")
    os.replace(f"{path}.tmp", path)


def load_rng_state(path: str) -> dict[str, Any] | None:
    """The saved states, or None when the checkpoint has none for this rank."""
    if not os.path.isfile(path):
        return None
    return torch.load(path, weights_only=False)


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
