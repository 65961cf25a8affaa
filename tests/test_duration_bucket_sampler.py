"""Tests for the duration-bucketed distributed micro-batch planner."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from torch.utils.data import DataLoader, Dataset

from train.duration_bucket_sampler import DurationBucketSampler

SAMPLING_RATE = 16_000
MAX_BATCH_SECONDS = 60.0


def lognormal_lengths(count: int, seed: int = 0) -> np.ndarray:
    """Clip lengths in samples, lognormal around 4.5 s like read-speech corpora."""
    seconds = np.random.default_rng(seed).lognormal(np.log(4.5), 0.5, count).clip(0.3, 25.0)
    return (seconds * SAMPLING_RATE).astype(np.int64)


LENGTHS = lognormal_lengths(3_000)


def make_sampler(lengths: np.ndarray = LENGTHS, **overrides) -> DurationBucketSampler:
    config = {
        "num_samples": lengths,
        "sampling_rate": SAMPLING_RATE,
        "max_batch_seconds": MAX_BATCH_SECONDS,
    }
    config.update(overrides)
    return DurationBucketSampler(**config)


def padded_samples(lengths: np.ndarray, batch: np.ndarray) -> int:
    return len(batch) * int(lengths[batch].max())


def test_budget_respected_and_oversized_utterances_kept_alone() -> None:
    lengths = LENGTHS.copy()
    oversized = np.array([5, 17, 400])
    lengths[oversized] = int(1.5 * MAX_BATCH_SECONDS * SAMPLING_RATE)
    with pytest.warns(UserWarning, match="3 utterances are longer"):
        sampler = make_sampler(lengths)
    for epoch in range(3):
        batches = [b for row in sampler.plan_epoch(epoch) for b in row]
        holding_oversized = [b for b in batches if np.isin(b, oversized).any()]
        # Each oversized utterance is kept, alone in its batch (unless in the remainder).
        assert all(len(b) == 1 for b in holding_oversized)
        assert len(holding_oversized) >= 1
        for batch in batches:
            if not np.isin(batch, oversized).any():
                assert padded_samples(lengths, batch) <= MAX_BATCH_SECONDS * SAMPLING_RATE


def test_max_batch_size_caps_batches() -> None:
    sampler = make_sampler(max_batch_size=4)
    assert max(len(b) for row in sampler.plan_epoch(0) for b in row) == 4


@pytest.mark.parametrize("world_size", [2, 3])
def test_each_utterance_at_most_once_and_only_remainder_missing(world_size: int) -> None:
    accumulation = 2
    sampler = make_sampler(world_size=world_size, gradient_accumulation_steps=accumulation)
    max_per_batch = int(MAX_BATCH_SECONDS * SAMPLING_RATE) // int(LENGTHS.min())
    seen_over_epochs: set[int] = set()
    for epoch in range(4):
        indices = np.concatenate([b for row in sampler.plan_epoch(epoch) for b in row])
        assert len(np.unique(indices)) == len(indices)
        # Fewer than world_size * accumulation whole batches are left over.
        missing = len(LENGTHS) - len(indices)
        assert 0 <= missing < world_size * accumulation * max_per_batch
        seen_over_epochs.update(indices.tolist())
    # The remainder is reshuffled each epoch, so no utterance is skipped every time.
    assert seen_over_epochs == set(range(len(LENGTHS)))


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_get_equal_batch_counts_and_similar_audio_per_step(world_size: int) -> None:
    accumulation = 2
    samplers = [
        make_sampler(world_size=world_size, rank=r, gradient_accumulation_steps=accumulation)
        for r in range(world_size)
    ]
    plan = samplers[0].plan_epoch(0)
    assert len(plan) % accumulation == 0
    assert all(len(row) == world_size and all(len(b) > 0 for b in row) for row in plan)
    per_rank = [list(s) for s in samplers]
    assert {len(batches) for batches in per_rank} == {len(plan)}
    assert all(len(s) == len(plan) for s in samplers)

    cost = np.array([[padded_samples(LENGTHS, b) for b in row] for row in plan], dtype=float)
    per_step = cost.reshape(-1, accumulation, world_size).sum(axis=1)
    spread = per_step.max(axis=1) / per_step.min(axis=1)
    assert np.median(spread) < 1.025
    # One step may hold the epoch's single partly filled batch (end of the longest bucket).
    assert np.sort(spread)[-2] < 1.3
    per_rank_total = cost.sum(axis=0)
    assert per_rank_total.max() / per_rank_total.min() < 1.035


@pytest.mark.parametrize("world_size", [2, 3])
def test_union_over_ranks_equals_global_plan(world_size: int) -> None:
    samplers = [
        make_sampler(world_size=world_size, rank=r, gradient_accumulation_steps=2, seed=7)
        for r in range(world_size)
    ]
    for sampler in samplers:
        sampler.set_epoch(3)
    plan = samplers[0].plan_epoch(3)
    yielded = [list(s) for s in samplers]
    for step, row in enumerate(plan):
        for rank, batch in enumerate(row):
            assert yielded[rank][step] == batch.tolist()


def test_plan_is_deterministic_and_changes_with_epoch_and_seed() -> None:
    first = make_sampler(world_size=2, gradient_accumulation_steps=2, seed=3)
    second = make_sampler(world_size=2, gradient_accumulation_steps=2, seed=3)

    def flat(sampler: DurationBucketSampler, epoch: int) -> list[list[int]]:
        return [b.tolist() for row in sampler.plan_epoch(epoch) for b in row]

    assert flat(first, 0) == flat(second, 0)
    assert flat(first, 1) == flat(second, 1)
    assert flat(first, 0) != flat(first, 1)
    assert flat(first, 0) != flat(make_sampler(world_size=2, gradient_accumulation_steps=2), 0)


def test_iteration_follows_set_epoch() -> None:
    sampler = make_sampler(world_size=2, rank=1)
    sampler.set_epoch(2)
    assert list(sampler) == [row[1].tolist() for row in sampler.plan_epoch(2)]
    # A second pass over the same epoch replays it from the start.
    assert list(sampler) == [row[1].tolist() for row in sampler.plan_epoch(2)]


def test_exact_resume_mid_epoch() -> None:
    config = {"world_size": 3, "rank": 2, "gradient_accumulation_steps": 2, "seed": 11}
    reference = make_sampler(**config)
    reference.set_epoch(1)
    expected = list(reference)

    sampler = make_sampler(**config)
    sampler.set_epoch(1)
    taken = list(itertools.islice(sampler, 7))
    state = sampler.state_dict()
    assert state["epoch"] == 1
    assert state["consumed_micro_steps"] == 7

    resumed = make_sampler(**config)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)  # the usual loop call must not discard the pending resume
    assert len(resumed) == len(expected)
    rest = list(itertools.islice(resumed, 5))
    assert taken + rest == expected[:12]

    # Saving again after a resume counts from the saved position, not from 0.
    again = make_sampler(**config)
    again.load_state_dict(resumed.state_dict())
    assert taken + rest + list(again) == expected

    # The next epoch starts from its first batch.
    again.set_epoch(2)
    reference.set_epoch(2)
    assert list(again) == list(reference)


def test_state_after_finished_epoch_resumes_to_nothing() -> None:
    sampler = make_sampler()
    list(sampler)
    resumed = make_sampler()
    resumed.load_state_dict(sampler.state_dict())
    assert list(resumed) == []


def test_state_dict_with_consumed_count_ignores_prefetched_batches() -> None:
    sampler = make_sampler(world_size=2, gradient_accumulation_steps=2)
    expected = [row[0].tolist() for row in sampler.plan_epoch(0)]
    list(itertools.islice(sampler, 9))  # 9 yielded, only 6 reached the training loop
    resumed = make_sampler(world_size=2, gradient_accumulation_steps=2)
    resumed.load_state_dict(sampler.state_dict(consumed_in_pass=6))
    assert list(resumed) == expected[6:]
    with pytest.raises(ValueError, match="yielded"):
        sampler.state_dict(consumed_in_pass=10)


def test_load_rejects_other_layout() -> None:
    state = make_sampler(world_size=2).state_dict()
    with pytest.raises(ValueError, match="world_size"):
        make_sampler(world_size=3).load_state_dict(state)


class _IndexDataset(Dataset):
    def __getitem__(self, index: int) -> int:
        return index

    def __len__(self) -> int:
        return len(LENGTHS)


def test_exact_resume_through_prefetching_dataloader() -> None:
    def loader(sampler: DurationBucketSampler) -> DataLoader:
        return DataLoader(_IndexDataset(), batch_sampler=sampler, num_workers=2, prefetch_factor=4)

    config = {"world_size": 2, "rank": 0, "gradient_accumulation_steps": 2}
    expected = [row[0].tolist() for row in make_sampler(**config).plan_epoch(0)]

    sampler = make_sampler(**config)
    consumed = []
    for count, batch in enumerate(loader(sampler), start=1):
        consumed.append(batch.tolist())
        if count == 5:
            state = sampler.state_dict(consumed_in_pass=count)
            break
    # Workers prefetched ahead, so the sampler's own count overshoots the loop's.
    assert sampler.state_dict()["consumed_micro_steps"] > 5

    resumed = make_sampler(**config)
    resumed.load_state_dict(state)
    rest = [batch.tolist() for batch in loader(resumed)]
    assert consumed + rest == expected


def test_bucketing_pads_far_less_than_random_batching() -> None:
    lengths = lognormal_lengths(20_000, seed=1)
    bucketed = make_sampler(lengths).padding_fraction(0)
    # A single bucket is a random shuffle packed under the same budget.
    random = make_sampler(lengths, num_buckets=1).padding_fraction(0)
    assert bucketed < 0.06
    assert random > 0.3
