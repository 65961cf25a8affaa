"""Duration-bucketed micro-batch planning for distributed CTC training.

The sampler sees only a length index (audio samples per utterance), never audio. It
batches the way Lhotse's ``DynamicBucketingSampler`` and NeMo do, not by sorting with
added noise: utterances fall into duration bins (``train.duration_bins``: one per batch
size that fits the budget, split further where that cuts padding most); each epoch
shuffles every bin, cuts it into batches of its size, then deals the batches to
micro-steps. Every rank computes the same global plan from ``(seed, epoch, lengths,
config)`` and takes its own column, so no communication is needed. Planning is a few
numpy passes over flat arrays, with Python loops over bins but never over batches, so
millions of utterances plan in well under a second. A checkpoint resumes on another world
size, accumulation or budget by re-planning what its epoch had left (class docstring).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np

from train.duration_bins import DurationBins, duration_bins


def per_batch(
    ufunc: np.ufunc, values: np.ndarray, order: np.ndarray, bounds: np.ndarray
) -> np.ndarray:
    """``ufunc`` reduced over each batch ``values[order[bounds[i]:bounds[i + 1]]]``.

    One ``reduceat`` over the gathered values instead of a Python loop over batches; it is
    exact because no batch is empty (reduceat would return the element at an empty one).
    """
    return ufunc.reduceat(values[order], bounds[:-1])


class EpochPlan:
    """One epoch's global plan as flat arrays; rows and batches are cheap views.

    ``order`` is every utterance the plan packs (all of them, or what an elastic resume
    re-planned) in shuffled order, batch ``i`` is ``order[bounds[i]:bounds[i + 1]]``, and
    ``grid[step, rank]`` is the batch number that ``rank`` runs at micro-step ``step``.
    Batches left out of ``grid`` are the skipped remainder. Like a list of rows, indexing
    and iterating give one index array per rank.
    """

    def __init__(self, order: np.ndarray, bounds: np.ndarray, grid: np.ndarray) -> None:
        self.order = order
        self.bounds = bounds
        self.grid = grid

    def batch(self, number: int) -> np.ndarray:
        """Utterance indices of batch ``number`` (a view into ``order``)."""
        return self.order[self.bounds[number] : self.bounds[number + 1]]

    def __len__(self) -> int:
        """Micro-steps in the epoch."""
        return len(self.grid)

    def __getitem__(self, step: int) -> list[np.ndarray]:
        """Micro-step ``step``'s batches, one per rank."""
        return [self.batch(number) for number in self.grid[step]]

    def __iter__(self) -> Iterator[list[np.ndarray]]:
        """Rows in micro-step order."""
        return (self[step] for step in range(len(self)))

    def untrained(self, step: int) -> np.ndarray:
        """Utterances of every rank's batches from micro-step ``step`` on.

        What a run that consumed ``step`` micro-steps has left of the epoch: the skipped
        remainder is not in it. One pass over flat arrays, no loop over batches.
        """
        batch_of = np.repeat(np.arange(self.bounds.size - 1), np.diff(self.bounds))
        left = np.zeros(self.bounds.size - 1, dtype=bool)
        left[self.grid[step:].ravel()] = True
        return self.order[left[batch_of]]


# Bumped whenever the same (seed, epoch, lengths, config) plans other batches, so a checkpoint
# position is never applied to a plan it was not taken from. 2: fixed-size bins (duration_bins).
PLANNER_VERSION = 2

# Settings besides the seed and the lengths that shape an epoch's plan. A checkpoint taken
# under other values resumes by re-planning the rest of its epoch (elastic resume).
LAYOUT_KEYS = (
    "world_size",
    "gradient_accumulation_steps",
    "max_batch_seconds",
    "num_buckets",
    "max_batch_size",
)


class DurationBucketSampler:
    """Plans padded-seconds-bounded micro-batches, the same count on every rank.

    A micro-batch's padded audio, ``len(batch) * longest / sampling_rate``, stays within
    ``max_batch_seconds``; an utterance longer than that alone gets a micro-batch of its
    own (one warning with the count), so no utterance is ever dropped for its length.
    Batches hold utterances of one duration bin (``train.duration_bins``): the lengths
    sharing a batch size, split ``num_buckets - 1`` more times where that cuts padding
    most. More buckets pad less, but mix lengths less.

    World layout: consecutive micro-batches form *global micro-steps* of ``world_size``
    batches, one per rank, and ``gradient_accumulation_steps`` micro-steps form one
    optimizer step. The epoch keeps the largest whole number of optimizer steps; the
    fewer than ``world_size * gradient_accumulation_steps`` micro-batches left over are
    skipped this epoch. Which ones are skipped is random (the batch order is reshuffled
    every epoch), so no utterance is skipped systematically.

    Balance: the kept micro-batches are sorted by padded samples and cut into optimizer
    steps, and the steps are shuffled, so the ``world_size`` batches running at the same
    time cost about the same (each micro-step is a synchronisation point under ZeRO, and
    waits for its costliest batch). Which batches are kept and the order of the steps
    stay random; within a step, the dealing direction alternates between micro-steps so
    per-step totals per rank even out.

    Resuming: ``state_dict(consumed_in_pass)`` records the epoch and the absolute
    position in that epoch's plan. A DataLoader with workers prefetches, so the number
    of batches this sampler has yielded runs ahead of what the training loop consumed;
    the loop therefore passes the count it actually took from the current pass (its
    ``enumerate`` counter), and the sampler adds the position that pass started from.
    Without the argument the yielded count is used, exact only without prefetching.
    After ``load_state_dict`` the next pass starts at the saved position; any other pass
    starts at 0. ``set_epoch`` with the epoch already set keeps a pending resume.

    Elastic resume: a state written under another layout (``LAYOUT_KEYS``: world size,
    accumulation or batch budget; same seed and lengths) finishes its epoch rather than
    being refused. Every rank rebuilds the writer's plan, takes the utterances of the kept
    batches its first ``consumed_micro_steps`` micro-steps had not run, and packs and deals
    them afresh for this layout, seeded by ``(seed, epoch, generation)`` where generation
    counts the re-plans of the epoch; so ranks agree without talking. That re-plan *is*
    this sampler's plan of the epoch: ``plan_epoch``, ``len``, ``micro_step_totals`` and the
    position (starting at 0) all refer to it. Each kept utterance of the epoch thus trains
    exactly once, except the re-plan's own whole-step remainder: fewer than
    ``world_size * gradient_accumulation_steps`` new batches, which the uninterrupted run
    would have trained. The writer's skipped remainder stays skipped, so what is left
    depends only on the writer's plan and position. A re-planned epoch's state lists the
    earlier segments (layout and micro-steps consumed) under ``replanned_from``, so it
    resumes again: on its own layout exactly, on another by re-planning once more. The
    following epochs plan as usual.
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
        self.num_buckets = num_buckets
        self.seed = seed
        self.max_batch_size = max_batch_size
        # Integer budget: len * longest is an integer, so comparing it with the floor
        # is the same as comparing with max_batch_seconds * sampling_rate.
        self._budget = math.floor(max_batch_seconds * sampling_rate)
        if self._budget < 1:
            raise ValueError("max_batch_seconds is shorter than one sample")

        oversized = int(np.count_nonzero(self.lengths > self._budget))
        if oversized:
            warnings.warn(
                f"{oversized} utterances are longer than max_batch_seconds="
                f"{max_batch_seconds}; each gets a micro-batch of its own",
                stacklevel=2,
            )

        self._bins = duration_bins(self.lengths, self._budget, num_buckets, max_batch_size)

        self.epoch = 0
        self._start = 0  # where the next pass begins (non-zero only after a resume)
        self._pass_start = 0  # where the current or last pass began
        self._position = 0  # micro-steps of this epoch yielded so far
        self._cache: tuple[int, EpochPlan] | None = None
        # The epoch an elastic resume re-planned, and its earlier segments: each a layout
        # and the micro-steps consumed under it, oldest first.
        self._lineage: tuple[int, list[dict[str, Any]]] | None = None

    def _layout(self) -> dict[str, Any]:
        """This sampler's values of ``LAYOUT_KEYS``."""
        return {key: getattr(self, key) for key in LAYOUT_KEYS}

    def _pack(self, rng: np.random.Generator, bins: DurationBins) -> tuple[np.ndarray, np.ndarray]:
        """Shuffles each bin and cuts it into batches of its size; returns order and bounds.

        Batch ``i`` is ``order[bounds[i]:bounds[i + 1]]``. Cutting runs over the bins in
        ascending length order without restarting at bin boundaries: a bin's remainder,
        too few for a batch, is topped up from the next bin (slightly longer utterances)
        and takes that bin's batch size, which fits because sizes shrink as lengths grow.
        So the epoch holds one partial batch, not one per bin: tiny batches would leave
        ranks idle in their step. The loop is per bin, not per batch.
        """
        order = bins.order.copy()
        cuts = []
        begin = position = 0
        for stop, size in zip(bins.stops.tolist(), bins.batch_sizes.tolist(), strict=True):
            rng.shuffle(order[begin:stop])
            if stop - position >= size:
                cuts.append(np.arange(position, stop - size + 1, size))
                position = int(cuts[-1][-1]) + size
            begin = stop
        end = order.size
        return order, np.concatenate([*cuts, [position, end] if position < end else [end]])

    def plan_epoch(self, epoch: int) -> EpochPlan:
        """Returns the global plan: per micro-step, one index array per rank.

        For an epoch an elastic resume re-planned, the re-plan of what it had left.
        """
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        if self._lineage is not None and self._lineage[0] == epoch:
            plan = self._rebuild(epoch, self._lineage[1])
        else:
            plan = self._fresh_plan(epoch)
        self._cache = (epoch, plan)
        return plan

    def _fresh_plan(self, epoch: int) -> EpochPlan:
        """The epoch's plan over every utterance, as an uninterrupted run trains it."""
        return self._plan(np.random.default_rng([self.seed, epoch]), self._bins, replan=False)

    def _replan(self, utterances: np.ndarray, epoch: int, generation: int) -> EpochPlan:
        """Plans ``utterances`` alone, with the bins and dealing of a fresh plan."""
        inside = np.zeros(self.lengths.size, dtype=bool)
        inside[utterances] = True
        inside = inside[self._bins.order]
        bins = DurationBins(
            order=self._bins.order[inside],
            stops=np.cumsum(inside)[self._bins.stops - 1],
            batch_sizes=self._bins.batch_sizes,
        )
        # SeedSequence pads entropy with zeros, so generation >= 1 keeps this stream apart
        # from the epoch's own [seed, epoch].
        rng = np.random.default_rng([self.seed, epoch, generation])
        return self._plan(rng, bins, replan=True)

    def _sibling(self, segment: dict[str, Any]) -> DurationBucketSampler:
        """A sampler with ``segment``'s layout, to rebuild the plan it was trained on."""
        layout = {key: segment[key] for key in LAYOUT_KEYS}
        if layout == self._layout():
            return self
        with warnings.catch_warnings():
            # This sampler already warned about the oversized utterances it will train.
            warnings.simplefilter("ignore")
            return DurationBucketSampler(
                num_samples=self.lengths,
                sampling_rate=self.sampling_rate,
                seed=self.seed,
                **layout,
            )

    def _rebuild(self, epoch: int, lineage: list[dict[str, Any]]) -> EpochPlan:
        """Replays ``lineage``'s re-plans of ``epoch``; returns what is left, for this layout."""
        plan = self._sibling(lineage[0])._fresh_plan(epoch)
        # Segment k's leftovers are re-planned by the layout that trained next.
        planners = [*(self._sibling(segment) for segment in lineage[1:]), self]
        steps = zip(lineage, planners, strict=True)
        for generation, (segment, planner) in enumerate(steps, start=1):
            consumed = segment["consumed_micro_steps"]
            if not 0 <= consumed <= len(plan):
                raise ValueError(
                    f"the state consumed {consumed} micro-steps of epoch {epoch}, whose plan "
                    f"has {len(plan)}: it was written for other lengths"
                )
            plan = planner._replan(plan.untrained(consumed), epoch, generation)
        return plan

    def _plan(self, rng: np.random.Generator, bins: DurationBins, *, replan: bool) -> EpochPlan:
        """Packs ``bins`` and deals the batches to micro-steps of this layout.

        A re-plan may keep no step: its few batches are its skipped remainder.
        """
        order, bounds = self._pack(rng, bins)
        num_batches = bounds.size - 1
        step_size = self.world_size * self.gradient_accumulation_steps
        num_steps = num_batches // step_size
        if num_steps == 0 and not replan:
            raise ValueError(
                f"only {num_batches} micro-batches, fewer than world_size * "
                f"gradient_accumulation_steps = {step_size}; lower max_batch_seconds"
            )
        padded = per_batch(np.maximum, self.lengths, order, bounds) * np.diff(bounds)
        # Costs in 65535ths of the budget (oversized batches all at the top) make a 16-bit
        # key, which numpy's stable argsort sorts by radix, in linear time; being stable,
        # it orders ties the same on every rank.
        cost = (np.minimum(padded, self._budget) * 65535 // self._budget).astype(np.uint16)
        kept = rng.permutation(num_batches)[: num_steps * step_size]
        kept = kept[np.argsort(~cost[kept], kind="stable")]  # dearest first
        grid = kept.reshape(num_steps, self.gradient_accumulation_steps, self.world_size)
        grid = grid[rng.permutation(num_steps)]
        # Dealing every other micro-step in reverse pairs a rank's dearer batches with
        # cheaper ones, so the ranks' totals over an optimizer step even out.
        grid[:, 1::2, :] = grid[:, 1::2, ::-1]
        return EpochPlan(order, bounds, grid.reshape(-1, self.world_size))

    def micro_step_totals(self, values: np.ndarray, epoch: int) -> np.ndarray:
        """Per micro-step of ``epoch``, the sum of ``values[ids]`` over all ranks' batches.

        ``values`` holds one number per utterance (e.g. target lengths); the result has one
        entry per micro-step, in int64 or float64 so per-utterance types cannot overflow.
        """
        values = np.asarray(values)
        if values.shape != self.lengths.shape:
            raise ValueError(f"values has shape {values.shape}, lengths {self.lengths.shape}")
        values = values.astype(np.result_type(values, np.int64), copy=False)
        plan = self.plan_epoch(epoch)
        sums = per_batch(np.add, values, plan.order, plan.bounds)
        return sums[plan.grid].sum(axis=1)

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch to iterate; a new epoch starts at its first micro-step."""
        if epoch != self.epoch:
            self.epoch = epoch
            self._start = self._pass_start = self._position = 0

    def __len__(self) -> int:
        """Micro-batches per rank in the current epoch's plan (an elastic re-plan's too)."""
        return len(self.plan_epoch(self.epoch))

    def __iter__(self) -> Iterator[list[int]]:
        plan = self.plan_epoch(self.epoch)
        self._pass_start = self._position = self._start
        self._start = 0
        for step in range(self._pass_start, len(plan)):
            self._position = step + 1
            yield plan.batch(plan.grid[step, self.rank]).tolist()

    def state_dict(self, consumed_in_pass: int | None = None) -> dict[str, Any]:
        """Returns the resume state; see the class docstring for ``consumed_in_pass``."""
        yielded = self._position - self._pass_start
        if consumed_in_pass is None:
            consumed_in_pass = yielded
        if not 0 <= consumed_in_pass <= yielded:
            raise ValueError(f"consumed_in_pass={consumed_in_pass}, but {yielded} were yielded")
        lineage = self._lineage[1] if self._lineage and self._lineage[0] == self.epoch else []
        return {
            "planner": PLANNER_VERSION,
            "epoch": self.epoch,
            "consumed_micro_steps": self._pass_start + consumed_in_pass,
            "seed": self.seed,
            "num_utterances": self.lengths.size,
            **self._layout(),
            "replanned_from": [dict(segment) for segment in lineage],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores a state so the next pass continues with the next unconsumed batch.

        A state from another layout re-plans the rest of its epoch (class docstring).
        """
        if state.get("planner") != PLANNER_VERSION:
            raise ValueError(
                f"the checkpoint's batches were planned by sampler version "
                f"{state.get('planner', 1)}, this is version {PLANNER_VERSION}: its position "
                "would point into another plan; resume with the code that wrote it"
            )
        # Another seed or data set gives other batches, so the consumed ones are unknown.
        for key, value in (("seed", self.seed), ("num_utterances", self.lengths.size)):
            if state.get(key, value) != value:
                raise ValueError(f"state has {key}={state[key]}, sampler {value}")
        # States written before the budget was recorded were planned with this one.
        layout = {key: state.get(key, getattr(self, key)) for key in LAYOUT_KEYS}
        lineage = [dict(segment) for segment in state.get("replanned_from", [])]
        epoch = int(state["epoch"])
        consumed = int(state["consumed_micro_steps"])
        if layout != self._layout():
            lineage.append({**layout, "consumed_micro_steps": consumed})
            consumed = 0
        # Planned now, so a state that does not fit fails here and leaves self unchanged.
        plan = self._rebuild(epoch, lineage) if lineage else self._fresh_plan(epoch)
        if not 0 <= consumed <= len(plan):
            raise ValueError(f"state consumed {consumed} micro-steps of {len(plan)}")
        self._lineage = (epoch, lineage) if lineage else None
        self._cache = (epoch, plan)
        self.epoch = epoch
        self._start = self._pass_start = self._position = consumed

    def padding_fraction(self, epoch: int) -> float:
        """Fraction of padded samples that are padding, over all ranks' kept batches."""
        plan = self.plan_epoch(epoch)
        longest = per_batch(np.maximum, self.lengths, plan.order, plan.bounds)
        padded = int((longest * np.diff(plan.bounds))[plan.grid].sum())
        real = int(self.micro_step_totals(self.lengths, epoch).sum())
        # A re-plan may have no step left to run, hence nothing padded.
        return (padded - real) / padded if padded else 0.0
