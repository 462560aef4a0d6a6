"""The order of the stages, written down once.

    authenticate -> parse -> route -> idempotency -> cache lookup
      -> admit (rate limits + budget reserve) -> forward (retries, fallbacks)
      -> settle -> record

A replayed idempotent response or a cache hit skips ``forward`` but is still admitted
(rate limits count it; it reserves only what a hit may be charged) and settled, so every
request that reached a tenant has exactly one ledger row. A cache miss is admitted in
its lookup's call to the state (one Redis round trip for both); ``admit`` then has
nothing left to do. Whatever happens (an error, a client that disconnects, a cancelled
task), ``finish`` settles and records, shielded from cancellation."""

from __future__ import annotations

import asyncio
import logging

from ..errors import GatewayError, internal
from . import cache, idempotency
from .admit import admit
from .authenticate import authenticate
from .context import RequestContext, Responder
from .forward import forward
from .headers import JSON, gateway_headers
from .parse import parse
from .record import record
from .route import route
from .settle import settle

log = logging.getLogger("gateway.pipeline")


async def _stages(ctx: RequestContext, out: Responder) -> None:
    authenticate(ctx)
    await parse(ctx)
    await route(ctx)
    stored = await idempotency.begin(ctx)
    if stored is None:
        stored = await cache.lookup(ctx)
    if stored is not None:
        await admit(ctx, amount=ctx.hit_charge or 0, tokens=0)
        await stored.serve(ctx, out)
        return
    await admit(ctx)
    await forward(ctx, idempotency.wrap(ctx, out))


async def handle(ctx: RequestContext, out: Responder) -> None:
    """Run one request to the end; never raises except to propagate cancellation."""
    ctx.out = out
    try:
        await _run(ctx, out)
    finally:
        _drop_traceback(ctx.error)


async def _run(ctx: RequestContext, out: Responder) -> None:
    try:
        await _stages(ctx, out)
    except GatewayError as exc:
        ctx.error = exc
        await _send_error(ctx, out, exc)
    except asyncio.CancelledError:
        ctx.client_gone = True
        await _shielded(ctx)
        raise
    except Exception:
        log.exception("request %s failed unexpectedly", ctx.request_id)
        ctx.error = internal(ctx.request_id)
        ctx.runtime.metrics.internal_error()
        await _send_error(ctx, out, ctx.error)
    if out.finished:
        # The response is out: nothing cancels the request now (the disconnect watcher
        # stands down once the last byte is sent), so no shield is needed.
        await finish(ctx)
    else:
        await _shielded(ctx)


def _drop_traceback(exc: BaseException | None) -> None:
    """A failed request's error stays on its context (for the ledger row, the access
    line and the metrics), and a raised error holds its traceback, whose frames hold the
    context: a reference cycle per failed request, which reference counting cannot free.
    With the collector tuned for a server that makes no cycles (``gctune``), a storm of
    refused requests grew RSS by ~6 MB per 100,000 until a full collection ran. The
    traceback has been used by then (an unexpected error is logged where it is caught),
    so it is dropped, with those of the errors it was raised from."""
    for _ in range(8):
        if exc is None:
            return
        exc.__traceback__ = None
        exc = exc.__cause__ or exc.__context__


async def _send_error(ctx: RequestContext, out: Responder, exc: GatewayError) -> None:
    ctx.status = exc.status
    if ctx.first_byte_sent or ctx.completed:
        return  # a stream that started carries its error as its last event
    headers = (
        [JSON, *gateway_headers(ctx, cost=True)]
        if ctx.tenant
        else [JSON, (b"x-gateway-request-id", ctx.request_id.encode())]
    )
    headers.extend((k.encode(), v.encode()) for k, v in exc.headers.items())
    await out.send_json(exc.status, headers, exc.to_bytes())


async def _shielded(ctx: RequestContext) -> None:
    """Run ``finish`` to completion even if this task is cancelled meanwhile."""
    task = ctx.runtime.track(finish(ctx))
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        ctx.client_gone = True
        raise


async def finish(ctx: RequestContext) -> None:
    if ctx.finished:
        return
    ctx.finished = True
    try:
        await settle(ctx)
    except GatewayError as exc:
        ctx.error = ctx.error or exc
    except Exception:
        log.exception("settling request %s failed", ctx.request_id)
    try:
        await idempotency.finish(ctx)
        await cache.finish(ctx)
    except Exception:
        log.exception("storing request %s for replay failed", ctx.request_id)
    await record(ctx)
