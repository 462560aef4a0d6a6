"""The gateway's listening sockets (gateway/listen.py): several on one port, so a busy
event loop still accepts new connections quickly, and never a port another server holds."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import cast

import httpx
import pytest
import uvloop
from fake_upstream import FakeUpstream
from servers.configs import gateway_config, policy, tenant
from servers.gateway import start_process, write_config

from gateway.listen import LISTEN_SOCKETS, ListenError, listen_sockets


def _listeners_on(port: int) -> int:
    """Listening sockets on ``port``, from /proc/net/tcp (state 0A is LISTEN)."""
    n = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and int(fields[1].split(":")[1], 16) == port:
            n += 1
    return n


def test_the_sockets_share_one_port() -> None:
    sockets = listen_sockets("127.0.0.1", 0, backlog=128, count=8)
    try:
        port = sockets[0].getsockname()[1]
        assert len(sockets) == 8 and {s.getsockname()[1] for s in sockets} == {port}
        assert _listeners_on(port) == 8
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
    finally:
        for s in sockets:
            s.close()


def test_a_port_in_use_is_refused() -> None:
    """By a plain listener, and by another group of reuseport sockets (another gateway),
    which the kernel would otherwise let these join."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(ListenError, match=f"127.0.0.1:{port}"):
            listen_sockets("127.0.0.1", port, backlog=128)
    first = listen_sockets("127.0.0.1", 0, backlog=128, count=4)
    try:
        port = first[0].getsockname()[1]
        with pytest.raises(ListenError):
            listen_sockets("127.0.0.1", port, backlog=128, count=4)
        assert _listeners_on(port) == 4
    finally:
        for s in first:
            s.close()


def _accept_time(count: int, clients: int, pass_seconds: float) -> float:
    """Seconds until ``clients`` connecting at once are all accepted by a uvloop server on
    ``count`` sockets, whose event loop takes ``pass_seconds`` per pass (busy, as under
    load). Each client waits for one byte the server sends once it has accepted it."""
    sockets = listen_sockets("127.0.0.1", 0, backlog=1024, count=count)
    port = sockets[0].getsockname()[1]
    loop = uvloop.new_event_loop()
    ready = threading.Event()

    class Hello(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            cast(asyncio.WriteTransport, transport).write(b"x")

    def busy() -> None:
        time.sleep(pass_seconds)  # the rest of a busy pass
        loop.call_soon(busy)

    stop = asyncio.Event()

    async def main() -> None:
        servers = [await loop.create_server(Hello, sock=s) for s in sockets]
        loop.call_soon(busy)
        ready.set()
        await stop.wait()
        for server in servers:
            server.close()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert ready.wait(10)
    conns: list[socket.socket] = []
    try:
        t0 = time.monotonic()
        conns = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(clients)]
        for c in conns:
            assert c.recv(1) == b"x"
        return time.monotonic() - t0
    finally:
        for c in conns:
            c.close()
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()


def test_a_busy_loop_accepts_many_connections_per_pass() -> None:
    """libuv accepts one connection per listening socket per pass of the loop: with one
    socket, 200 clients need 200 passes (at 10 ms each, at least 2 s); with the
    gateway's sockets, a few passes."""
    one = _accept_time(1, 200, 0.01)
    many = _accept_time(LISTEN_SOCKETS, 200, 0.01)
    assert one >= 2.0, one
    assert many < 1.0, many


def test_gateway_serve_listens_on_its_sockets_and_refuses_a_taken_port(
    tmp_path: Path, fake: FakeUpstream
) -> None:
    path = write_config(
        tmp_path, gateway_config(fake.base_url), {"p": policy({"t1": tenant("key-1")})}
    )
    gw = start_process(path, log=tmp_path / "gateway.log")
    try:
        port = int(gw.url.rsplit(":", 1)[1].split("/")[0])
        assert _listeners_on(port) == LISTEN_SOCKETS
        assert httpx.get(gw.url + "/healthz", timeout=10).status_code == 200
        second = subprocess.run(
            [sys.executable, "-m", "gateway", "serve", "--config", str(path), "--port", f"{port}"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode != 0
        assert f"cannot listen on 127.0.0.1:{port}" in second.stderr, second.stderr
        assert _listeners_on(port) == LISTEN_SOCKETS  # the first one is untouched
    finally:
        gw.stop()


def test_an_address_that_is_not_there_is_refused() -> None:
    with pytest.raises(ListenError, match=r"cannot listen on no-such-host\.invalid:8080"):
        listen_sockets("no-such-host.invalid", 8080, backlog=128)
