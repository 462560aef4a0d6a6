"""An HTTP proxy that opens CONNECT tunnels (as squid or an egress proxy does), on a free
port, recording what it was asked; optionally requiring Proxy-Authorization."""

from __future__ import annotations

import select
import socket
import socketserver
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from servers.raw import serving


@dataclass
class ProxyLog:
    tunnels: list[tuple[str, str | None]] = field(default_factory=list)  # (target, auth)
    refused: list[str] = field(default_factory=list)  # the targets of CONNECTs refused


def _pump(a: socket.socket, b: socket.socket) -> None:
    """Copy bytes both ways until either side closes."""
    socks = [a, b]
    while True:
        ready, _, _ = select.select(socks, [], [], 30)
        if not ready:
            return
        for s in ready:
            data = s.recv(65536)
            if not data:
                return
            (b if s is a else a).sendall(data)


@contextmanager
def connect_proxy(
    required_auth: str | None = None, *, silent: bool = False
) -> Iterator[tuple[int, ProxyLog]]:
    """Serve on a free port; yields the port and the log. ``required_auth``: the
    Proxy-Authorization value a CONNECT must carry, else 407. ``silent``: take requests
    and never answer (a hung proxy)."""
    log = ProxyLog()
    stop = threading.Event()

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            client: socket.socket = self.request
            if silent:
                stop.wait(30)
                return
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = client.recv(65536)
                if not chunk:
                    return
                head += chunk
            lines = head.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            headers = {
                k.strip().lower(): v.strip()
                for k, _, v in (line.partition(":") for line in lines[1:])
            }
            auth = headers.get("proxy-authorization")
            if method != "CONNECT":
                client.sendall(b"HTTP/1.1 405 Method Not Allowed\r\ncontent-length: 0\r\n\r\n")
                return
            if required_auth is not None and auth != required_auth:
                log.refused.append(target)
                client.sendall(
                    b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                    b'proxy-authenticate: Basic realm="egress"\r\ncontent-length: 0\r\n\r\n'
                )
                return
            host, _, port = target.rpartition(":")
            try:
                upstream = socket.create_connection((host, int(port)), timeout=5)
            except OSError:
                client.sendall(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n")
                return
            log.tunnels.append((target, auth))
            with upstream:
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                _pump(client, upstream)

    try:
        with serving(Handler) as port:
            yield port, log
    finally:
        stop.set()
