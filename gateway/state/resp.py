"""A small pipelining Redis client for the hot path: the admission, settlement and cache
scripts every request runs.

redis-py's asyncio client spent about half the gateway's CPU per request in Redis mode
(connection-pool locking, command packing, per-call bookkeeping). This client keeps a few
connections open and pipelines on them: a call packs its command (hiredis), writes it at
once and waits for its reply, which hiredis parses in C; replies come back in the order
commands were sent, so each is handed to the oldest waiter. Everything else (ledger queries,
start-up checks) stays on redis-py. Errors are redis-py's exception classes, so the
backend translates them in one place.

A call that times out closes its connection: a reply arriving later would otherwise be
handed to the next caller."""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from typing import Any

import hiredis
from redis.exceptions import AuthenticationError, NoScriptError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError


def _error(reply: Exception) -> ResponseError:
    text = str(reply)
    return NoScriptError(text) if text.startswith("NOSCRIPT") else ResponseError(text)


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self._reader = hiredis.Reader()
        self._waiters: deque[asyncio.Future[Any]] = deque()
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        err = RedisConnectionError(f"connection to Redis lost ({exc or 'closed by the server'})")
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(err)

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while True:
            reply = self._reader.gets()
            if reply is False:
                return
            fut = self._waiters.popleft()
            if fut.done():  # its caller gave up (cancelled); the reply is dropped
                continue
            if isinstance(reply, hiredis.ReplyError):
                fut.set_exception(_error(reply))
            else:
                fut.set_result(reply)

    def send(self, packed: bytes) -> asyncio.Future[Any]:
        fut = asyncio.get_running_loop().create_future()
        if self.closed or self.transport is None:
            fut.set_exception(RedisConnectionError("connection to Redis lost"))
            return fut
        self._waiters.append(fut)
        # Written at once, not gathered into one write per pass of the event loop: that
        # made each call wait for the rest of the pass (at 500 slow streams, Redis state:
        # p50 583-650 ms against 702-718, and 2-5 % less CPU at json-c50, in three
        # interleaved pairs of runs with Redis off the gateway's core).
        self.transport.write(packed)
        return fut

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.close()


def _expire(fut: asyncio.Future[Any], conn: _Connection, timeout: float) -> None:
    if not fut.done():
        fut.set_exception(RedisTimeoutError(f"no reply from Redis within {timeout:g}s"))
        conn.close()  # its stream of replies can no longer be matched to callers


class RespClient:
    """Pipelined calls over ``size`` connections, made on first use and remade after a
    failure. ``kwargs`` are redis-py's connection keywords (from its URL parsing)."""

    def __init__(
        self, kwargs: dict[str, Any], *, tls: bool = False, size: int = 4, timeout: float = 5.0
    ) -> None:
        self._kw = kwargs
        self._tls = tls
        self._timeout = timeout
        self._conns: list[_Connection | None] = [None] * size
        self._connecting: list[asyncio.Future[_Connection] | None] = [None] * size
        self._next = 0

    async def _open(self) -> _Connection:
        kw = self._kw
        loop = asyncio.get_running_loop()
        connect_timeout = kw.get("socket_connect_timeout") or self._timeout
        try:
            async with asyncio.timeout(connect_timeout):
                if kw.get("path"):
                    _, conn = await loop.create_unix_connection(_Connection, kw["path"])
                else:
                    tls = ssl.create_default_context() if self._tls else None
                    _, conn = await loop.create_connection(
                        _Connection, kw.get("host", "localhost"), kw.get("port", 6379), ssl=tls
                    )
                setup: list[list[Any]] = []
                if kw.get("password"):
                    user = kw.get("username")
                    setup.append(["AUTH", *([user] if user else []), kw["password"]])
                if kw.get("db"):
                    setup.append(["SELECT", kw["db"]])
                try:
                    for cmd in setup:
                        await conn.send(hiredis.pack_command(tuple(cmd)))
                except ResponseError as exc:
                    conn.close()
                    if str(exc).startswith(("WRONGPASS", "NOAUTH", "ERR invalid password")):
                        raise AuthenticationError(str(exc)) from exc
                    raise
        except TimeoutError as exc:  # the builtin, from asyncio.timeout
            what = f"connecting to Redis took longer than {connect_timeout:g}s"
            raise RedisTimeoutError(what) from exc
        except OSError as exc:
            raise RedisConnectionError(f"cannot connect to Redis: {exc}") from exc
        return conn

    async def _connection(self) -> _Connection:
        i = self._next
        self._next = (i + 1) % len(self._conns)
        conn = self._conns[i]
        if conn is not None and not conn.closed:
            return conn
        pending = self._connecting[i]
        if pending is None:  # one connect per slot at a time; others wait for it
            pending = self._connecting[i] = asyncio.ensure_future(self._open())
        try:
            conn = await asyncio.shield(pending)
        finally:
            if pending.done():
                self._connecting[i] = None
        self._conns[i] = conn
        return conn

    async def call(self, *args: Any) -> Any:
        conn = await self._connection()
        fut = conn.send(hiredis.pack_command(args))
        timer = asyncio.get_running_loop().call_later(
            self._timeout, _expire, fut, conn, self._timeout
        )
        try:
            return await fut
        finally:
            timer.cancel()

    async def evalsha(self, sha: str, script: str | bytes, keys: list[str], args: list[Any]) -> Any:
        """Run a script by its SHA; if Redis does not know it (restarted, flushed), send
        the source, which loads it for the next call."""
        try:
            return await self.call("EVALSHA", sha, len(keys), *keys, *args)
        except NoScriptError:
            return await self.call("EVAL", script, len(keys), *keys, *args)

    def close(self) -> None:
        for conn in self._conns:
            if conn is not None:
                conn.close()
        self._conns = [None] * len(self._conns)
