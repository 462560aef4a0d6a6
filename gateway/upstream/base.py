"""The one interface every way of reaching a model implements.

A provider is called with the request body the gateway has already rewritten (concrete
upstream model, gateway-owned fields set) as bytes. Non-2xx answers and transport
failures are raised as :class:`~gateway.upstream.errors.UpstreamError`; a stream is
returned open, after its status was checked, and read chunk by chunk."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(slots=True)
class JsonResponse:
    body: bytes
    # Seconds spent waiting on the upstream (connect + response), for the overhead metric.
    upstream_seconds: float


class ChunkSink(Protocol):
    """Takes a stream's bytes synchronously, inside the connection's own callback. Once
    it sets ``stopped`` (and returns False), the rest waits for ``read``."""

    stopped: bool

    def __call__(self, data: bytes) -> bool: ...


class ByteStream(Protocol):
    """An open upstream stream. ``read`` returns the next bytes as they arrive (any
    split), ``b""`` at the end; it raises UpstreamTimeout when the upstream goes idle.

    ``push`` hands the bytes to ``sink`` as they arrive instead, from the connection's
    callback (no task wake-up per chunk), until the body ends or fails or the sink stops;
    then ``read`` returns what is left (``b""`` at the end) or raises the failure. It
    raises UpstreamTimeout like ``read``; it returns False, doing nothing, where the
    stream cannot push."""

    async def read(self) -> bytes: ...

    async def push(self, sink: ChunkSink) -> bool: ...

    async def aclose(self) -> None: ...


class Upstream(Protocol):
    name: str

    async def post_json(self, path: str, body: bytes, model: str) -> JsonResponse: ...

    async def open_stream(self, path: str, body: bytes, model: str) -> ByteStream: ...

    async def aclose(self) -> None: ...
