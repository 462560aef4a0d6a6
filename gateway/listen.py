"""The gateway's listening sockets: several on one port, so that a busy event loop still
accepts new connections quickly.

libuv (under uvloop) accepts one connection per listening socket per pass of the event
loop. Under load a pass takes 10-30 ms, so with one socket, 500 clients connecting at
once to a busy gateway waited in the kernel's accept queue for up to 6 s (measured with
wrk at c=500, ``ss`` showing 455-501 connections queued; the requests themselves took
at most 221 ms inside the gateway). With ``count`` sockets bound to the same port
(``SO_REUSEPORT``: the kernel spreads new connections over them by a hash), the loop
accepts up to ``count`` per pass. 16 sockets still left a connection waiting 1.5 s (the
hash had put 43 in one socket's queue); with 64 the longest wait was 0.1-0.6 s in three
runs, and wrk's p99 at c=500 228-360 ms."""

from __future__ import annotations

import socket
from typing import Any

LISTEN_SOCKETS = 64


class ListenError(Exception):
    """The gateway cannot listen on the address (taken, not allowed, not local)."""


def listen_sockets(
    host: str, port: int, backlog: int, count: int = LISTEN_SOCKETS
) -> list[socket.socket]:
    """``count`` listening sockets on each address of ``host`` at ``port`` (port 0: one
    free port for all), or one each where ``SO_REUSEPORT`` does not exist. Refuses an
    address something already listens on, even another process's ``SO_REUSEPORT`` group
    (which the kernel would let these join, quietly splitting the connections between
    two servers)."""
    if not hasattr(socket, "SO_REUSEPORT"):
        count = 1
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    addresses = list(dict.fromkeys((family, address) for family, _, _, _, address in found))
    sockets: list[socket.socket] = []
    try:
        for family, address in addresses:
            if port and count > 1:
                _refuse_if_taken(family, _at(address, port))
            for _ in range(count):
                sock = _bound(family, _at(address, port), reuse_port=count > 1)
                sockets.append(sock)
                port = sock.getsockname()[1]  # port 0: the rest join the port it got
                sock.listen(backlog)
                sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _bound(family: int, address: tuple[Any, ...], reuse_port: bool) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on {_show(address)}: {exc.strerror}") from None
    return sock


def _at(address: tuple[Any, ...], port: int) -> tuple[Any, ...]:
    """``address`` (an IPv4 or IPv6 socket address) with ``port``."""
    return (address[0], port, *address[2:])


def _show(address: tuple[Any, ...]) -> str:
    host = str(address[0])
    return f"[{host}]:{address[1]}" if ":" in host else f"{host}:{address[1]}"


def _refuse_if_taken(family: int, address: tuple[Any, ...]) -> None:
    # Without SO_REUSEPORT this bind fails if anything listens there, a reuseport group
    # included; with it, it would have joined that group.
    _bound(family, address, reuse_port=False).close()
