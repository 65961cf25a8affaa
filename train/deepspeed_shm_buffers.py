"""DeepSpeed's CPU all-reduce buffers in /dev/shm: removed after each run, stale ones at start.

On CPU, when every rank runs on one host, DeepSpeed's shm all-reduce creates one 66 MB file per
rank, `deepspeed_allreduce_buffer_{uid}_{MASTER_ADDR}_{MASTER_PORT}_{rank}`, and never unlinks
it. Peers map each other's buffers while the process group starts and spin until a buffer they
look for exists, so a buffer may only go once every peer has mapped it: after the barrier that
follows the start. Unlinking then is safe at any time; the mappings live on until exit.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

SHM_DIR = Path("/dev/shm")
PREFIX = "deepspeed_allreduce_buffer"


def own_buffer() -> Path:
    """The buffer this rank's DeepSpeed CPU backend creates, named as DeepSpeed names it."""
    address, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return SHM_DIR / f"{PREFIX}_{os.getuid()}_{address}_{port}_{os.environ['RANK']}"


def remove_own_buffer() -> None:
    own_buffer().unlink(missing_ok=True)


def mapped_files() -> set[str]:
    """Paths of the files that live processes map, as far as /proc lets this user see."""
    mapped: set[str] = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            lines = maps.read_text().splitlines()
        except OSError:  # the process ended, or belongs to someone else
            continue
        for line in lines:
            fields = line.split(None, 5)  # address perms offset dev inode [path]
            if len(fields) == 6:
                mapped.add(fields[5].removesuffix(" (deleted)"))
    return mapped


def remove_stale_buffers(min_age_seconds: float = 60.0) -> list[Path]:
    """Removes this user's buffers that no live process maps, and returns them.

    A killed run leaves its buffers behind. A buffer younger than `min_age_seconds` is left
    alone even when unmapped: a starting run creates it an instant before mapping it.
    """
    mapped = mapped_files()
    now = time.time()
    removed = []
    for path in SHM_DIR.glob(f"{PREFIX}_{os.getuid()}_*"):
        try:
            if str(path) in mapped or now - path.stat().st_mtime < min_age_seconds:
                continue
            path.unlink()
        except FileNotFoundError:  # another run's cleanup got there first
            continue
        removed.append(path)
    return removed
