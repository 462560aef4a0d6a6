"""Stage 4, idempotency: ``Idempotency-Key`` (after the IETF httpapi draft and Stripe).

Scoped to the tenant. The first request with a key runs; a completed key replays the
stored response (status, body, a stream as a stream) with ``idempotent-replayed: true``,
no upstream call and no charge; a duplicate that arrives while the first is in flight
waits for it (bounded, then 409); the same key with another body gets 422; a first
attempt that fails releases the key, so a retry really retries."""

from __future__ import annotations

import asyncio
import hashlib
import time

import orjson

from ..errors import bad_request, idempotency_conflict, idempotency_mismatch, state_unavailable
from ..state.base import StateUnavailable
from .context import RequestContext, Responder, interruptible
from .stored import Stored, Tee

MAX_KEY_LENGTH = 255


def _fingerprint(ctx: RequestContext) -> str:
    canonical = orjson.dumps(ctx.body, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(ctx.endpoint.encode() + b"\0" + canonical).hexdigest()


async def begin(ctx: RequestContext) -> Stored | None:
    raw = ctx.headers.get(b"idempotency-key")
    if raw is None:
        return None
    key = raw.decode("utf-8", "replace").strip()
    if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable():
        raise bad_request(
            f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} printable characters.",
            code="invalid_idempotency_key",
        )
    rt = ctx.runtime
    tenant = ctx.tenant
    assert tenant is not None
    ctx.idem_key = key
    ctx.idem_fingerprint = fp = _fingerprint(ctx)
    deadline = time.monotonic() + rt.config.gateway.idempotency.wait_seconds
    delay = 0.01
    while True:
        try:
            r = await rt.state.idem_begin(tenant.name, key, fp, rt.lease_ms)
        except StateUnavailable as exc:
            raise state_unavailable(str(exc)) from None
        if r.state == "new":
            ctx.idem_claimed = True
            return None
        if r.state == "mismatch":
            raise idempotency_mismatch(key)
        if r.state == "done":
            assert r.record is not None
            ctx.replayed = True
            return Stored.decode(r.record)
        if time.monotonic() >= deadline:
            raise idempotency_conflict(
                f"A request with Idempotency-Key {key!r} is still in progress. Retry once it "
                "has completed to get its response."
            )
        assert ctx.out is not None
        await interruptible(ctx.out, asyncio.sleep(delay))
        delay = min(delay * 2, 0.25)


def wrap(ctx: RequestContext, out: Responder) -> Responder:
    if not ctx.idem_claimed:
        return out
    ctx.idem_tee = Tee(out)
    return ctx.idem_tee  # type: ignore[no-any-return]


async def finish(ctx: RequestContext) -> None:
    if not ctx.idem_claimed or ctx.idem_key is None:
        return
    rt = ctx.runtime
    tenant = ctx.tenant
    assert tenant is not None
    tee: Tee | None = ctx.idem_tee
    if tee is None or not ctx.completed or ctx.error is not None or tee.status != 200:
        await rt.state.idem_abandon(tenant.name, ctx.idem_key)
        return
    model = ctx.model
    stored = Stored(
        kind="replay",
        model=model.name if model else "",
        provider=model.provider if model else "",
        route=ctx.route.reason if ctx.route else "",
        body=tee.body(),
        stream=tee.stream,
    )
    ttl_ms = rt.config.gateway.idempotency.ttl_seconds * 1000
    await rt.state.idem_finish(
        tenant.name, ctx.idem_key, ctx.idem_fingerprint, stored.encode(), ttl_ms
    )
