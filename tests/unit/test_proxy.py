"""The chaos test's TCP proxy: round robin over backends, skipping one that refuses, and cutting connections."""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Iterator

import pytest
from hack.cluster import ports, proxy


class _Echo(socketserver.BaseRequestHandler):
    """Answers every chunk with the server's name and the chunk, until the client closes."""

    def handle(self) -> None:
        name: bytes = self.server.name  # type: ignore[attr-defined]
        while data := self.request.recv(1024):
            self.request.sendall(name + b":" + data)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.fixture
def backends() -> Iterator[list[int]]:
    servers = []
    for name in (b"a", b"b"):
        server = _Server(("127.0.0.1", 0), _Echo)
        server.name = name  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    yield [server.server_address[1] for server in servers]
    for server in servers:
        server.shutdown()
        server.server_close()


def ask(port: int, text: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(text)
        return sock.recv(1024)


def test_each_new_connection_goes_to_the_next_backend(backends: list[int]) -> None:
    with proxy.TcpProxy(backends) as relay:
        answers = [ask(relay.port, b"hi") for _ in range(4)]
    assert answers == [b"a:hi", b"b:hi", b"a:hi", b"b:hi"]
    assert dict(relay.connections) == {backends[0]: 2, backends[1]: 2}


def test_a_backend_that_refuses_is_skipped_and_none_accepting_closes_the_client(backends: list[int]) -> None:
    closed = ports.free_port()  # nothing listens there
    with proxy.TcpProxy([closed, backends[1]]) as relay:
        assert [ask(relay.port, b"x") for _ in range(3)] == [b"b:x"] * 3
    with proxy.TcpProxy([closed]) as relay:
        assert ask(relay.port, b"x") == b""
        assert relay.refused == 1


def test_cut_ends_every_open_connection_and_new_ones_are_relayed_again(backends: list[int]) -> None:
    with proxy.TcpProxy(backends[:1]) as relay:
        held = [socket.create_connection(("127.0.0.1", relay.port), timeout=5) for _ in range(2)]
        try:
            for sock in held:
                sock.sendall(b"1")
                assert sock.recv(1024) == b"a:1"
            assert relay.cut() == 2
            for sock in held:
                try:
                    sock.sendall(b"2")
                    assert sock.recv(1024) == b""
                except ConnectionResetError:
                    pass  # the cut aborts: a reset is what a client may see
        finally:
            for sock in held:
                sock.close()
        assert ask(relay.port, b"3") == b"a:3"
