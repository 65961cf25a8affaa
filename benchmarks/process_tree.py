"""Peak memory and CPU time of a process together with all of its descendants.

Ray runs a driver, gcs_server, raylet, agents and one worker per core; `datasets.map(num_proc=N)`
forks N workers. Their memory only means something summed, and the sum has to be taken at one
instant (summing per-process peaks would add peaks that never coincided), so a background thread
samples the whole tree at a fixed interval.

Two sums are kept. RSS counts every resident page in each process that maps it, so shared pages
(the forked parent's heap, shared libraries, Ray's object store in /dev/shm) are counted once per
process: an upper bound. PSS charges each shared page 1/n to each of its n users, so the PSS sum
is the tree's real footprint; it is the headline figure, RSS is kept for comparison.

Reading PSS makes the kernel walk every page table (/proc/PID/smaps_rollup, ~1.5 ms per Ray
process), which would steal a noticeable share of a small machine from the work being measured.
So RSS (from /proc/PID/statm, ~15 µs) is sampled every interval and PSS only when the RSS sum
rises 5 % above where PSS was last read, or once per `pss_interval_seconds`: the PSS peak is
taken within 5 % of where the memory peak is, at a fraction of the cost.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psutil

# PSS is read again once the RSS sum has grown this much since the last PSS reading.
PSS_RESAMPLE_GROWTH = 1.05


@dataclass
class _SeenProcess:
    kind: str
    cpu_seconds: float = 0.0


@dataclass
class ProcessTreeSampler:
    """Samples `root_pid` and its descendants every `interval_seconds` until stopped.

    Use as a context manager around the work. CPU time per process is the last value seen, so
    a process that exits between samples loses at most one interval of CPU time.
    """

    root_pid: int
    interval_seconds: float = 0.1
    pss_interval_seconds: float = 2.0
    peak_rss_bytes: int = 0
    peak_pss_bytes: int = 0
    peak_processes: int = 0
    peak_pss_by_kind: dict[str, int] = field(default_factory=dict)
    samples: int = 0
    pss_samples: int = 0
    _seen: dict[int, _SeenProcess] = field(default_factory=dict)
    _last_pss_time: float = float("-inf")
    _last_pss_rss: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _system_busy_start: float = 0.0
    _system_busy_seconds: float = 0.0
    _sampler_cpu_seconds: float = 0.0

    def __enter__(self) -> ProcessTreeSampler:
        self._system_busy_start = _system_busy_cpu_seconds()
        self._thread = threading.Thread(target=self._run, name="process-tree-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._system_busy_seconds = _system_busy_cpu_seconds() - self._system_busy_start

    def _run(self) -> None:
        started = time.thread_time()
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval_seconds)
        self._sample()
        self._sampler_cpu_seconds = time.thread_time() - started

    def _kind(self, process: psutil.Process, root_cmdline: list[str]) -> str:
        """Groups processes for the CPU breakdown: Ray workers by role, daemons by name."""
        if process.pid == self.root_pid:
            return "driver"
        name = process.name()
        cmdline = process.cmdline()
        # Ray renames its workers "ray::IDLE" etc. only after they have started.
        if "default_worker.py" in " ".join(cmdline) or (
            cmdline and cmdline[0].startswith("ray::") and not cmdline[0].endswith("Agent")
        ):
            return "ray workers"
        if cmdline == root_cmdline:
            return "forks of the driver"
        scripts = [os.path.basename(part) for part in cmdline if part.endswith(".py")]
        return scripts[0] if name.startswith("python") and scripts else name

    def _sample(self) -> None:
        try:
            root = psutil.Process(self.root_pid)
            processes = [root, *root.children(recursive=True)]
            root_cmdline = root.cmdline()
        except psutil.Error:
            return
        rss = 0
        alive = []
        for process in processes:
            try:
                rss += process.memory_info().rss
                cpu = process.cpu_times()
                seen = self._seen.get(process.pid)
                if seen is None:
                    seen = self._seen[process.pid] = _SeenProcess(self._kind(process, root_cmdline))
            except psutil.Error:
                continue  # exited while being sampled
            seen.cpu_seconds = cpu.user + cpu.system
            alive.append((process, seen.kind))
        self.samples += 1
        self.peak_processes = max(self.peak_processes, len(alive))
        now = time.monotonic()
        if (
            rss > PSS_RESAMPLE_GROWTH * self._last_pss_rss
            or now - self._last_pss_time >= self.pss_interval_seconds
        ):
            self._sample_pss(alive)
            self._last_pss_time, self._last_pss_rss = now, rss
        self.peak_rss_bytes = max(self.peak_rss_bytes, rss)

    def _sample_pss(self, processes: list[tuple[psutil.Process, str]]) -> None:
        pss = 0
        by_kind: dict[str, int] = {}
        for process, kind in processes:
            try:
                process_pss = process.memory_full_info().pss
            except psutil.Error:
                continue
            pss += process_pss
            by_kind[kind] = by_kind.get(kind, 0) + process_pss
        self.pss_samples += 1
        if pss > self.peak_pss_bytes:
            self.peak_pss_bytes, self.peak_pss_by_kind = pss, by_kind

    def cpu_seconds_by_kind(self) -> dict[str, float]:
        """CPU seconds (user + system) spent by each kind of process while sampled."""
        totals: dict[str, float] = {}
        for seen in self._seen.values():
            totals[seen.kind] = totals.get(seen.kind, 0.0) + seen.cpu_seconds
        return dict(sorted(totals.items(), key=lambda item: -item[1]))

    def summary(self) -> dict[str, Any]:
        """Everything measured, in units a JSON reader needs no code for (GiB, seconds)."""
        tree_cpu_seconds = sum(self.cpu_seconds_by_kind().values())
        return {
            "peak_pss_gib": self.peak_pss_bytes / 2**30,
            "peak_rss_gib": self.peak_rss_bytes / 2**30,
            "peak_processes": self.peak_processes,
            "pss_gib_by_kind_at_peak": {k: v / 2**30 for k, v in self.peak_pss_by_kind.items()},
            "cpu_seconds_by_kind": self.cpu_seconds_by_kind(),
            "sampler_cpu_seconds": self._sampler_cpu_seconds,
            # Everything else the machine ran meanwhile: a large value means other work
            # disturbed the timings.
            "cpu_seconds_outside_tree": max(
                0.0, self._system_busy_seconds - tree_cpu_seconds - self._sampler_cpu_seconds
            ),
            "samples": self.samples,
            "pss_samples": self.pss_samples,
            "interval_seconds": self.interval_seconds,
        }


def _system_busy_cpu_seconds() -> float:
    times = psutil.cpu_times()
    # Linux fields; guest time is already inside user, steal is not this machine's work.
    fields = ("user", "nice", "system", "irq", "softirq")
    return sum(getattr(times, field, 0.0) for field in fields)


def wait_sampled(process: psutil.Popen, interval_seconds: float = 0.1) -> dict[str, Any]:
    """Waits for a started process while sampling its tree; returns the sampler's summary."""
    started = time.perf_counter()
    with ProcessTreeSampler(process.pid, interval_seconds) as sampler:
        process.wait()
    return {**sampler.summary(), "process_wall_seconds": time.perf_counter() - started}


def wait_until_idle(
    max_wait_seconds: float, busy_fraction: float = 0.15, window_seconds: float = 2.0
) -> float:
    """Waits until the machine's CPU use over `window_seconds` drops below `busy_fraction`.

    Timings on a machine shared with other work (tests, training) measure that work too. Gives
    up after `max_wait_seconds`; returns the busy fraction last seen, for the results.
    """
    deadline = time.monotonic() + max_wait_seconds
    while True:
        busy = psutil.cpu_percent(interval=window_seconds) / 100
        if busy < busy_fraction or time.monotonic() >= deadline:
            return busy


@contextlib.contextmanager
def other_work_meter() -> Iterator[dict[str, float]]:
    """Measures the CPU time the rest of the machine used while the block ran.

    Yields a dict that gets "cpu_seconds_outside_process": system-wide busy time minus this
    process and its reaped children (DataLoader workers are reaped when the loader shuts down).
    A large value means other work shared the cores and the timing is pessimistic.
    """

    def own_cpu_seconds() -> float:
        times = psutil.Process().cpu_times()
        return times.user + times.system + times.children_user + times.children_system

    result: dict[str, float] = {}
    system_start, own_start = _system_busy_cpu_seconds(), own_cpu_seconds()
    yield result
    system = _system_busy_cpu_seconds() - system_start
    result["cpu_seconds_outside_process"] = max(0.0, system - (own_cpu_seconds() - own_start))


def run_least_disturbed(
    measure: Callable[[], dict[str, Any]],
    disturbance: Callable[[dict[str, Any]], float],
    retries: int,
    wait_for_idle: float,
    tolerated_disturbance: float = 0.08,
) -> dict[str, Any]:
    """Runs `measure` until other work disturbed it little, at most `retries` extra times.

    `disturbance` maps a result to the share of the machine's CPU capacity that other work
    took during it. Each attempt waits for the machine to go idle first (up to
    `wait_for_idle` seconds). Returns the least disturbed result, with every attempt's
    disturbance under "attempt_disturbances" so the JSON shows what was thrown away.
    """
    attempts = []
    for _ in range(retries + 1):
        busy_before = wait_until_idle(wait_for_idle, window_seconds=1.0)
        result = {**measure(), "machine_busy_before": busy_before}
        attempts.append((disturbance(result), result))
        if attempts[-1][0] <= tolerated_disturbance:
            break
    least, best = min(attempts, key=lambda attempt: attempt[0])
    return {**best, "disturbance": least, "attempt_disturbances": [a[0] for a in attempts]}
