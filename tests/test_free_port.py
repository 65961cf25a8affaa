"""free_port: a loopback port a server can listen on right away."""

from __future__ import annotations

import socket

from train.free_port import free_port


def test_the_port_can_be_listened_on_and_reached():
    port = free_port()
    assert 0 < port < 65536
    with socket.create_server(("127.0.0.1", port)) as server:
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            server.accept()[0].close()
