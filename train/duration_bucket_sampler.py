"""Duration-bucketed micro-batch planning for distributed CTC training.

Every rank plans the same epoch from the length index alone and takes its own column, with no
communication. How batches are planned, balanced and re-planned on resume with another world
size: docs/batch_planning.md.
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
    """``ufunc`` reduced over each batch ``values[order[bounds[i]:bounds[i + 1]]]``, one result
    per batch, in one vectorized ``reduceat`` instead of a Python loop over batches.

    >>> plan = sampler.plan_epoch(epoch)
    >>> longest = per_batch(np.maximum, sampler.lengths, plan.order, plan.bounds)

    Args:
        ufunc: A binary numpy ufunc, such as ``np.add`` or ``np.maximum``.
        values: One value per utterance.
        order: Utterance indices, batch by batch (``EpochPlan.order``).
        bounds: Batch ``i`` is ``order[bounds[i]:bounds[i + 1]]``; no batch may be empty,
            where ``reduceat`` would return a single element instead.
    """
    return ufunc.reduceat(values[order], bounds[:-1])


class EpochPlan:
    """One epoch's global plan, every rank's batches, as three flat arrays, so that planning
    millions of utterances needs no Python object per batch; rows and batches are views.

    Like a list of micro-steps, indexing and iterating give one index array per rank.

    >>> plan = sampler.plan_epoch(epoch)
    >>> len(plan)                          # micro-steps
    >>> ids = plan[step][rank]             # the same as plan.batch(plan.grid[step, rank])

    Args:
        order: Every utterance the plan packs (all of them, or what an elastic resume
            re-planned), in shuffled order.
        bounds: Batch ``i`` is ``order[bounds[i]:bounds[i + 1]]``.
        grid: ``grid[step, rank]`` is the batch ``rank`` runs at micro-step ``step``; batches
            not in ``grid`` are the epoch's skipped remainder.
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
    """Plans micro-batches of similar-length utterances within ``max_batch_seconds`` of padded
    audio, the same count on every rank: bounded memory, little padding, no rank left waiting.

    A ``batch_sampler`` for ``torch.utils.data.DataLoader``; it yields lists of utterance
    indices. Each epoch's plan is a pure function of ``seed``, the epoch, the lengths and the
    layout (``LAYOUT_KEYS``), and its position can be checkpointed and resumed, on the same
    layout exactly, on another by re-planning the rest of the epoch (docs/batch_planning.md).

    >>> sampler = DurationBucketSampler(
    ...     audio_lengths=train_set.audio_lengths,  # a ShardDataset's length index
    ...     sampling_rate=train_set.sampling_rate,
    ...     max_batch_seconds=200.0,
    ...     world_size=dist.get_world_size(),
    ...     rank=dist.get_rank(),
    ... )
    >>> loader = DataLoader(train_set, batch_sampler=sampler, collate_fn=collator, num_workers=2)
    >>> sampler.set_epoch(epoch)
    >>> for consumed, batch in enumerate(loader, start=1):
    ...     ...  # train; at a checkpoint:
    ...     client_state = {"sampler": sampler.state_dict(consumed_in_pass=consumed)}

    Args:
        audio_lengths: Audio samples per utterance, a 1-D integer array (the length index).
        sampling_rate: Samples per second of ``audio_lengths``.
        max_batch_seconds: Budget of one micro-batch, ``len(batch) * longest`` in seconds.
            An utterance longer than that gets a micro-batch of its own (one warning).
        world_size: Ranks; each optimizer step runs ``world_size`` batches per micro-step.
        rank: This rank, in ``[0, world_size)``: it iterates its own column of the plan.
        gradient_accumulation_steps: Micro-steps per optimizer step. An epoch keeps whole
            optimizer steps only; the few batches left over are skipped, different ones each
            epoch.
        num_buckets: Duration bins: the batch-size classes split ``num_buckets - 1`` more times
            where that cuts padding most. More pad less but mix lengths less.
        seed: Seed of every epoch's shuffle; all ranks must pass the same.
        max_batch_size: At most this many utterances per micro-batch (default: no cap).

    Raises:
        ValueError: ``audio_lengths`` is not a non-empty 1-D array of positive integers; a
            setting is out of range (``rank`` outside ``[0, world_size)``, a budget shorter
            than one sample, a count below 1).
    """

    def __init__(
        self,
        *,
        audio_lengths: np.ndarray,
        sampling_rate: int,
        max_batch_seconds: float,
        world_size: int = 1,
        rank: int = 0,
        gradient_accumulation_steps: int = 1,
        num_buckets: int = 30,
        seed: int = 0,
        max_batch_size: int | None = None,
    ) -> None:
        lengths = np.asarray(audio_lengths)
        if lengths.ndim != 1 or not np.issubdtype(lengths.dtype, np.integer):
            raise ValueError("audio_lengths must be a 1-D integer array")
        if lengths.size == 0 or lengths.min() <= 0:
            raise ValueError("audio_lengths must be non-empty and positive")
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
        """The global plan of ``epoch``: per micro-step, one index array per rank.

        For the epoch an elastic resume re-planned, the re-plan of what it had left. Cached,
        so calling it again for the same epoch is free.

        Raises:
            ValueError: The epoch has fewer micro-batches than one optimizer step,
                ``world_size * gradient_accumulation_steps``: lower ``max_batch_seconds``.
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
                audio_lengths=self.lengths,
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
        """Per micro-step of ``epoch``, the sum of ``values`` over all ranks' batches: what an
        all-reduce would give, known from the plan without communication.

        >>> plan_targets = sampler.micro_step_totals(train_set.text_lengths, epoch)

        Args:
            values: One number per utterance (e.g. target lengths). The result has one entry
                per micro-step, in int64 or float64, so small per-utterance types cannot
                overflow.
            epoch: The epoch whose plan to sum over.

        Raises:
            ValueError: ``values`` is not shaped like ``audio_lengths``.
        """
        values = np.asarray(values)
        if values.shape != self.lengths.shape:
            raise ValueError(f"values has shape {values.shape}, lengths {self.lengths.shape}")
        values = values.astype(np.result_type(values, np.int64), copy=False)
        plan = self.plan_epoch(epoch)
        sums = per_batch(np.add, values, plan.order, plan.bounds)
        return sums[plan.grid].sum(axis=1)

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch to iterate; a new epoch starts at its first micro-step.

        Setting the epoch already set keeps the position a ``load_state_dict`` restored.
        """
        if epoch != self.epoch:
            self.epoch = epoch
            self._start = self._pass_start = self._position = 0

    def __len__(self) -> int:
        """Micro-batches per rank in the current epoch's plan (an elastic re-plan's too)."""
        return len(self.plan_epoch(self.epoch))

    def __iter__(self) -> Iterator[list[int]]:
        """This rank's batches of the current epoch, as lists of utterance indices.

        The first pass after ``load_state_dict`` starts at the restored position; any other
        pass starts at the epoch's first micro-step.
        """
        plan = self.plan_epoch(self.epoch)
        self._pass_start = self._position = self._start
        self._start = 0
        for step in range(self._pass_start, len(plan)):
            self._position = step + 1
            yield plan.batch(plan.grid[step, self.rank]).tolist()

    def state_dict(self, consumed_in_pass: int | None = None) -> dict[str, Any]:
        """The resume state, a dict of plain values for a checkpoint: the epoch, how many of its
        micro-steps were consumed, and the seed, data size and layout they were planned with.

        >>> client_state = {"sampler": sampler.state_dict(consumed_in_pass=consumed)}

        Args:
            consumed_in_pass: Batches the training loop took from the current pass (its
                ``enumerate`` count). A DataLoader with workers prefetches, so the sampler has
                yielded more than the loop consumed; the sampler adds the position the pass
                started from. None: the count yielded, exact only without prefetching.

        Raises:
            ValueError: ``consumed_in_pass`` is more than this pass yielded, or negative.
        """
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
        """Restores a ``state_dict`` so that the next pass continues with the next unconsumed
        batch; a state from another layout re-plans the rest of its epoch instead of failing.

        >>> sampler.load_state_dict(client_state["sampler"])

        Args:
            state: What ``state_dict`` returned, possibly on another world size, accumulation
                or budget (``LAYOUT_KEYS``); see docs/batch_planning.md for the re-plan.

        Raises:
            ValueError: The state was written by another planner version, for another seed or
                number of utterances, or its position does not fit the plan. The sampler is
                left unchanged.
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
