"""Saving and resuming a run's checkpoints, on real DeepSpeed engines in a process group of one."""

from __future__ import annotations

import dataclasses
import itertools
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from one_rank_group import engine_of, process_group_of_one
from torch import nn

from train.checkpoints import (
    CheckpointError,
    TrainState,
    check_output_dir,
    prune_checkpoints,
    resume_checkpoint,
    save_checkpoint,
    trainer_state_to_resume,
)
from train.duration_bucket_sampler import DurationBucketSampler
from train.elastic_checkpoint import BatchLayout, write_trainer_state
from train.host_group import host_group
from train.rng_state import restore_rng_state

VOCAB = {"[PAD]": 0, "[UNK]": 1, "|": 2, "a": 3}
LAYOUT = BatchLayout(world_size=1, gradient_accumulation_steps=1, max_batch_seconds=2.0)
RUN_PLAN = {"total_steps": 10, "vocab": VOCAB, **dataclasses.asdict(LAYOUT)}


def sampler(seed: int = 42) -> DurationBucketSampler:
    """24 utterances of 0.5 to 1.5 s, in batches of at most 2 s of audio, on one rank."""
    lengths = np.random.default_rng(0).integers(8_000, 24_000, size=24)
    return DurationBucketSampler(
        audio_lengths=lengths, sampling_rate=16_000, max_batch_seconds=2.0, world_size=1, seed=seed
    )


def trained_engine(seed: int) -> Any:
    """A linear model's engine after one optimizer step (seeded: equal seeds, equal weights)."""
    torch.manual_seed(seed)
    engine, _ = engine_of(nn.Linear(4, 3))
    engine.backward(engine(torch.ones(2, 4)).square().sum())
    engine.step()
    return engine


def same_weights(engine: Any, other: Any) -> bool:
    pairs = zip(engine.module.parameters(), other.module.parameters(), strict=True)
    return all(torch.equal(mine, theirs) for mine, theirs in pairs)


@pytest.fixture
def one_rank(monkeypatch):
    """Rank 0 of a process group of one, as DeepSpeed's launcher would describe it."""
    process_group_of_one()
    monkeypatch.setenv("LOCAL_RANK", "0")


def test_the_train_state_is_the_client_state_and_reads_older_checkpoints():
    state = TrainState(step=7, sampler={"epoch": 2, "consumed_micro_steps": 3}, nonfinite_losses=1)
    assert state.client_state() == {
        "step": 7,
        "sampler": {"epoch": 2, "consumed_micro_steps": 3},
        "nonfinite_losses": 1,
    }
    assert state.epoch == 2
    # DeepSpeed adds its own entries to what it loads.
    assert TrainState.from_client_state({**state.client_state(), "ds_version": "0.19"}) == state
    # Written before the count existed, with the vocabulary trainer_state.json now holds.
    older = {"step": 7, "sampler": state.sampler, "vocab": VOCAB}
    assert TrainState.from_client_state(older) == TrainState(7, state.sampler, 0)


def test_a_resume_loads_weights_position_counters_and_generators(one_rank, tmp_path):
    checkpoint_dir = str(tmp_path / "checkpoints")
    engine, batches = trained_engine(seed=0), sampler()
    assert len(list(itertools.islice(batches, 2))) == 2  # two micro-batches trained
    state = TrainState(1, batches.state_dict(consumed_in_pass=2), nonfinite_losses=3)
    torch.manual_seed(1234)
    save_checkpoint(engine, checkpoint_dir, state, RUN_PLAN, keep=2)
    expected_draw = torch.rand(3)

    saved = trainer_state_to_resume(checkpoint_dir, VOCAB, "data/train")
    assert saved["tag"] == "step1"
    assert {key: saved[key] for key in ("step", *RUN_PLAN)} == {"step": 1, **RUN_PLAN}
    fresh, fresh_batches = trained_engine(seed=1), sampler()
    assert not same_weights(fresh, engine)
    resumed, generators = resume_checkpoint(
        fresh, checkpoint_dir, saved, fresh_batches, host_group(), universal=False
    )
    assert resumed == state
    assert same_weights(fresh, engine)
    assert fresh_batches.state_dict(consumed_in_pass=0)["consumed_micro_steps"] == 2
    restore_rng_state(generators)
    assert torch.equal(torch.rand(3), expected_draw)


def test_a_checkpoint_of_an_older_trainer_resumes_with_no_nonfinite_losses(one_rank, tmp_path):
    """Its client_state holds the vocabulary and no count."""
    checkpoint_dir = str(tmp_path / "checkpoints")
    engine, batches = trained_engine(seed=0), sampler()
    write_trainer_state(checkpoint_dir, "step1", {"step": 1, **RUN_PLAN})
    older = {"sampler": batches.state_dict(), "step": 1, "vocab": VOCAB}
    engine.save_checkpoint(checkpoint_dir, tag="step1", client_state=older)
    saved = trainer_state_to_resume(checkpoint_dir, VOCAB, "data/train")
    resumed, generators = resume_checkpoint(
        trained_engine(seed=1), checkpoint_dir, saved, sampler(), host_group(), universal=False
    )
    assert resumed == TrainState(1, batches.state_dict(), nonfinite_losses=0)
    assert generators is None  # none were saved


def test_a_checkpoint_of_another_plan_is_refused(one_rank, tmp_path):
    checkpoint_dir = str(tmp_path / "checkpoints")
    state = TrainState(1, sampler(seed=42).state_dict())
    save_checkpoint(trained_engine(seed=0), checkpoint_dir, state, RUN_PLAN, keep=2)
    saved = trainer_state_to_resume(checkpoint_dir, VOCAB, "data/train")
    with pytest.raises(CheckpointError, match="does not fit this train set: state has seed=42"):
        resume_checkpoint(
            trained_engine(seed=1),
            checkpoint_dir,
            saved,
            sampler(seed=43),
            host_group(),
            universal=False,
        )
    with pytest.raises(CheckpointError, match="another vocabulary than data/other's"):
        trainer_state_to_resume(checkpoint_dir, {**VOCAB, "b": 4}, "data/other")


def test_saving_keeps_the_last_checkpoints_with_their_universal_forms(one_rank, tmp_path):
    checkpoint_dir = tmp_path / "checkpoints"
    engine = trained_engine(seed=0)
    for step in (1, 2, 3):
        if step == 2:
            (checkpoint_dir / "step1_universal").mkdir()  # as an elastic resume leaves it
        save_checkpoint(engine, str(checkpoint_dir), TrainState(step, {}), RUN_PLAN, keep=2)
    kept = sorted(path.name for path in checkpoint_dir.iterdir() if path.is_dir())
    assert kept == ["step2", "step3"]
    assert (checkpoint_dir / "latest").read_text().strip() == "step3"


def test_pruning_counts_steps_not_directories(tmp_path):
    for name in ("step2", "step2_universal", "step10", "step9", "other"):
        (tmp_path / name).mkdir()
    prune_checkpoints(str(tmp_path), keep=2)
    assert sorted(os.listdir(tmp_path)) == ["other", "step10", "step9"]


def test_the_output_directory_is_checked_against_resuming(tmp_path: Path):
    check_output_dir(str(tmp_path), resuming=False)
    with pytest.raises(CheckpointError, match="no checkpoint to resume from"):
        check_output_dir(str(tmp_path), resuming=True)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step4")
    check_output_dir(str(tmp_path), resuming=True)
    with pytest.raises(CheckpointError, match="has checkpoints: pass --resume"):
        check_output_dir(str(tmp_path), resuming=False)
    # A checkpoint of a trainer that wrote no trainer_state.json.
    with pytest.raises(CheckpointError, match="older version of the trainer"):
        trainer_state_to_resume(str(tmp_path / "checkpoints"), VOCAB, "data/train")
