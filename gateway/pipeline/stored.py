"""Responses kept for later: recorded as they are sent, served again on a replay or a
cache hit. A stored response is served like a fresh one: settled first (its ledger row
committed), then sent, as JSON or as a stream, whichever the request asked for."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from ..sse import DONE_EVENT, data_event
from .assemble import to_chunks
from .context import Header, RequestContext, Responder
from .headers import JSON, SSE, gateway_headers, usage_extension
from .settle import settle


class Tee:
    """A Responder that passes everything through and keeps a copy."""

    def __init__(self, inner: Responder) -> None:
        self.inner = inner
        self.status = 0
        self.stream = False
        self.parts: list[bytes] = []

    @property
    def disconnected(self) -> bool:
        return self.inner.disconnected

    @property
    def finished(self) -> bool:
        return self.inner.finished

    @property
    def interruptible(self) -> bool:
        return self.inner.interruptible

    @interruptible.setter
    def interruptible(self, value: bool) -> None:
        self.inner.interruptible = value

    async def send_json(self, status: int, headers: list[Header], body: bytes) -> None:
        self.status = status
        self.parts = [body]
        await self.inner.send_json(status, headers, body)

    async def start_stream(self, status: int, headers: list[Header]) -> None:
        self.status = status
        self.stream = True
        await self.inner.start_stream(status, headers)

    async def send_chunk(self, data: bytes) -> None:
        self.parts.append(data)
        await self.inner.send_chunk(data)

    def can_write_now(self) -> bool:
        return self.inner.can_write_now()

    def write_now(self, data: bytes) -> bool:
        self.parts.append(data)
        return self.inner.write_now(data)

    async def end_stream(self, last: bytes = b"") -> None:
        if last:
            self.parts.append(last)
        await self.inner.end_stream(last)

    def body(self) -> bytes:
        return b"".join(self.parts)


@dataclass(slots=True)
class Stored:
    """A response to serve without calling upstream."""

    kind: str  # "replay": exactly the bytes sent before; "cache": an assembled answer
    model: str
    provider: str
    route: str
    body: bytes  # JSON body, or (replay of a stream) the SSE bytes as sent
    stream: bool = False  # replay only: the stored body is SSE
    usage: dict[str, Any] = field(default_factory=dict)

    def encode(self) -> bytes:
        return orjson.dumps(
            {
                "k": self.kind,
                "m": self.model,
                "p": self.provider,
                "r": self.route,
                "s": self.stream,
                "u": self.usage,
                "b": self.body.decode("utf-8"),
            }
        )

    @classmethod
    def decode(cls, raw: bytes) -> Stored:
        d = orjson.loads(raw)
        return cls(
            kind=d["k"],
            model=d["m"],
            provider=d["p"],
            route=d["r"],
            body=d["b"].encode(),
            stream=d["s"],
            usage=d["u"],
        )

    async def serve(self, ctx: RequestContext, out: Responder) -> None:
        rt = ctx.runtime
        model = rt.catalog.models.get(self.model)
        if model is not None:
            ctx.model = model
        await settle(ctx)
        headers = gateway_headers(ctx, cost=True)
        if ctx.model is None or ctx.model.name != self.model:
            headers = [
                h for h in headers if h[0] not in (b"x-gateway-model", b"x-gateway-provider")
            ]
            headers += [
                (b"x-gateway-model", self.model.encode()),
                (b"x-gateway-provider", self.provider.encode()),
            ]
        if self.kind == "replay":
            await self._replay(out, headers)
        elif ctx.stream:
            await self._as_stream(ctx, out, headers)
        else:
            await out.send_json(200, [JSON, *headers], self.body)
        ctx.completed = True

    async def _replay(self, out: Responder, headers: list[Header]) -> None:
        if not self.stream:
            await out.send_json(200, [JSON, *headers], self.body)
            return
        # The stored events exactly as they were sent, in one write: they are all here.
        await out.start_stream(200, [SSE, *headers])
        await out.end_stream(self.body)

    async def _as_stream(self, ctx: RequestContext, out: Responder, headers: list[Header]) -> None:
        completion = orjson.loads(self.body)
        events = [data_event(orjson.dumps(chunk)) for chunk in to_chunks(completion)]
        if ctx.include_usage:
            usage_chunk = {
                "id": completion.get("id", ""),
                "object": "chat.completion.chunk",
                "created": completion.get("created", 0),
                "model": completion.get("model", ""),
                "choices": [],
                "usage": completion.get("usage"),
                "x_gateway": usage_extension(ctx),
            }
            events.append(data_event(orjson.dumps(usage_chunk)))
        events.append(DONE_EVENT)
        await out.start_stream(200, [SSE, *headers])
        await out.end_stream(b"".join(events))
