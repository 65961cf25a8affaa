"""Tests for the duration bins the batch planner draws batches from."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from train.duration_bins import PaddingBound, duration_bins

SAMPLING_RATE = 16_000
# The bins' edges snap to cells 1/1024 octave wide.
CELL_RATIO = 1 + 2**-10


def lognormal_lengths(count: int, seed: int = 0) -> np.ndarray:
    seconds = np.random.default_rng(seed).lognormal(np.log(4.5), 0.5, count).clip(0.3, 25.0)
    return (seconds * SAMPLING_RATE).astype(np.int64)


def bins_of(lengths: np.ndarray, bins) -> list[np.ndarray]:
    """Each bin's lengths."""
    return np.split(lengths[bins.order], bins.stops[:-1])


@pytest.mark.parametrize("seconds", [7.3, 30.0, 200.0])
@pytest.mark.parametrize("max_batch_size", [None, 8])
def test_bins_partition_lengths_in_ascending_order_with_fitting_batch_sizes(
    seconds: float, max_batch_size: int | None
) -> None:
    lengths = lognormal_lengths(20_000)
    budget = int(seconds * SAMPLING_RATE)
    bins = duration_bins(lengths, budget, 30, max_batch_size)
    assert np.array_equal(np.sort(bins.order), np.arange(lengths.size))
    assert bins.stops[-1] == lengths.size and (np.diff(bins.stops) > 0).all()
    assert (np.diff(bins.batch_sizes) <= 0).all()
    groups = bins_of(lengths, bins)
    for lower, upper in itertools.pairwise(groups):
        assert lower.max() < upper.min()
    cap = max_batch_size or lengths.size
    for group, size in zip(groups, bins.batch_sizes.tolist(), strict=True):
        assert 1 <= size <= cap
        # The size fits the bin's longest utterance, unless that is longer than the budget.
        assert size * group.max() <= budget or (size == 1 and group.max() > budget)
        # No utterance could have taken a batch one larger (up to the cells' resolution).
        if size < cap:
            assert ((size + 1) * group * CELL_RATIO > budget).all()


def test_one_bin_per_batch_size_without_splits() -> None:
    lengths = lognormal_lengths(20_000, seed=1)
    bins = duration_bins(lengths, 60 * SAMPLING_RATE, 1)
    assert len(np.unique(bins.batch_sizes)) == len(bins.batch_sizes)


def test_more_splits_never_pad_more() -> None:
    lengths = lognormal_lengths(20_000, seed=2)

    def padding_bound(num_bins: int) -> int:
        """Samples of padding if every utterance were padded to its bin's longest."""
        groups = bins_of(lengths, duration_bins(lengths, 30 * SAMPLING_RATE, num_bins))
        return sum(int(g.max()) * g.size - int(g.sum()) for g in groups)

    bounds = [padding_bound(num_bins) for num_bins in (1, 2, 5, 30, 100)]
    assert all(later <= earlier for earlier, later in itertools.pairwise(bounds))
    assert bounds[3] < 0.5 * bounds[0]


def test_splits_go_where_utterances_are_many() -> None:
    # Four times the utterances in the short half: the greedy splits should favour it.
    rng = np.random.default_rng(3)
    lengths = np.concatenate(
        [rng.integers(32_000, 64_000, 40_000), rng.integers(64_000, 128_000, 10_000)]
    )
    bins = duration_bins(lengths, 10**9, 20, max_batch_size=1)
    tops = np.array([g.max() for g in bins_of(lengths, bins)])
    assert (tops < 64_000).sum() > (tops >= 64_000).sum()


def test_equal_and_oversized_lengths() -> None:
    lengths = np.full(100, 48_000)
    bins = duration_bins(lengths, 160_000, 30)
    assert bins.stops.tolist() == [100] and bins.batch_sizes.tolist() == [3]
    lengths[:5] = 200_000
    bins = duration_bins(lengths, 160_000, 30)
    assert bins.stops.tolist() == [95, 100] and bins.batch_sizes.tolist() == [3, 1]


def test_best_split_matches_brute_force() -> None:
    rng = np.random.default_rng(4)
    counts = rng.integers(0, 5, 40) * (rng.random(40) < 0.6)
    edges = np.cumsum(rng.uniform(1.0, 3.0, 41))
    bound = PaddingBound(counts, edges)
    centres = (edges[:-1] + edges[1:]) / 2

    def brute(start: int, stop: int) -> float:
        filled = np.flatnonzero(counts[start:stop])
        if filled.size == 0:
            return 0.0
        top = edges[start + filled[-1] + 1]
        return float((counts[start:stop] * (top - centres[start:stop])).sum())

    for start, stop in [(0, 40), (3, 17), (10, 11), (20, 40)]:
        drops = {
            cut: brute(start, stop) - brute(start, cut) - brute(cut, stop)
            for cut in range(start + 1, stop)
            if counts[start:cut].any() and counts[cut:stop].any()
        }
        drop, cut = bound.best_split(start, stop)
        assert bound.of(start, stop) == pytest.approx(brute(start, stop))
        if drops:
            assert drop == pytest.approx(max(drops.values()))
            assert drops[cut] == pytest.approx(drop)
        else:
            assert (drop, cut) == (0.0, stop)
