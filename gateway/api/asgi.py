"""The proxied endpoints speak raw ASGI (inside Litestar's router): measured at half the
CPU per request of a regular Litestar handler, and it gives direct control of streaming
and of client disconnects."""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
from collections.abc import Callable
from typing import Any

from litestar.types import Receive, Send

from ..errors import GatewayError, bad_request, body_too_large
from ..pipeline.context import Header


class ClientDisconnected(asyncio.CancelledError):
    """The client went away before the request body was complete."""


_STREAM_HEADERS: list[Header] = [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]


_UVICORN_HTTPTOOLS = "uvicorn.protocols.http.httptools_impl"
# What write_now() and the response heads written here rely on, checked once per class: a
# uvicorn that changed them gets the ASGI path only (everything through ``await send``),
# not a broken response.
_CYCLE_FIELDS = (
    "transport",
    "flow",
    "chunked_encoding",
    "expected_content_length",
    "response_started",
    "response_complete",
    "waiting_for_100_continue",
    "disconnected",
    "keep_alive",
    "default_headers",
    "access_log",
    "scope",
    "message_event",
)
_usable: dict[type, bool] = {}
# uvicorn's checks of header names and values (it raises on a match): run here once over
# all of a head's names and once over its values instead of twice per header.
_BAD_NAME = re.compile(b'[\x00-\x1f\x7f()<>@,;:\\[\\]={} \t\\\\"]')
_BAD_VALUE = re.compile(b"[\x00-\x08\x0a-\x1f\x7f]")
_status_lines: dict[int, bytes] = {}


def _uvicorn_cycle(send: Send) -> Any:
    """uvicorn's httptools request cycle when ``send`` is its own ``send`` (as under
    ``gateway serve``), else None. A stream's chunks can then be written to its transport
    from a synchronous callback (see ``write_now``)."""
    cycle: Any = getattr(send, "__self__", None)
    kind = type(cycle)
    usable = _usable.get(kind)
    if usable is None:
        usable = _usable[kind] = (
            kind.__module__ == _UVICORN_HTTPTOOLS
            and kind.__name__ == "RequestResponseCycle"
            and all(hasattr(cycle, f) for f in _CYCLE_FIELDS)
            and hasattr(cycle.flow, "write_paused")
            and hasattr(cycle.flow, "resume_reading")
            and isinstance(cycle.message_event, asyncio.Event)
            and isinstance(getattr(sys.modules[kind.__module__], "STATUS_LINE", None), dict)
        )
        if usable:
            _status_lines.update(sys.modules[kind.__module__].STATUS_LINE)
    return cycle if usable else None


class AsgiResponder:
    """Writes a response to the ASGI ``send`` channel."""

    __slots__ = ("_cycle", "_send", "disconnected", "finished", "interruptible", "started")

    def __init__(self, send: Send) -> None:
        self._send = send
        self._cycle = _uvicorn_cycle(send)
        self.disconnected = False
        self.interruptible = False
        self.started = False
        self.finished = False

    def _head(self, status: int, headers: list[Header]) -> list[bytes] | None:
        """The status line and headers as uvicorn's ``send`` writes them for a response
        start, for this request's cycle, or None where ``send`` must do it: another
        server, a response already started, a client pushing back or gone, uvicorn's
        access log on, a HEAD request, or a header ``send`` would refuse (it raises).
        Writing the head here saves its per-header work and the coroutine (callgrind:
        ~3 % of a non-stream request's instructions)."""
        c = self._cycle
        if (
            c is None
            or c.response_started
            or c.disconnected
            or c.flow.write_paused
            or c.access_log
            or c.scope["method"] == "HEAD"
        ):
            return None
        line = _status_lines.get(status)
        all_headers = [*c.default_headers, *headers]
        names = b"".join([n for n, _ in all_headers])
        if (
            line is None
            or _BAD_NAME.search(names)
            or _BAD_VALUE.search(b"\t".join([v for _, v in all_headers]))
        ):
            return None
        lower = names.lower() != names  # uvicorn sends names in lower case
        out = [line]
        for name, value in all_headers:
            out += (name.lower() if lower else name, b": ", value, b"\r\n")
        if not c.keep_alive:
            out.append(b"connection: close\r\n")
        c.response_started = True
        c.waiting_for_100_continue = False
        return out

    def _complete(self) -> None:
        """What uvicorn's ``send`` does once a response's last byte is written."""
        c = self._cycle
        c.response_complete = True
        c.message_event.set()
        if not c.keep_alive:
            c.transport.close()

    async def send_json(self, status: int, headers: list[Header], body: bytes) -> None:
        self.started = True
        self.finished = True
        head = self._head(status, [*headers, (b"content-length", b"%d" % len(body))])
        if head is not None:  # head and body in one write
            c = self._cycle
            c.chunked_encoding, c.expected_content_length = False, 0
            head += (b"\r\n", body)
            c.transport.write(b"".join(head))
            self._complete()
            return
        await self._send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [*headers, (b"content-length", str(len(body)).encode())],
            }
        )
        await self._send({"type": "http.response.body", "body": body, "more_body": False})

    async def start_stream(self, status: int, headers: list[Header]) -> None:
        self.started = True
        head = self._head(status, [*headers, *_STREAM_HEADERS])
        if head is not None:
            self._cycle.chunked_encoding = True
            head.append(b"transfer-encoding: chunked\r\n\r\n")
            self._cycle.transport.write(b"".join(head))
            return
        await self._send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [*headers, *_STREAM_HEADERS],
            }
        )

    async def send_chunk(self, data: bytes) -> None:
        await self._send({"type": "http.response.body", "body": data, "more_body": True})

    def can_write_now(self) -> bool:
        c = self._cycle
        return (
            c is not None
            and self.started
            and not self.finished
            and c.chunked_encoding is True
            and not c.response_complete
            and not c.disconnected
            and not c.flow.write_paused
        )

    def write_now(self, data: bytes) -> bool:
        # What uvicorn's send() does for a chunk of a chunked response, minus the
        # coroutine: the relay calls this from the upstream connection's callback, once
        # can_write_now() said yes; only these two can change while a stream is written.
        c = self._cycle
        if c.disconnected:
            return False
        c.transport.write(b"%x\r\n%b\r\n" % (len(data), data))
        return not c.flow.write_paused

    async def end_stream(self, last: bytes = b"") -> None:
        if self.can_write_now():  # the last chunk and the chunked body's end, as send() would
            self.finished = True
            self._cycle.transport.write(
                b"%x\r\n%b\r\n0\r\n\r\n" % (len(last), last) if last else b"0\r\n\r\n"
            )
            self._complete()
            return
        self.finished = True
        await self._send({"type": "http.response.body", "body": last, "more_body": False})


async def read_body(receive: Receive, headers: dict[bytes, bytes], limit: int) -> bytes:
    """The whole request body, refusing more than ``limit`` bytes (413)."""
    declared = headers.get(b"content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise body_too_large(limit)
        except ValueError:
            raise bad_request("Invalid Content-Length header.") from None
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected("client disconnected while sending the body")
        body: bytes = message.get("body", b"")  # type: ignore[assignment]
        if body:
            size += len(body)
            if size > limit:
                raise body_too_large(limit)
            chunks.append(body)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def watch_disconnect(receive: Receive, out: AsgiResponder, task: asyncio.Task[Any]) -> Watch:
    """Cancels ``task`` if the client goes away before the response is complete, so the
    upstream call is cancelled too and the request settles what it consumed. Under
    uvicorn's httptools server (``gateway serve``) the connection itself tells
    (:class:`CycleWatch`); under another server a task waits on ``receive``."""
    if out._cycle is not None:
        return CycleWatch(out, task)
    return DisconnectWatch(receive, out, task)


class Watch:
    __slots__ = ()

    def stop(self) -> None:
        """The request is over: stop watching (and let go of it)."""


def _client_left(out: AsgiResponder, task: asyncio.Task[Any]) -> None:
    out.disconnected = True
    if out.interruptible:  # else the next wait notices (see interruptible)
        task.cancel()


class _CallingEvent(asyncio.Event):
    """uvicorn's event of one request, set when body data comes, when the response is
    complete and when the connection is lost, which also calls ``on_set``."""

    def __init__(self, was_set: bool, on_set: Callable[[], None] | None) -> None:
        super().__init__()
        if was_set:
            super().set()
        self.on_set = on_set

    def set(self) -> None:
        super().set()
        if self.on_set is not None:
            self.on_set()


class CycleWatch(Watch):
    """Watches a request's uvicorn connection without a task: its per-request event is
    swapped for one that calls back when set, and uvicorn sets it (``disconnected``
    first) when the connection is lost. Nothing runs until then, so every request is
    watched from its start, where the task below starts late to spare the fast ones:
    measured at 500 concurrent slow streams, that task and its timer cost ~2.4 % of the
    gateway's CPU."""

    __slots__ = ("_event", "_out", "_task")

    def __init__(self, out: AsgiResponder, task: asyncio.Task[Any]) -> None:
        c = out._cycle
        self._out: AsgiResponder | None = out
        self._task: asyncio.Task[Any] | None = task
        # Read fully by now, nothing else waits on the event.
        self._event = c.message_event = _CallingEvent(c.message_event.is_set(), self._check)
        # As uvicorn's receive() does before it waits: only a connection being read shows
        # that it closed.
        c.flow.resume_reading()
        self._check()  # a client that left already

    def _check(self) -> None:
        out, task = self._out, self._task
        if out is None or task is None or out.finished or out.disconnected:
            return
        if out._cycle.disconnected:
            _client_left(out, task)

    def stop(self) -> None:
        # The event outlives the request (uvicorn's cycle holds it): it lets go of the
        # request, and no reference cycle is left for the garbage collector.
        self._event.on_set = None
        self._out = self._task = None


# Watching for a disconnect through ``receive`` takes a task of its own per request; it
# starts only once a request has run this long, so the many fast ones never pay for it. A
# client that left earlier is noticed as soon as watching starts (the server remembers
# the disconnect).
WATCH_AFTER_SECONDS = 0.25


class DisconnectWatch(Watch):
    """A task that waits on ``receive`` (see watch_disconnect), started after
    ``WATCH_AFTER_SECONDS``."""

    __slots__ = ("_out", "_receive", "_task", "_timer", "_watcher")

    def __init__(self, receive: Receive, out: AsgiResponder, task: asyncio.Task[Any]) -> None:
        self._receive = receive
        self._out = out
        self._task = task
        self._watcher: asyncio.Task[None] | None = None
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(WATCH_AFTER_SECONDS, self._start)

    def _start(self) -> None:
        if not self._out.finished:
            self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        message = await self._receive()
        if message["type"] == "http.disconnect" and not self._out.finished:
            _client_left(self._out, self._task)

    def stop(self) -> None:
        self._timer.cancel()
        w = self._watcher
        # Once the response is complete, uvicorn's receive() returns at once (it reports
        # a disconnect) and the watcher ends by itself, seeing the response finished.
        # Cancelling it instead would leave a CancelledError, its traceback and the
        # task's frames in a reference cycle for the garbage collector: measured at 500
        # concurrent slow streams, that garbage grew RSS by ~50 MB and made a collection
        # stop the event loop for up to 0.4 s.
        if w is not None and not w.done() and not self._out.finished:
            w.cancel()


async def send_error(send: Send, exc: GatewayError, extra: list[Header] | None = None) -> None:
    out = AsgiResponder(send)
    headers: list[Header] = [(b"content-type", b"application/json"), *(extra or [])]
    headers.extend((k.encode(), v.encode()) for k, v in exc.headers.items())
    with contextlib.suppress(OSError):
        await out.send_json(exc.status, headers, exc.to_bytes())
