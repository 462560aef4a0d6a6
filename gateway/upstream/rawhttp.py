"""A small HTTP/1.1 client for upstream calls: an asyncio protocol with httptools'
response parser and a LIFO pool of keep-alive connections (TLS when the URL is https).

It does only what an OpenAI-compatible upstream needs: a POST with a body, a response
read whole or as it arrives (Content-Length or chunked) or pushed to a callback as it
arrives (``Response.push``), keep-alive, backpressure (reading pauses while a slow
client leaves 256 KiB unread), and an HTTP proxy (CONNECT tunnels, TLS inside them).
Measured on the benchmark, it costs a fraction of aiohttp's ClientSession per request;
:mod:`.http` translates its errors."""

from __future__ import annotations

import asyncio
import base64
import ssl
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import httptools

if TYPE_CHECKING:
    from .base import ChunkSink

_HIGH_WATER = 256 * 1024


class ConnectionClosed(Exception):
    """The connection closed before the response was complete."""


class BadResponse(Exception):
    """The upstream's bytes are not a valid HTTP response."""


class Response:
    """One response: status and headers at once, the body as it arrives."""

    __slots__ = (
        "_buf",
        "_conn",
        "_deadline",
        "_eof",
        "_error",
        "_head",
        "_held",
        "_idle",
        "_keep_alive",
        "_loop",
        "_sink",
        "_size",
        "_timer",
        "_until_close",
        "_waiter",
        "headers",
        "status",
    )

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._loop = asyncio.get_running_loop()
        self._head: asyncio.Future[None] = self._loop.create_future()
        self._buf: list[bytes] = []
        self._size = 0
        self._eof = False
        self._keep_alive = False
        self._error: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None
        # One timer per response, re-armed only when it fires early: a stream's reads
        # just move the deadline (a float), instead of a timer each.
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        # A body with neither Content-Length nor chunked encoding ends when the
        # connection closes (HTTP/1.1, RFC 9112 section 6.3).
        self._until_close = False
        # While push() runs: where the body goes, and the idle timeout each chunk renews;
        # the body pieces of one read, held for one call of the sink (see _deliver).
        self._sink: ChunkSink | None = None
        self._idle: float | None = None
        self._held: list[bytes] = []
        self.status = 0
        self.headers: dict[str, str] = {}

    # -- fed by the connection -----------------------------------------------------------
    def _feed(self, data: bytes) -> None:
        sink = self._sink
        if sink is not None and not sink.stopped and not self._buf:
            self._held.append(data)
            return
        self._buf.append(data)
        self._size += len(data)
        if self._size > _HIGH_WATER:
            self._conn.pause()
        self._wake()

    def _deliver(self) -> None:
        """Hand the sink what one read brought, in one call, once the read is parsed.

        A read can hold several chunks of the body (they queue up in the socket while
        the loop is busy); httptools reports each on its own, and the sink would write
        each to the client in a system call of its own."""
        held = self._held
        if not held:
            return
        data = held[0] if len(held) == 1 else b"".join(held)
        held.clear()
        # _feed held these for a sink taking data; only that sink's own call stops it,
        # and only push() (in the request's task, not in this callback) removes it.
        sink = self._sink
        assert sink is not None
        if self._idle is not None:
            self._deadline = self._loop.time() + self._idle
        if not sink(data):  # it stopped: push() returns
            self._wake()

    def _finish(self, keep_alive: bool) -> None:
        self._eof = True
        self._keep_alive = keep_alive
        self._wake()

    def _fail(self, exc: Exception) -> None:
        if self._eof:
            return
        self._error = exc
        if not self._head.done():
            self._head.set_exception(exc)
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    # -- read by the caller --------------------------------------------------------------
    async def readany(self, timeout: float | None = None) -> bytes:
        """The bytes that arrived since the last call (waiting for some, at most
        ``timeout`` seconds, else TimeoutError); b"" at the end. Bytes already here are
        returned without arming a timer."""
        while not self._buf:
            if self._eof:
                return b""
            await self._wait(timeout)
        return self._take()

    async def push(self, sink: ChunkSink, timeout: float | None = None) -> None:
        """Hand the body to ``sink`` as it arrives, from the connection's callback,
        until it ends or fails or ``sink.stopped``; later bytes wait for readany(). Raises
        TimeoutError when nothing arrives for ``timeout`` seconds, and the connection's
        failure."""
        if self._buf:
            sink(self._take())
        self._sink, self._idle = sink, timeout
        try:
            while not (self._eof or sink.stopped):
                await self._wait(timeout)
        finally:
            self._sink = self._idle = None

    async def _wait(self, timeout: float | None) -> None:
        """Until the connection feeds, ends, fails or stops a sink; TimeoutError after
        ``timeout`` seconds without any of these (one timer per response, see __init__)."""
        if self._error is not None:
            raise self._error
        waiter = self._waiter = self._loop.create_future()
        if timeout is not None:
            self._deadline = self._loop.time() + timeout
            if self._timer is None:
                self._timer = self._loop.call_at(self._deadline, self._check_deadline)
        try:
            await waiter
        finally:
            self._waiter = None

    def _take(self) -> bytes:
        data = self._buf[0] if len(self._buf) == 1 else b"".join(self._buf)
        self._buf.clear()
        if self._size > _HIGH_WATER:
            self._conn.resume()
        self._size = 0
        return data

    def _check_deadline(self) -> None:
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return  # not waiting now; the next wait arms a timer again
        if self._loop.time() >= self._deadline:
            waiter.set_exception(TimeoutError())
        else:
            self._timer = self._loop.call_at(self._deadline, self._check_deadline)

    async def read(self) -> bytes:
        """The whole body."""
        parts: list[bytes] = []
        while True:
            data = await self.readany()
            if not data:
                return b"".join(parts)
            parts.append(data)

    def release(self) -> None:
        """Done with the response: the connection goes back to the pool if it is reusable."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._conn.done(self._eof and self._keep_alive and self._error is None)

    close = release  # an incomplete response closes its connection either way


class Connection(asyncio.Protocol):
    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self.transport: Any = None
        self._parser = httptools.HttpResponseParser(self)
        self.response: Response | None = None
        self.closed = False
        self.idle_since = 0.0
        self._paused = False
        # Done once the transport is gone (connection_lost): a TLS connection's close takes
        # a few passes of the loop (close_notify), which Pool.aclose waits for.
        self.gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # -- asyncio.Protocol ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.gone.done():
            self.gone.set_result(None)
        if self.transport is None:
            return  # never connected (TLS in a proxy's tunnel failed): acquire() counts it
        r = self.response
        if r is not None:
            if r._until_close and r._head.done() and exc is None:
                r._finish(False)
            else:
                r._fail(ConnectionClosed(str(exc) if exc else "closed by the upstream"))
        self._pool.lost(self)

    def data_received(self, data: bytes) -> None:
        r = self.response
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if r is not None:
                r._deliver()
                r._fail(BadResponse(str(exc)))
            self.transport.close()
        else:
            if r is not None:
                r._deliver()

    # -- httptools callbacks -------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        if self.response is not None:
            self.response.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        r = self.response
        if r is not None:
            r.status = self._parser.get_status_code()
            h = r.headers
            r._until_close = (
                "content-length" not in h
                and "chunked" not in h.get("transfer-encoding", "").lower()
                and r.status not in (204, 304)
                and not 100 <= r.status < 200
            )
            if not r._head.done():
                r._head.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self.response is not None:
            self.response._feed(body)

    def on_message_complete(self) -> None:
        if self.response is not None:
            self.response._finish(self._parser.should_keep_alive())

    # -- used by the pool and the response -----------------------------------------------
    def send(self, data: bytes) -> Response:
        self.response = Response(self)
        self.transport.write(data)
        return self.response

    def pause(self) -> None:
        if not self._paused and not self.closed:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and not self.closed:
            self._paused = False
            self.transport.resume_reading()

    def done(self, reusable: bool) -> None:
        if self.response is None:
            return
        self.response = None
        if reusable and not self.closed:
            self._pool.release(self)
        else:
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.close()


@dataclass(frozen=True, slots=True)
class Proxy:
    """An HTTP proxy that upstream connections go through, as CONNECT tunnels."""

    host: str
    port: int
    authorization: bytes | None = None  # the Proxy-Authorization value (Basic), if any

    def __str__(self) -> str:  # never the credentials
        return f"{self.host}:{self.port}"


def parse_proxy(url: str) -> Proxy:
    """``http://[user:password@]host:port`` (port 80 if left out); ValueError, without
    the credentials, for anything else (an https:// proxy, TLS to the proxy itself, is
    not supported)."""
    u = urlsplit(url)
    if u.scheme != "http":
        raise ValueError(
            f"a proxy must be http://[user:password@]host:port, not {u.scheme or 'no'} scheme"
            " (the tunnel to an https upstream is TLS; the connection to the proxy is not)"
        )
    try:
        port = u.port or 80
    except ValueError:
        raise ValueError("the proxy's port is not a number") from None
    if not u.hostname or u.path not in ("", "/") or u.query:
        raise ValueError("a proxy must be http://[user:password@]host:port, nothing more")
    auth = None
    if u.username is not None:
        pair = f"{unquote(u.username)}:{unquote(u.password or '')}"
        auth = b"Basic " + base64.b64encode(pair.encode())
    return Proxy(u.hostname, port, auth)


class ProxyRefused(OSError):
    """The proxy would not open the tunnel (its status line says why)."""


class ConnectTimeout(OSError):
    """No connection (or tunnel) within the connect timeout."""


class _Tunnel(asyncio.Protocol):
    """The connection to the proxy until its answer to CONNECT: reads that answer's head."""

    def __init__(self) -> None:
        self.transport: Any = None
        self._head = b""
        self.answered: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self._head += data
        if b"\r\n\r\n" in self._head and not self.answered.done():
            head, _, rest = self._head.partition(b"\r\n\r\n")
            if rest:  # nothing may come before the client's first TLS/HTTP bytes
                self.answered.set_exception(ProxyRefused(None, "the proxy sent data early"))
            else:
                self.answered.set_result(head)
        elif len(self._head) > 65536 and not self.answered.done():
            self.answered.set_exception(ProxyRefused(None, "the proxy's answer has no end"))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.answered.done():
            why = f"the proxy closed the connection ({exc})" if exc else "the proxy closed it"
            self.answered.set_exception(ProxyRefused(None, why))


async def _through_proxy(
    proxy: Proxy, host: str, port: int, tls: ssl.SSLContext | None, conn: Connection
) -> None:
    """Connect ``conn`` to host:port through a CONNECT tunnel at ``proxy``, with TLS inside
    the tunnel when ``tls`` is given."""
    loop = asyncio.get_running_loop()
    transport, tunnel = await loop.create_connection(_Tunnel, proxy.host, proxy.port)
    try:
        name = f"[{host}]".encode() if ":" in host else host.encode("idna")  # IPv6 in brackets
        target = b"%b:%d" % (name, port)
        request = b"CONNECT %b HTTP/1.1\r\nHost: %b\r\n" % (target, target)
        if proxy.authorization is not None:
            request += b"Proxy-Authorization: %b\r\n" % proxy.authorization
        transport.write(request + b"\r\n")
        head = await tunnel.answered
        status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].startswith("2"):
            raise ProxyRefused(None, f"proxy {proxy} answered {status_line!r} to CONNECT")
        if tls is not None:
            inner = await loop.start_tls(transport, conn, tls, server_hostname=host)
            if inner is None:  # only for a transport that was closing
                raise ProxyRefused(None, f"the tunnel through proxy {proxy} closed")
            transport = inner
        else:
            transport.set_protocol(conn)
    except BaseException:
        transport.close()
        raise
    conn.connection_made(transport)


class Pool:
    """Keep-alive connections to one host:port, at most ``limit`` open at a time; through
    ``proxy`` (CONNECT tunnels) if one is given."""

    def __init__(
        self,
        host: str,
        port: int,
        tls: ssl.SSLContext | None,
        limit: int,
        idle_seconds: float,
        proxy: Proxy | None = None,
    ) -> None:
        self.host, self.port, self.tls = host, port, tls
        self.proxy = proxy
        self.limit = limit
        self.idle_seconds = idle_seconds
        self._idle: list[Connection] = []
        self._open = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self, connect_timeout: float) -> tuple[Connection, bool]:
        """A connection, and whether it was reused (a reused one may turn out stale)."""
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and now - conn.idle_since < self.idle_seconds:
                return conn, True
            conn.close()
        while self._open >= self.limit:
            w = asyncio.get_running_loop().create_future()
            self._waiters.append(w)
            await w
            if self._idle:
                return self._idle.pop(), True
        self._open += 1
        try:
            async with asyncio.timeout(connect_timeout):
                if self.proxy is not None:
                    conn = Connection(self)
                    await _through_proxy(self.proxy, self.host, self.port, self.tls, conn)
                else:
                    _, conn = await asyncio.get_running_loop().create_connection(
                        lambda: Connection(self),
                        self.host,
                        self.port,
                        ssl=self.tls,
                        server_hostname=self.host if self.tls else None,
                    )
        except TimeoutError:  # this timeout's own (an outer one's arrives as cancellation)
            self._open -= 1
            self._wake_one()
            raise ConnectTimeout(None, f"no connection within {connect_timeout:g} s") from None
        except BaseException:
            self._open -= 1
            self._wake_one()
            raise
        return conn, False

    def release(self, conn: Connection) -> None:
        conn.idle_since = time.monotonic()
        self._idle.append(conn)
        self._wake_one()

    def lost(self, conn: Connection) -> None:
        self._open -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_result(None)
                return

    def close(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()

    async def aclose(self, timeout: float = 2.0) -> None:
        """Close the idle connections and wait, up to ``timeout``, until they are gone. At
        shutdown the event loop closes next: a TLS connection still closing then fails
        with "Event loop is closed" and leaves its socket to the garbage collector."""
        closing = [conn.gone for conn in self._idle if not conn.gone.done()]
        self.close()
        if closing:
            await asyncio.wait(closing, timeout=timeout)


async def post(pool: Pool, head: bytes, body: bytes, connect_timeout: float) -> Response:
    """Send ``head`` (request line and headers, without Content-Length and the blank
    line) with ``body``; return once the response's status and headers arrived. A reused
    connection that turns out closed is retried once on a new one."""
    data = head + b"content-length: %d\r\n\r\n" % len(body) + body
    for attempt in (0, 1):
        conn, reused = await pool.acquire(connect_timeout)
        response = conn.send(data)
        try:
            await response._head
        except ConnectionClosed:
            conn.done(False)
            if reused and attempt == 0:
                continue
            raise
        except BaseException:
            conn.done(False)
            raise
        return response
    raise AssertionError("unreachable")
