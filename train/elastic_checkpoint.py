"""Resuming a checkpoint on another number of ranks, through DeepSpeed's universal checkpoint.

A ZeRO checkpoint stores each rank's partition of the optimizer state, so it loads only on the
world size that wrote it. DeepSpeed's `ds_to_universal` rewrites it per parameter (fp32
master, exp_avg, exp_avg_sq), which `"checkpoint": {"load_universal": true}` loads on any
number of ranks, optimizer state included (zero_to_fp32 would keep only the weights).

Each checkpoint directory also holds trainer_state.json, written before DeepSpeed writes the
checkpoint and its `latest` file, so the layout that wrote it is known without loading it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from typing import Any

import torch.distributed as dist

TRAINER_STATE = "trainer_state.json"


def write_trainer_state(checkpoint_dir: str, tag: str, state: dict[str, Any]) -> None:
    """Records the run's layout in checkpoint_dir/tag (rank 0, before the checkpoint)."""
    os.makedirs(os.path.join(checkpoint_dir, tag), exist_ok=True)
    with open(os.path.join(checkpoint_dir, tag, TRAINER_STATE), "w", encoding="utf-8") as file:
        json.dump(state, file)


def latest_trainer_state(checkpoint_dir: str) -> dict[str, Any]:
    """The latest checkpoint's trainer_state.json, with its tag under "tag"."""
    with open(os.path.join(checkpoint_dir, "latest"), encoding="utf-8") as file:
        tag = file.read().strip()
    path = os.path.join(checkpoint_dir, tag, TRAINER_STATE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} is missing: the checkpoint was written by an older version of the trainer"
        )
    with open(path, encoding="utf-8") as file:
        return {**json.load(file), "tag": tag}


def universal_checkpoint(checkpoint_dir: str, tag: str) -> str:
    """Converts checkpoint `tag` to a universal one once; returns the universal tag.

    A collective: global rank 0 converts (in a child process: the converter runs its own worker
    pools) into a temporary directory and renames it into place, so an interrupted conversion
    is never taken for a finished one; the other ranks wait at the barrier.
    """
    universal = f"{tag}_universal"
    target = os.path.join(checkpoint_dir, universal)
    if dist.get_rank() == 0 and not os.path.isdir(target):
        staging = f"{target}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        command = [
            sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
            "--input_folder", os.path.join(checkpoint_dir, tag), "--output_folder", staging,
            # Our checkpoints carry no tensor-parallel layout info; DeepSpeed fills in the
            # defaults for a model without tensor parallelism.
            "--inject_missing_state",
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"ds_to_universal failed on {tag}: {result.stderr[-2000:]}")
        os.replace(staging, target)
    dist.barrier()
    return universal
