"""Duration-bucketed micro-batch planning for distributed CTC training.

The sampler sees only a length index (audio samples per utterance), never audio. It
batches the way Lhotse's ``DynamicBucketingSampler`` and NeMo do, not by sorting with
added noise: utterances fall into buckets by duration quantile; each epoch shuffles
every bucket, packs it greedily under a padded-seconds budget, then shuffles all
micro-batches together. Every rank computes the same global plan from ``(seed, epoch,
lengths, config)`` and takes its own column, so no communication is needed.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np


class DurationBucketSampler:
    """Plans padded-seconds-bounded micro-batches, the same count on every rank.

    A micro-batch's padded audio, ``len(batch) * longest / sampling_rate``, stays within
    ``max_batch_seconds``; an utterance longer than that alone gets a micro-batch of its
    own (one warning with the count), so no utterance is ever dropped for its length.

    World layout: consecutive micro-batches form *global micro-steps* of ``world_size``
    batches, one per rank, and ``gradient_accumulation_steps`` micro-steps form one
    optimizer step. The epoch keeps the largest whole number of optimizer steps; the
    fewer than ``world_size * gradient_accumulation_steps`` micro-batches left over are
    skipped this epoch. Which ones are skipped is random (the batch order is reshuffled
    every epoch), so no utterance is skipped systematically.

    Balance: within one optimizer step the micro-batches are sorted by padded samples
    and dealt to ranks row by row, so the ``world_size`` batches running at the same
    time have similar cost (each micro-step is a synchronisation point under ZeRO);
    the dealing direction alternates between rows so per-step totals per rank even out.
    This only rearranges batches inside a step; it does not change which utterances
    share a step.

    Resuming: ``state_dict(consumed_in_pass)`` records the epoch and the absolute
    position in that epoch's plan. A DataLoader with workers prefetches, so the number
    of batches this sampler has yielded runs ahead of what the training loop consumed;
    the loop therefore passes the count it actually took from the current pass (its
    ``enumerate`` counter), and the sampler adds the position that pass started from.
    Without the argument the yielded count is used, exact only without prefetching.
    After ``load_state_dict`` the next pass starts at the saved position; any other pass
    starts at 0. ``set_epoch`` with the epoch already set keeps a pending resume.
    """

    def __init__(
        self,
        *,
        num_samples: np.ndarray,
        sampling_rate: int,
        max_batch_seconds: float,
        world_size: int = 1,
        rank: int = 0,
        gradient_accumulation_steps: int = 1,
        num_buckets: int = 30,
        seed: int = 0,
        max_batch_size: int | None = None,
    ) -> None:
        lengths = np.asarray(num_samples)
        if lengths.ndim != 1 or not np.issubdtype(lengths.dtype, np.integer):
            raise ValueError("num_samples must be a 1-D integer array")
        if lengths.size == 0 or lengths.min() <= 0:
            raise ValueError("num_samples must be non-empty and positive")
        if sampling_rate <= 0 or max_batch_seconds <= 0:
            raise ValueError("sampling_rate and max_batch_seconds must be positive")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if gradient_accumulation_steps < 1 or num_buckets < 1:
            raise ValueError("gradient_accumulation_steps and num_buckets must be >= 1")
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")

        self.lengths = lengths.astype(np.int64)
        self.sampling_rate = sampling_rate
        self.max_batch_seconds = max_batch_seconds
        self.world_size = world_size
        self.rank = rank
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.seed = seed
        self.max_batch_size = max_batch_size
        # Integer budget: len * longest is an integer, so comparing it with the floor
        # is the same as comparing with max_batch_seconds * sampling_rate.
        self._budget = math.floor(max_batch_seconds * sampling_rate)

        oversized = int(np.count_nonzero(self.lengths > self._budget))
        if oversized:
            warnings.warn(
                f"{oversized} utterances are longer than max_batch_seconds="
                f"{max_batch_seconds}; each gets a micro-batch of its own",
                stacklevel=2,
            )

        quantiles = np.linspace(0.0, 1.0, num_buckets + 1)[1:-1]
        edges = np.quantile(self.lengths, quantiles)
        bucket_of = np.searchsorted(edges, self.lengths, side="right")
        order = np.argsort(bucket_of, kind="stable")
        counts = np.bincount(bucket_of, minlength=num_buckets)
        # Repeated edges (many equal lengths) leave empty buckets; skip them.
        self._buckets = [b for b in np.split(order, np.cumsum(counts)[:-1]) if b.size]
        self._bucket_ends = np.cumsum([b.size for b in self._buckets]).tolist()
        # A batch starting in a bucket holds only utterances at least as long as that
        # bucket's shortest, so budget // shortest bounds the lengths scanned per batch.
        count_cap = max_batch_size or self.lengths.size
        self._windows = [
            max(1, min(count_cap, self._budget // int(self.lengths[b].min())))
            for b in self._buckets
        ]
        self._ramp = np.arange(1, max(self._windows) + 1, dtype=np.int64)

        self.epoch = 0
        self._start = 0  # where the next pass begins (non-zero only after a resume)
        self._pass_start = 0  # where the current or last pass began
        self._position = 0  # micro-steps of this epoch yielded so far
        self._cache: tuple[int, list[list[np.ndarray]]] | None = None

    def _pack(self, rng: np.random.Generator) -> tuple[list[np.ndarray], np.ndarray]:
        """Shuffles each bucket and packs greedily; returns batches and padded sizes.

        Packing runs over the buckets in ascending length order without restarting at
        bucket boundaries: a bucket's last, partly filled batch is topped up from the
        next bucket (slightly longer utterances), so the epoch holds one partial batch
        instead of one per bucket. Tiny batches would leave ranks idle in their step.
        """
        order = np.concatenate([rng.permutation(b) for b in self._buckets])
        lengths = self.lengths[order]
        starts = []
        pos = bucket = 0
        while pos < lengths.size:
            while self._bucket_ends[bucket] <= pos:
                bucket += 1
            span = lengths[pos : pos + self._windows[bucket]]
            padded = np.maximum.accumulate(span) * self._ramp[: span.size]
            # padded is non-decreasing, so the fitting prefix is a searchsorted.
            take = max(1, int(np.searchsorted(padded, self._budget, side="right")))
            starts.append(pos)
            pos += take
        padded = np.maximum.reduceat(lengths, starts) * np.diff(starts, append=lengths.size)
        return np.split(order, starts[1:]), padded

    def plan_epoch(self, epoch: int) -> list[list[np.ndarray]]:
        """Returns the global plan: per micro-step, one index array per rank."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        batches, padded = self._pack(rng)
        step_size = self.world_size * self.gradient_accumulation_steps
        num_steps = len(batches) // step_size
        if num_steps == 0:
            raise ValueError(
                f"only {len(batches)} micro-batches, fewer than world_size * "
                f"gradient_accumulation_steps = {step_size}; lower max_batch_seconds"
            )
        kept = rng.permutation(len(batches))[: num_steps * step_size]
        windows = kept.reshape(num_steps, step_size)
        by_cost = np.argsort(-padded[windows], axis=1, kind="stable")
        grid = np.take_along_axis(windows, by_cost, axis=1).reshape(
            num_steps, self.gradient_accumulation_steps, self.world_size
        )
        grid[:, 1::2, :] = grid[:, 1::2, ::-1]
        plan = [[batches[i] for i in row] for row in grid.reshape(-1, self.world_size)]
        self._cache = (epoch, plan)
        return plan

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch to iterate; a new epoch starts at its first micro-step."""
        if epoch != self.epoch:
            self.epoch = epoch
            self._start = self._pass_start = self._position = 0

    def __len__(self) -> int:
        """Micro-batches per rank in the whole current epoch, resumed or not."""
        return len(self.plan_epoch(self.epoch))

    def __iter__(self) -> Iterator[list[int]]:
        plan = self.plan_epoch(self.epoch)
        self._pass_start = self._position = self._start
        self._start = 0
        for step in range(self._pass_start, len(plan)):
            self._position = step + 1
            yield plan[step][self.rank].tolist()

    def state_dict(self, consumed_in_pass: int | None = None) -> dict[str, Any]:
        """Returns the resume state; see the class docstring for ``consumed_in_pass``."""
        yielded = self._position - self._pass_start
        if consumed_in_pass is None:
            consumed_in_pass = yielded
        if not 0 <= consumed_in_pass <= yielded:
            raise ValueError(f"consumed_in_pass={consumed_in_pass}, but {yielded} were yielded")
        return {
            "epoch": self.epoch,
            "consumed_micro_steps": self._pass_start + consumed_in_pass,
            "seed": self.seed,
            "world_size": self.world_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores a state so the next pass continues with the next unconsumed batch."""
        # Another seed or layout gives another plan, where the position means nothing.
        for key in ("seed", "world_size", "gradient_accumulation_steps"):
            if state[key] != getattr(self, key):
                raise ValueError(f"state has {key}={state[key]}, sampler {getattr(self, key)}")
        self.epoch = int(state["epoch"])
        self._start = self._pass_start = self._position = int(state["consumed_micro_steps"])

    def padding_fraction(self, epoch: int) -> float:
        """Fraction of padded samples that are padding, over all ranks' kept batches."""
        padded = real = 0
        for row in self.plan_epoch(epoch):
            for batch in row:
                lengths = self.lengths[batch]
                padded += batch.size * int(lengths.max())
                real += int(lengths.sum())
        return (padded - real) / padded
