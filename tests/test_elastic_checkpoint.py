"""The global batch a resumed run keeps when its number of ranks changes."""

from __future__ import annotations

import pytest

from train.elastic_checkpoint import BatchLayout


@pytest.mark.parametrize(
    ("planned", "world_size", "budget", "expected"),
    [
        # Same ranks, same budget: unchanged.
        (BatchLayout(2, 1, 20.0), 2, 20.0, BatchLayout(2, 1, 20.0)),
        # Half the ranks: twice the accumulation (the 2 -> 1).
        (BatchLayout(2, 1, 20.0), 1, 20.0, BatchLayout(1, 2, 20.0)),
        # Twice the ranks: half the accumulation where there is some ...
        (BatchLayout(1, 2, 20.0), 2, 20.0, BatchLayout(2, 1, 20.0)),
        # ... else half the budget per rank.
        (BatchLayout(1, 1, 20.0), 2, 20.0, BatchLayout(2, 1, 10.0)),
        # 8 -> 3: not whole; three micro-batches each of 8/9 of the budget.
        (BatchLayout(8, 1, 18.0), 3, 18.0, BatchLayout(3, 3, 16.0)),
        # A smaller budget asked on resume (a smaller GPU): more accumulation instead.
        (BatchLayout(2, 1, 20.0), 2, 10.0, BatchLayout(2, 2, 10.0)),
        # A larger budget asked on resume does not grow the global batch.
        (BatchLayout(2, 1, 20.0), 2, 40.0, BatchLayout(2, 1, 20.0)),
    ],
)
def test_the_global_batch_is_kept_on_any_number_of_ranks(planned, world_size, budget, expected):
    layout = planned.for_world_size(world_size, budget)
    assert layout.world_size == expected.world_size
    assert layout.gradient_accumulation_steps == expected.gradient_accumulation_steps
    assert layout.max_batch_seconds == pytest.approx(expected.max_batch_seconds, rel=1e-12)
    assert layout.max_batch_seconds <= budget
    assert layout.global_batch_seconds == pytest.approx(planned.global_batch_seconds, rel=1e-12)


def test_many_world_sizes_keep_the_global_batch_within_the_budget():
    planned = BatchLayout(8, 2, 25.0)
    for world_size in range(1, 33):
        layout = planned.for_world_size(world_size, 25.0)
        assert layout.max_batch_seconds <= 25.0 + 1e-9
        assert layout.global_batch_seconds == pytest.approx(400.0, rel=1e-12)
        # The fewest micro-batches that fit: one fewer would exceed the budget.
        fewer = layout.gradient_accumulation_steps - 1
        assert fewer == 0 or 400.0 / (world_size * fewer) > 25.0
