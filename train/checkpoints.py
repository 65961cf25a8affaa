"""A run's checkpoints in OUTPUT/checkpoints: saving one, and resuming from the latest.

Each checkpoint step{N} holds, written in this order so that a checkpoint DeepSpeed's `latest`
names is whole: rank 0's trainer_state.json (the run's plan, batch layout, total steps and
vocabulary, read before the engine exists: train.elastic_checkpoint), each rank's random
generators (train.rng_state), then DeepSpeed's own files, whose client_state holds where the
loop stood (`TrainState`).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from typing import Any

import torch.distributed as dist

from train.duration_bucket_sampler import DurationBucketSampler
from train.elastic_checkpoint import latest_trainer_state, universal_checkpoint, write_trainer_state
from train.rng_state import load_rng_state, rng_state_file, save_rng_state

CHECKPOINT_DIR = "checkpoints"


class CheckpointError(ValueError):
    """Checkpoints this run cannot start beside or resume from; one line for the user."""


@dataclasses.dataclass
class TrainState:
    """Where the loop stood at a checkpoint: DeepSpeed's client_state of it, one key per field."""

    step: int
    # DurationBucketSampler.state_dict(): the epoch and the micro-steps consumed in it.
    sampler: dict[str, Any]
    # Non-finite losses so far; checkpoints written before they were counted have none.
    nonfinite_losses: int = 0

    @property
    def epoch(self) -> int:
        return self.sampler["epoch"]

    def client_state(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_client_state(cls, client_state: dict[str, Any]) -> TrainState:
        """Reads the fields alone: DeepSpeed adds its own entries to the client_state it loads,
        and older checkpoints also hold the vocabulary, which trainer_state.json holds now."""
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in client_state.items() if key in names})


def check_output_dir(output_dir: str, resuming: bool) -> None:
    """Refuses to train over a run's checkpoints unless resuming, and to resume without one."""
    has_checkpoint = os.path.isfile(os.path.join(output_dir, CHECKPOINT_DIR, "latest"))
    if has_checkpoint and not resuming:
        raise CheckpointError(
            f"{output_dir} has checkpoints: pass --resume to continue from them, "
            "or choose another --output_dir"
        )
    if resuming and not has_checkpoint:
        raise CheckpointError(f"no checkpoint to resume from in {output_dir}")


def trainer_state_to_resume(
    checkpoint_dir: str, vocab: dict[str, int], train_dir: str
) -> dict[str, Any]:
    """The latest checkpoint's trainer state, with its tag under "tag"; refused when an older
    trainer wrote it, or when it was trained on another vocabulary than `train_dir`'s `vocab`
    (checked before the model is built: its head has one output per vocabulary entry)."""
    try:
        saved = latest_trainer_state(checkpoint_dir)
    except FileNotFoundError as error:
        raise CheckpointError(str(error)) from None
    if saved.get("vocab", vocab) != vocab:
        raise CheckpointError(
            f"the checkpoint in {checkpoint_dir} was trained on another vocabulary than "
            f"{train_dir}'s"
        )
    return saved


def prune_checkpoints(checkpoint_dir: str, keep: int) -> None:
    """Keeps the last `keep` steps' checkpoints, with their universal conversions."""
    tags = [re.fullmatch(r"step(\d+)(_universal)?", t) for t in os.listdir(checkpoint_dir)]
    steps = sorted({int(match[1]) for match in tags if match})
    for match in tags:
        if match and int(match[1]) in steps[: max(len(steps) - keep, 0)]:
            shutil.rmtree(os.path.join(checkpoint_dir, match[0]), ignore_errors=True)


def save_checkpoint(
    engine: Any, checkpoint_dir: str, state: TrainState, run_plan: dict[str, Any], keep: int
) -> None:
    """Checkpoint `step{state.step}` (a collective), in the order the module docstring gives;
    `run_plan` is what trainer_state.json records beside the step. Rank 0 then prunes all but
    the last `keep`."""
    tag, rank = f"step{state.step}", dist.get_rank()
    if rank == 0:
        write_trainer_state(checkpoint_dir, tag, {"step": state.step, **run_plan})
    save_rng_state(rng_state_file(checkpoint_dir, tag, rank))
    engine.save_checkpoint(checkpoint_dir, tag=tag, client_state=state.client_state())
    if rank == 0:
        prune_checkpoints(checkpoint_dir, keep)


def resume_checkpoint(
    engine: Any,
    checkpoint_dir: str,
    saved: dict[str, Any],
    sampler: DurationBucketSampler,
    cpu_group: Any,
    universal: bool,
) -> tuple[TrainState, dict[str, Any] | None]:
    """Loads the checkpoint of trainer state `saved` into `engine` and `sampler` (a collective):
    where the loop stood, and this rank's random generators, for the loop to restore when it
    draws its first batch (None if the checkpoint has none for this rank).

    `universal`: the checkpoint was written by another number of ranks, so its universal form
    is loaded (converted first if need be), which any world size reads; the generators of
    ranks that no longer exist cannot be continued, so there are none.
    """
    tag = universal_checkpoint(checkpoint_dir, saved, cpu_group) if universal else saved["tag"]
    _, client_state = engine.load_checkpoint(checkpoint_dir, tag=tag)
    state = TrainState.from_client_state(client_state)
    try:
        sampler.load_state_dict(state.sampler)
    except ValueError as error:
        raise CheckpointError(f"the checkpoint does not fit this train set: {error}") from None
    if universal:
        return state, None
    return state, load_rng_state(rng_state_file(checkpoint_dir, saved["tag"], dist.get_rank()))
