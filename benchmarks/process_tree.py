"""Peak memory and CPU time of a process together with all of its descendants.

Ray's daemons and workers, or datasets' forked `map` workers, only mean something summed at one
instant, so a background thread samples the whole tree. PSS, which charges a shared page 1/n to
each of its n users, is the tree's real footprint (RSS counts it n times). Reading it walks
every page table (~1.5 ms per Ray process), so RSS (~15 µs) is read every interval and PSS
only after the RSS sum grew 5 %, or every 2 s: the PSS peak within 5 % at a fraction of the cost.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil

# PSS is read again once the RSS sum has grown this much since the last PSS reading.
PSS_RESAMPLE_GROWTH = 1.05
PSS_INTERVAL_SECONDS = 2.0
# A measurement where other work took more of the machine's CPU capacity than this is rerun.
TOLERATED_DISTURBANCE = 0.08
FORKS = "forks of the driver"
RAY_WORKERS = "ray workers"
# The two actors Ray Data starts for every execution on a fresh cluster: a fixed cost of ours.
RAY_DATA_ACTORS = ("ray::_StatsActor", "ray::_AutoscalingCoordinatorActor")
EXITED = "exited before it was named"


def machine_cores() -> int:
    """Cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def process_group(process: psutil.Process, root_pid: int, root_cmdline: list[str]) -> str:
    """The group a process's CPU time and memory are reported under: Ray's driver, ray workers,
    Ray Data's actors, raylet, GCS, dashboard (with its agent), other Ray daemons; forks of the
    driver (datasets' map workers, DataLoader workers); anything else by script."""
    if process.pid == root_pid:
        return "driver"
    name, cmdline = process.name(), process.cmdline()
    if not cmdline:  # first seen while exiting: the command line is gone, only a name is left
        return EXITED
    command = " ".join(cmdline)
    if name in ("raylet", "gcs_server"):  # their command lines name the worker script too
        return "raylet" if name == "raylet" else "GCS"
    if command.startswith(RAY_DATA_ACTORS):
        return "Ray Data actors"
    # Ray renames its workers "ray::IDLE" etc. only after they have started.
    if "default_worker.py" in command or (command.startswith("ray::") and "Agent" not in command):
        return RAY_WORKERS
    if "dashboard" in command.lower():
        return "dashboard"
    if cmdline == root_cmdline:
        return FORKS
    if "/ray/" in command or command.startswith("ray::"):
        return "other Ray daemons"
    scripts = [os.path.basename(part) for part in cmdline if part.endswith(".py")]
    return scripts[0] if scripts else name


class _TreeSampler(threading.Thread):
    """Samples `root_pid` and its descendants every `interval_seconds` until `stop` is set.
    CPU time per process is the last value seen: one that exits loses at most an interval."""

    def __init__(self, root_pid: int, interval_seconds: float) -> None:
        super().__init__(name="process-tree-sampler", daemon=True)
        self.root_pid, self.interval_seconds = root_pid, interval_seconds
        self.stop = threading.Event()
        self.peak = {"rss": 0, "pss": 0, "processes": 0, "samples": 0, "pss_samples": 0}
        self.peak_pss_by_kind: dict[str, int] = {}
        self.cpu_seconds: dict[int, tuple[str, float]] = {}  # pid: (group, CPU seconds)
        self.last_pss = (float("-inf"), 0)  # when PSS was last read, and the RSS sum then
        self.own_cpu_seconds = 0.0

    def run(self) -> None:
        started = time.thread_time()
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(self.interval_seconds)
        self.sample()
        self.own_cpu_seconds = time.thread_time() - started

    def sample(self) -> None:
        try:
            root = psutil.Process(self.root_pid)
            processes, root_cmdline = [root, *root.children(recursive=True)], root.cmdline()
        except psutil.Error:
            return
        rss, alive = 0, []
        for process in processes:
            try:
                rss += process.memory_info().rss
                cpu = process.cpu_times()
                kind = self.cpu_seconds.get(process.pid, ("", 0.0))[0]
                # A child seen between its fork and exec looks like a fork until it has exec'd,
                # and a worker like any other until it is renamed for an actor; one exiting has
                # no command line left to tell.
                if not kind or (kind in (FORKS, RAY_WORKERS) and process.cmdline()):
                    kind = process_group(process, self.root_pid, root_cmdline)
            except psutil.Error:
                continue  # exited while being sampled
            self.cpu_seconds[process.pid] = (kind, cpu.user + cpu.system)
            alive.append((process, kind))
        peak, now = self.peak, time.monotonic()
        peak["samples"] += 1
        peak["processes"], peak["rss"] = max(peak["processes"], len(alive)), max(peak["rss"], rss)
        last_time, last_rss = self.last_pss
        if rss > PSS_RESAMPLE_GROWTH * last_rss or now - last_time >= PSS_INTERVAL_SECONDS:
            self.last_pss, by_kind = (now, rss), {}
            for process, kind in alive:
                with contextlib.suppress(psutil.Error):
                    by_kind[kind] = by_kind.get(kind, 0) + process.memory_full_info().pss
            peak["pss_samples"] += 1
            if sum(by_kind.values()) > peak["pss"]:
                peak["pss"], self.peak_pss_by_kind = sum(by_kind.values()), by_kind


def system_busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has been busy (Linux fields; steal is not its work)."""
    times = psutil.cpu_times()
    return sum(getattr(times, name, 0.0) for name in ("user", "nice", "system", "irq", "softirq"))


def wait_sampled(process: psutil.Popen, interval_seconds: float = 0.1) -> dict[str, Any]:
    """Waits for a started process while sampling its tree; everything seen, in GiB and seconds."""
    started, busy = time.perf_counter(), -system_busy_cpu_seconds()
    sampler = _TreeSampler(process.pid, interval_seconds)
    sampler.start()
    process.wait()
    sampler.stop.set()
    sampler.join()
    wall, busy = time.perf_counter() - started, busy + system_busy_cpu_seconds()
    by_kind: dict[str, float] = {}
    for kind, seconds in sampler.cpu_seconds.values():
        by_kind[kind] = by_kind.get(kind, 0.0) + seconds
    peak = sampler.peak
    return {
        "peak_pss_gib": peak["pss"] / 2**30,
        "peak_rss_gib": peak["rss"] / 2**30,
        "peak_processes": peak["processes"],
        "pss_gib_by_kind_at_peak": {k: v / 2**30 for k, v in sampler.peak_pss_by_kind.items()},
        "cpu_seconds_by_kind": dict(sorted(by_kind.items(), key=lambda item: -item[1])),
        "sampler_cpu_seconds": sampler.own_cpu_seconds,
        # Everything else the machine ran meanwhile: a large value means other work disturbed it.
        "cpu_seconds_outside_tree": max(
            0.0, busy - sum(by_kind.values()) - sampler.own_cpu_seconds
        ),
        # The machine's CPU capacity nobody used: what waiting and serial parts cost.
        "cpu_seconds_idle": max(0.0, machine_cores() * wall - busy),
        "process_wall_seconds": wall,
        "samples": peak["samples"],
        "pss_samples": peak["pss_samples"],
        "interval_seconds": interval_seconds,
    }


def wait_until_idle(max_wait_seconds: float, busy_fraction: float = 0.15) -> float:
    """Waits up to `max_wait_seconds` for the machine's CPU use to drop below `busy_fraction`
    (timings on a shared machine measure other work too); returns the last busy fraction seen."""
    deadline = time.monotonic() + max_wait_seconds
    while True:
        busy = psutil.cpu_percent(interval=1.0) / 100
        if busy < busy_fraction or time.monotonic() >= deadline:
            return busy


def _attempts(
    measure: Callable[[], dict[str, Any]], runs: int, wait_for_idle: float, stop_when_calm: bool
) -> list[tuple[float, dict[str, Any]]]:
    """Up to `runs` (disturbance, result) pairs, each run after waiting up to `wait_for_idle` s
    for an idle machine; with `stop_when_calm`, none after the first run disturbed at most 8 %.

    Disturbance: other work's share of the machine's CPU meanwhile, where other work is the
    machine's busy time minus this process and its reaped children, or for a result with a
    tree's summary under "memory" (Ray's daemons are not reaped here), its figure.
    """

    def own_cpu_seconds() -> float:
        times = psutil.Process().cpu_times()
        return times.user + times.system + times.children_user + times.children_system

    attempts = []
    for _ in range(max(1, runs)):
        busy_before = wait_until_idle(wait_for_idle)
        system, own, started = system_busy_cpu_seconds(), own_cpu_seconds(), time.perf_counter()
        result = measure()
        system, own = system_busy_cpu_seconds() - system, own_cpu_seconds() - own
        result["machine_busy_before"] = busy_before
        result["metered_seconds"] = time.perf_counter() - started
        result["cpu_seconds_outside_process"] = max(0.0, system - own)
        tree = result.get("memory", {})
        other = tree.get("cpu_seconds_outside_tree", result["cpu_seconds_outside_process"])
        wall = tree.get("process_wall_seconds", result["metered_seconds"])
        attempts.append((other / (wall * machine_cores()), result))
        if stop_when_calm and attempts[-1][0] <= TOLERATED_DISTURBANCE:
            break
    return attempts


def least_disturbed(
    measure: Callable[[], dict[str, Any]], runs: int, wait_for_idle: float
) -> dict[str, Any]:
    """Runs `measure` until other work took at most 8 % of the machine's CPU, at most `runs`
    times; the least disturbed result."""
    attempts = _attempts(measure, runs, wait_for_idle, stop_when_calm=True)
    least, best = min(attempts, key=lambda attempt: attempt[0])
    return {**best, "disturbance": least, "attempt_disturbances": [a[0] for a in attempts]}


def fastest_calm(
    measure: Callable[[], dict[str, Any]], runs: int, wait_for_idle: float
) -> dict[str, Any]:
    """Runs `measure` `runs` times; the fastest result (least "seconds") of those other work
    disturbed at most 8 %, else the least disturbed. The host's other guests slow a run in ways
    this machine cannot see (the same 10 h run took 18.6 s and 21.4 s an hour apart, both
    undisturbed here), and never speed one up, so the fastest is the least noisy figure."""
    attempts = _attempts(measure, runs, wait_for_idle, stop_when_calm=False)
    calm = [attempt for attempt in attempts if attempt[0] <= TOLERATED_DISTURBANCE]
    if calm:
        disturbance, best = min(calm, key=lambda attempt: attempt[1]["seconds"])
    else:
        disturbance, best = min(attempts, key=lambda attempt: attempt[0])
    return {
        **best,
        "disturbance": disturbance,
        "attempt_disturbances": [a[0] for a in attempts],
        "attempt_seconds": [a[1]["seconds"] for a in attempts],
    }
