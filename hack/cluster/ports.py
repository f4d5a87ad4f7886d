"""Free loopback ports for the servers the harness, the tests and the benchmarks start."""

from __future__ import annotations

import contextlib
import socket

__all__ = ["free_port", "free_ports"]


def free_ports(count: int) -> list[int]:
    """`count` distinct ports: every socket stays open until all are picked."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]


def free_port() -> int:
    """One port that was free a moment ago (callers that race for it retry, as TempPostgres does)."""
    return free_ports(1)[0]
