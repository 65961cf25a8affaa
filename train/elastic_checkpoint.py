"""Resuming a checkpoint on another number of ranks, through DeepSpeed's universal checkpoint.

A ZeRO checkpoint stores each rank's partition of the optimizer state, so it loads only on the
world size that wrote it. DeepSpeed's `ds_to_universal` rewrites it per parameter (fp32
master, exp_avg, exp_avg_sq), which `"checkpoint": {"load_universal": true}` loads on any
number of ranks, optimizer state included (zero_to_fp32 would keep only the weights).

Each checkpoint directory also holds trainer_state.json, written before DeepSpeed writes the
checkpoint and its `latest` file, so the layout that wrote it is known without loading it.

A resume on another number of ranks keeps the run's global batch (the audio seconds of one
optimizer step) and splits it afresh: `BatchLayout.for_world_size`. Steps per epoch, the
learning-rate schedule and the number of epochs then keep the meaning they were planned with,
as LLM Foundry keeps `global_train_batch_size` fixed across device counts.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from train.host_group import raise_if_any_failed

TRAINER_STATE = "trainer_state.json"
# Written into a universal checkpoint: the id of the trainer state it was converted from.
CONVERTED_FROM = "converted_from.json"


@dataclass(frozen=True)
class BatchLayout:
    """How one optimizer step's audio is split: ranks x accumulated micro-batches x budget."""

    world_size: int
    gradient_accumulation_steps: int
    max_batch_seconds: float

    @property
    def global_batch_seconds(self) -> float:
        """Padded audio seconds one optimizer step may hold over all ranks."""
        return self.world_size * self.gradient_accumulation_steps * self.max_batch_seconds

    def for_world_size(self, world_size: int, max_batch_seconds: float) -> BatchLayout:
        """The same global batch on `world_size` ranks, no micro-batch over `max_batch_seconds`.

        The fewest accumulation steps that keep each micro-batch within the budget; where the
        split is not whole (8 ranks to 3) the per-rank budget shrinks to fit, so the global
        budget stays exactly the same and memory per rank never grows.
        """
        micro_batches = self.world_size * self.gradient_accumulation_steps
        if micro_batches % world_size == 0 and max_batch_seconds >= self.max_batch_seconds:
            return BatchLayout(world_size, micro_batches // world_size, self.max_batch_seconds)
        # The tolerance keeps float noise from adding an accumulation step.
        accumulation = max(
            1, math.ceil(self.global_batch_seconds / (world_size * max_batch_seconds) - 1e-9)
        )
        budget = self.global_batch_seconds / (world_size * accumulation)
        return BatchLayout(world_size, accumulation, budget)


def write_trainer_state(checkpoint_dir: str, tag: str, state: dict[str, Any]) -> None:
    """Records the run's layout in checkpoint_dir/tag (rank 0, before the checkpoint).

    Each write gets a fresh `checkpoint_id`, so a universal conversion of an earlier checkpoint
    under the same tag (a run resumed from before it saved the tag again) is known to be stale.
    """
    os.makedirs(os.path.join(checkpoint_dir, tag), exist_ok=True)
    path = os.path.join(checkpoint_dir, tag, TRAINER_STATE)
    with open(f"{path}.tmp", "w", encoding="utf-8") as file:
        json.dump({**state, "checkpoint_id": uuid.uuid4().hex}, file)
    os.replace(f"{path}.tmp", path)


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


def universal_checkpoint(checkpoint_dir: str, saved: dict[str, Any], group: Any) -> str:
    """Converts the checkpoint of trainer state `saved` to universal form; returns its tag.

    A collective on `group` (see train.host_group): global rank 0 converts, in a child process
    (the converter runs its own worker pools), into a temporary directory renamed into place,
    so an interrupted conversion is never taken for a finished one. A conversion is reused
    only if it was made from this very checkpoint (its `checkpoint_id`): a tag saved again
    after a resume from an earlier step is converted again.
    """
    tag = saved["tag"]
    universal = f"{tag}_universal"
    target = os.path.join(checkpoint_dir, universal)
    stale = not os.path.isdir(target) or _converted_from(target) != saved.get("checkpoint_id")
    failure = None
    if dist.get_rank() == 0 and stale:
        try:
            _convert(os.path.join(checkpoint_dir, tag), target, saved.get("checkpoint_id"))
        except (OSError, RuntimeError) as error:
            failure = str(error)
    raise_if_any_failed(group, failure)
    return universal


def _converted_from(universal_dir: str) -> str | None:
    """The checkpoint_id a universal checkpoint was converted from (None if unknown)."""
    try:
        with open(os.path.join(universal_dir, CONVERTED_FROM), encoding="utf-8") as file:
            return json.load(file)["checkpoint_id"]
    except (OSError, ValueError, KeyError):
        return None


def _convert(source: str, target: str, checkpoint_id: str | None) -> None:
    staging = f"{target}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    command = [
        sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
        "--input_folder", source, "--output_folder", staging,
        # Our checkpoints carry no tensor-parallel layout info; DeepSpeed fills in the
        # defaults for a model without tensor parallelism.
        "--inject_missing_state",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"ds_to_universal failed on {source}: {last}")
    with open(os.path.join(staging, CONVERTED_FROM), "w", encoding="utf-8") as file:
        json.dump({"checkpoint_id": checkpoint_id}, file)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
