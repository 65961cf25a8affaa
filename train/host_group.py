"""A gloo group for waits on slow host work, and for failing together when that work fails.

Some ranks do minutes of work that the others must wait for: local rank 0 fills the node's
dataset cache (a cold cache of a large corpus is hours of download), global rank 0 converts a
checkpoint to universal form. A barrier on the default group would end that wait after
DeepSpeed's collective timeout (`DEEPSPEED_TIMEOUT`, 10 minutes by default) and kill a healthy
job. This group's timeout is made for such waits. And a rank whose work failed still joins the
wait, carrying its error, so every rank stops at once with the same one line instead of
waiting out any timeout.
"""

from __future__ import annotations

import socket
from datetime import timedelta
from typing import Any

import torch.distributed as dist

# Long enough to fill a node's cache with a corpus of thousands of hours; the downloads under
# it have their own network timeouts, so a stalled transfer fails instead of hanging.
SLOW_WORK_TIMEOUT = timedelta(hours=24)


class RankFailure(RuntimeError):
    """Work on some rank failed; one line naming the host, raised on every rank."""


def host_group() -> Any:
    """A new gloo group of all ranks whose collectives wait up to `SLOW_WORK_TIMEOUT`.

    A collective: every rank calls it, right after the process group starts.
    """
    return dist.new_group(backend="gloo", timeout=SLOW_WORK_TIMEOUT)


def raise_if_any_failed(group: Any, failure: str | None) -> None:
    """Every rank reports its failure (None if it had none); all raise the first one reported.

    A collective on `group`: it is also the wait for the ranks still working.
    """
    message = f"{socket.gethostname()}: {failure}" if failure else None
    reports: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(reports, message, group=group)
    failed = [report for report in reports if report]
    if failed:
        raise RankFailure(failed[0])
