"""A free TCP port on loopback for the rendezvous and servers this project starts."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on right now.

    Fixed defaults (torch's rendezvous on 29500, a server's usual port) may be taken by another
    job on the same machine. The port is free only when this returns: the caller uses it at once,
    before another process happens to take it.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
