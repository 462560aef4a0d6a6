"""A small pipelining Redis client for the hot path: the admission, settlement and cache
scripts every request runs.

redis-py's asyncio client spent about half the gateway's CPU per request in Redis mode
(connection-pool locking, command packing, per-call bookkeeping). This client keeps a few
connections open and pipelines on them: a call packs its command (hiredis), writes it at
once and waits for its reply, which hiredis parses in C; replies come back in the order
commands were sent, so each is handed to the oldest waiter. Everything else (ledger queries,
start-up checks) stays on redis-py. Errors are redis-py's exception classes, so the
backend translates them in one place.

A call is one coroutine deep, and its connection keeps one timer for all its calls (replies
come in order, so only the oldest call can be the first to time out): a script call costs
the request no chain of awaits and no timer of its own. When the oldest call has waited
``timeout`` seconds, every call on that connection fails and the connection closes: a
reply arriving later would otherwise be handed to the next caller."""

from __future__ import annotations

import asyncio
import socket
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
    def __init__(self, timeout: float) -> None:
        self._reader = hiredis.Reader()
        self._loop = asyncio.get_running_loop()
        self._timeout = timeout
        # Calls waiting for their reply, oldest first, each with its deadline.
        self._waiters: deque[tuple[asyncio.Future[Any], float]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.last_read = self._loop.time()  # when Redis last sent anything (see _pick)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        err = RedisConnectionError(f"connection to Redis lost ({exc or 'closed by the server'})")
        self._fail_all(err)

    def data_received(self, data: bytes) -> None:
        self.last_read = self._loop.time()
        self._reader.feed(data)
        while True:
            reply = self._reader.gets()
            if reply is False:
                return
            fut = self._waiters.popleft()[0]
            if fut.done():  # its caller gave up (cancelled); the reply is dropped
                continue
            if isinstance(reply, hiredis.ReplyError):
                fut.set_exception(_error(reply))
            else:
                fut.set_result(reply)

    def idle_past(self, limit: float) -> bool:
        """Nothing awaited and nothing heard from Redis for more than ``limit`` seconds."""
        return not self._waiters and self._loop.time() - self.last_read > limit

    def send(self, packed: bytes) -> asyncio.Future[Any]:
        loop = self._loop
        fut = loop.create_future()
        if self.closed or self.transport is None:
            fut.set_exception(RedisConnectionError("connection to Redis lost"))
            return fut
        deadline = loop.time() + self._timeout
        self._waiters.append((fut, deadline))
        if self._timer is None:
            self._timer = loop.call_at(deadline, self._check_deadline)
        # Written at once, not gathered into one write per pass of the event loop: that
        # made each call wait for the rest of the pass (at 500 slow streams, Redis state:
        # p50 583-650 ms against 702-718, and 2-5 % less CPU at json-c50, in three
        # interleaved pairs of runs with Redis off the gateway's core).
        self.transport.write(packed)
        return fut

    def _check_deadline(self) -> None:
        """The timer fired: fail everything if the oldest call is past its deadline, else
        wait for that one (the timer is re-armed only when it fires, not per call)."""
        self._timer = None
        if not self._waiters or self.closed:
            return
        deadline = self._waiters[0][1]
        if self._loop.time() < deadline:
            self._timer = self._loop.call_at(deadline, self._check_deadline)
            return
        self._fail_all(RedisTimeoutError(f"no reply from Redis within {self._timeout:g}s"))
        self.close()  # its stream of replies can no longer be matched to callers

    def _fail_all(self, err: Exception) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._waiters:
            fut = self._waiters.popleft()[0]
            if not fut.done():
                fut.set_exception(err)

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.close()


class RespClient:
    """Pipelined calls over ``size`` connections, made on first use and remade after a
    failure. ``kwargs`` are redis-py's connection keywords (from its URL parsing): host,
    port or path, username, password, db, client_name, socket_connect_timeout,
    socket_keepalive (and its options); ``tls`` the context for TLS connections (None:
    plain TCP)."""

    def __init__(
        self,
        kwargs: dict[str, Any],
        *,
        tls: ssl.SSLContext | None = None,
        size: int = 4,
        timeout: float = 5.0,
        idle_limit: float | None = 30.0,
    ) -> None:
        self._kw = kwargs
        self._tls = tls
        self._timeout = timeout
        self._idle_limit = idle_limit
        self._conns: list[_Connection | None] = [None] * size
        self._connecting: list[asyncio.Future[_Connection] | None] = [None] * size
        self._next = 0

    async def _open(self) -> _Connection:
        kw = self._kw
        loop = asyncio.get_running_loop()
        connect_timeout = kw.get("socket_connect_timeout") or self._timeout

        def make() -> _Connection:
            return _Connection(self._timeout)

        try:
            async with asyncio.timeout(connect_timeout):
                if kw.get("path"):
                    _, conn = await loop.create_unix_connection(make, kw["path"])
                else:
                    _, conn = await loop.create_connection(
                        make, kw.get("host", "localhost"), kw.get("port", 6379), ssl=self._tls
                    )
                if kw.get("socket_keepalive") and not kw.get("path"):
                    sock = conn.transport.get_extra_info("socket") if conn.transport else None
                    if sock is not None:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                        for opt, value in (kw.get("socket_keepalive_options") or {}).items():
                            sock.setsockopt(socket.IPPROTO_TCP, opt, value)
                setup: list[list[Any]] = []
                if kw.get("password"):
                    user = kw.get("username")
                    setup.append(["AUTH", *([user] if user else []), kw["password"]])
                if kw.get("db"):
                    setup.append(["SELECT", kw["db"]])
                if kw.get("client_name"):  # as redis-py names its own connections
                    setup.append(["CLIENT", "SETNAME", kw["client_name"]])
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

    def _pick(self) -> tuple[int, _Connection | None]:
        """The next slot in turn and its connection, if that is open and not idle too
        long. A connection that heard nothing from Redis for ``idle_limit`` seconds is
        replaced before use rather than trusted: a firewall or load balancer on the way
        may have dropped it without a word, and a command written into it would wait the
        whole timeout (with every command pipelined behind it) before failing."""
        i = self._next
        self._next = (i + 1) % len(self._conns)
        conn = self._conns[i]
        if conn is None or conn.closed:
            return i, None
        if self._idle_limit is not None and conn.idle_past(self._idle_limit):
            conn.close()
            self._conns[i] = None
            return i, None
        return i, conn

    async def _connection(self, i: int) -> _Connection:
        """Slot ``i``'s connection, made (once, for all who wait) if it is not open."""
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
        i, conn = self._pick()
        if conn is None:
            conn = await self._connection(i)
        return await conn.send(hiredis.pack_command(args))

    async def evalsha(self, sha: str, script: str | bytes, keys: list[str], args: list[Any]) -> Any:
        """Run a script by its SHA; if Redis does not know it (restarted, flushed), send
        the source, which loads it for the next call. (``call`` written out: this is the
        path of every request's scripts.)"""
        i, conn = self._pick()
        if conn is None:
            conn = await self._connection(i)
        try:
            return await conn.send(hiredis.pack_command(("EVALSHA", sha, len(keys), *keys, *args)))
        except NoScriptError:
            return await self.call("EVAL", script, len(keys), *keys, *args)

    def close(self) -> None:
        for conn in self._conns:
            if conn is not None:
                conn.close()
        self._conns = [None] * len(self._conns)
