"""Duration bins for padded-budget batching: split by batch size, then to cut padding.

The sampler batches utterances of one bin together, a fixed number per batch, so two
things about a bin matter. Its batch size must fit its longest utterance within the
budget, and a bin mixing lengths that would allow different sizes wastes budget; so the
bins start as the batch-size classes, runs of lengths sharing ``budget // length``
(capped at ``max_batch_size``). And a batch pads every utterance to its longest, so a
wide bin pads a lot: ``num_bins - 1`` times, the bin whose split lowers the padding bound
(each utterance padded to the top of its bin) the most is split where it lowers it most.
Lhotse's ``estimate_duration_buckets`` fits bins to the length distribution by giving
each the same total duration; greedy splitting minimises the padding itself instead, so
it spends the splits where utterances are many and bins wide, and counts the class edges
it gets for free. Each bin then batches at a fixed size, as Lhotse's
``FixedBucketBatchSizeConstraint`` and NeMo's bucket batch sizes do.

Lengths are counted in cells 1/1024 octave wide (under 0.1 %), indexed exactly from each
length's float64 bit pattern, so planning costs a few passes over the lengths and every
rank computes the same bins.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

# A positive float64 read as an int64 is its exponent followed by its mantissa, a
# piecewise-linear log2; dropping the low 42 of the 52 mantissa bits leaves 10, so
# consecutive values index cells 1/1024 octave wide. Unlike np.log, this is exact on any
# CPU, so no rank can put an utterance in another cell than the others.
CELL_SHIFT = 42


@dataclass(frozen=True)
class DurationBins:
    """Utterances grouped by bin, bins in ascending length order."""

    order: np.ndarray  # utterance indices, bin by bin
    stops: np.ndarray  # end of each bin in ``order``
    batch_sizes: np.ndarray  # utterances per batch in each bin, non-increasing


class PaddingBound:
    """Padding bound of cell ranges: each utterance padded to its range's top cell edge.

    An utterance counts as its cell's centre. Prefix sums make the bound of any range, and
    of every way to split it in two, a few vector operations.
    """

    def __init__(self, counts: np.ndarray, edges: np.ndarray) -> None:
        self.tops = edges[1:]
        self.count_sums = np.concatenate([[0.0], np.cumsum(counts)])
        self.length_sums = np.concatenate([[0.0], np.cumsum(counts * (edges[:-1] + edges[1:]) / 2)])
        # The last non-empty cell at or before each cell, -1 before the first.
        self.last_filled = np.maximum.accumulate(np.where(counts > 0, np.arange(counts.size), -1))

    def of(self, start: np.ndarray | int, stop: int) -> np.ndarray:
        """Bound of cells ``start`` to ``stop`` (exclusive), for one or many starts."""
        top = self.tops[self.last_filled[stop - 1]]
        count = self.count_sums[stop] - self.count_sums[start]
        return count * top - (self.length_sums[stop] - self.length_sums[start])

    def best_split(self, start: int, stop: int) -> tuple[float, int]:
        """Largest drop in the bound from cutting cells ``start:stop`` in two, and where.

        Only cuts leaving utterances on both sides count; (0, stop) when there is none.
        """
        cuts = np.arange(start + 1, self.last_filled[stop - 1] + 1)
        cuts = cuts[self.last_filled[cuts - 1] >= start]
        if cuts.size == 0:
            return 0.0, stop
        left = self.count_sums[cuts] - self.count_sums[start]
        left = left * self.tops[self.last_filled[cuts - 1]]
        left -= self.length_sums[cuts] - self.length_sums[start]
        drops = self.of(start, stop) - left - self.of(cuts, stop)
        best = int(np.argmax(drops))
        return float(drops[best]), int(cuts[best])


def split_greedily(bound: PaddingBound, starts: list[int], stop: int, splits: int) -> list[int]:
    """Adds up to ``splits`` cuts to the ranges starting at ``starts``; returns all starts.

    Each cut goes where it lowers the bound most; ties go to the lowest cell, so every
    rank cuts the same.
    """
    # A min-heap of (-drop, start, end, cut): the range whose best cut drops most first.
    heap = []
    for start, end in zip(starts, [*starts[1:], stop], strict=True):
        drop, cut = bound.best_split(start, end)
        heap.append((-drop, start, end, cut))
    heapq.heapify(heap)
    starts = list(starts)
    for _ in range(splits):
        negative_drop, start, end, cut = heapq.heappop(heap)
        if negative_drop >= 0:
            break  # no cut lowers the bound any more
        starts.append(cut)
        for low, high in ((start, cut), (cut, end)):
            drop, best = bound.best_split(low, high)
            heapq.heappush(heap, (-drop, low, high, best))
    return sorted(starts)


def duration_bins(
    lengths: np.ndarray, budget: int, num_bins: int, max_batch_size: int | None = None
) -> DurationBins:
    """Groups ``lengths`` (positive int64) into batch-size classes split ``num_bins - 1`` times.

    An utterance longer than ``budget`` gets batch size 1: it is batched alone.
    """
    cell = lengths.astype(np.float64).view(np.int64) >> CELL_SHIFT
    first = int(cell.min())
    cell -= first
    counts = np.bincount(cell)
    edges = (np.arange(first, first + counts.size + 1, dtype=np.int64) << CELL_SHIFT).view(
        np.float64
    )
    # A cell takes the batch size of the longest length it can hold, so it never lowers
    # the size of the bin it joins.
    longest = np.maximum(np.ceil(edges[1:]).astype(np.int64) - 1, 1)
    cell_sizes = np.clip(budget // longest, 1, max_batch_size)
    classes = [0, *(np.flatnonzero(np.diff(cell_sizes)) + 1).tolist()]
    starts = split_greedily(PaddingBound(counts, edges), classes, counts.size, num_bins - 1)
    bin_counts = np.add.reduceat(counts, starts)
    nonempty = bin_counts > 0  # a class that no length falls in is an empty bin
    # Numbering the non-empty bins 0, 1, ... in the smallest integer type lets numpy's
    # stable argsort sort by radix, in linear time.
    number = np.cumsum(nonempty) - 1
    bin_of_cell = np.repeat(number, np.diff([*starts, counts.size]))
    table = bin_of_cell.astype(np.min_scalar_type(int(number[-1])))
    order = np.argsort(table[cell], kind="stable")
    return DurationBins(
        order=order,
        stops=np.cumsum(bin_counts[nonempty]),
        batch_sizes=cell_sizes[np.array(starts)[nonempty]],
    )
