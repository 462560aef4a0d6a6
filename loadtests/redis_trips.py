"""Counting the Redis commands a request costs, with ``MONITOR``.

MONITOR prints every command the server runs; the lines that name a key under the
bench's own prefix are the gateway's (Redis is shared, so other clients' commands are
ignored). The gateway's hot path sends no pipelines, so each command is one round trip.
Commands on ``cache`` and ``flight`` keys only are the cache's; the others are the round
trips the design bounds ("at most two outside the cache"), among them the one that looks
a cache entry up and admits the request at once ("cache+state")."""

from __future__ import annotations

import re
import socket
import threading
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit

_CACHE_KINDS = frozenset({b"cache", b"flight"})
_LINE = re.compile(rb'^[\d.]+ \[\d+ ([^\]]+)\] "([A-Za-z]+)"(.*)$')


@dataclass
class Trips:
    commands: Counter[str] = field(default_factory=Counter)  # "EVALSHA:budget" -> count
    cache: int = 0
    other: int = 0


class Monitor:
    """``MONITOR`` on its own connection, in a thread, between start() and stop()."""

    def __init__(self, url: str, prefix: str) -> None:
        u = urlsplit(url)
        self._addr = (u.hostname or "127.0.0.1", u.port or 6379)
        self._password = u.password
        self._needle = f'"{prefix}:'.encode()
        # '"<prefix>:v1:{<tag>}:<kind>...' or '"<prefix>:v1:<kind>': the kinds of key named
        self._kind = re.compile(
            b'"' + re.escape(prefix.encode()) + rb":v1:(?:\{[^}]*\}:)?([a-z-]+)"
        )
        self.trips = Trips()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> None:
        sock = socket.create_connection(self._addr, timeout=5)
        if self._password:
            sock.sendall(f"AUTH {self._password}\r\n".encode())
            sock.recv(64)
        sock.sendall(b"MONITOR\r\n")
        if not sock.recv(64).startswith(b"+OK"):
            raise RuntimeError("Redis refused MONITOR")
        sock.settimeout(0.2)
        self._sock = sock
        self._thread = threading.Thread(target=self._read, name="redis-monitor", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._sock is not None
        buf = b""
        while not self._stop.is_set():
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            buf += data
            *lines, buf = buf.split(b"\r\n")
            for line in lines:
                self._count(line)

    def _count(self, line: bytes) -> None:
        if self._needle not in line:
            return
        m = _LINE.match(line.lstrip(b"+"))
        if m is None or m.group(1) == b"lua":  # commands a script runs are no round trips
            return
        command, rest = m.group(2).upper().decode(), m.group(3)
        kinds = set(self._kind.findall(rest))
        if kinds <= _CACHE_KINDS:
            kind = "cache"
        else:
            kind = "cache+state" if kinds & _CACHE_KINDS else "state"
        self.trips.commands[f"{command} ({kind})"] += 1
        if kind == "cache":
            self.trips.cache += 1
        else:
            self.trips.other += 1

    def stop(self) -> Trips:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._sock is not None:
            self._sock.close()
        return self.trips
