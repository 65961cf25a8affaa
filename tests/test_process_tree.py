"""Which of several benchmark runs counts: fastest_calm and least_disturbed on scripted runs."""

from __future__ import annotations

from typing import Any

from benchmarks.process_tree import fastest_calm, least_disturbed, machine_cores


def scripted(runs: list[tuple[float, float]]) -> Any:
    """A measure whose n-th call took runs[n][0] s while other work used runs[n][1] of the CPU
    (as the tree sampler reports it)."""
    calls = iter(runs)

    def measure() -> dict[str, Any]:
        seconds, disturbance = next(calls)
        other = disturbance * 10.0 * machine_cores()
        memory = {"cpu_seconds_outside_tree": other, "process_wall_seconds": 10.0}
        return {"seconds": seconds, "memory": memory}

    return measure


def test_fastest_calm_keeps_the_fastest_undisturbed_run():
    # The fastest run (1 s) was disturbed: the next fastest calm one counts, all three ran.
    result = fastest_calm(scripted([(3.0, 0.01), (1.0, 0.5), (2.0, 0.02)]), 3, 0.0)
    assert result["seconds"] == 2.0 and result["disturbance"] == 0.02
    assert result["attempt_seconds"] == [3.0, 1.0, 2.0]
    assert result["attempt_disturbances"] == [0.01, 0.5, 0.02]
    # Every run disturbed: the least disturbed one, however slow.
    result = fastest_calm(scripted([(1.0, 0.4), (5.0, 0.2)]), 2, 0.0)
    assert result["seconds"] == 5.0 and result["disturbance"] == 0.2


def test_least_disturbed_stops_at_the_first_calm_run():
    result = least_disturbed(scripted([(3.0, 0.3), (4.0, 0.01), (1.0, 0.0)]), 3, 0.0)
    assert result["seconds"] == 4.0 and result["attempt_disturbances"] == [0.3, 0.01]
