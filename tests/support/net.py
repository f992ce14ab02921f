"""Free loopback ports for the servers the tests start."""

from __future__ import annotations

import socket


def free_ports(count: int) -> list[int]:
    """Ports the kernel reports free right now (held open together so that they differ)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port() -> int:
    return free_ports(1)[0]
