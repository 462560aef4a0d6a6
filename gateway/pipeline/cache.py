"""Stage 5, cache lookup (and, in ``finish``, the store).

Exact match on a hash of the canonical request: the resolved concrete model and every
field that changes the output (not ``stream``, ``stream_options``, ``user``,
``metadata``), scoped to the tenant unless its policy shares entries. Mode
``deterministic`` (the default) caches embeddings and chat requests with
``temperature: 0`` only; ``always`` caches everything; ``off`` nothing.
``Cache-Control: no-cache`` skips the read, ``no-store`` the write. Answers are stored
assembled, so a stream can answer a non-stream request and the other way round.

Concurrent identical misses make one upstream call (single-flight): the first becomes
the leader, the others wait for its answer (woken at once in the same process, polling
across processes) and are served it as a hit. The leader is admitted (stage 6) in the
lookup's own call to the state: with Redis, one round trip instead of two on the way to
the upstream."""

from __future__ import annotations

import hashlib
import time
from decimal import ROUND_FLOOR, Decimal

import orjson

from ..errors import GatewayError, state_unavailable
from ..state.base import Admission, StateUnavailable
from .admit import admission_for, admitted, output_cap
from .context import RequestContext, interruptible
from .stored import Stored

# The scope of entries tenants share: no tenant name starts with '*', so a tenant named
# "shared" keeps its entries to itself.
SHARED = "*shared"
EXCLUDED = frozenset({"stream", "stream_options", "user", "metadata", "model"})


def cacheable(ctx: RequestContext) -> bool:
    assert ctx.tenant is not None
    mode = ctx.tenant.cache.mode
    if mode == "off":
        return False
    if mode == "always" or ctx.endpoint == "embeddings":
        return True
    t = ctx.body.get("temperature")
    return isinstance(t, int | float) and not isinstance(t, bool) and t == 0


def cache_key(ctx: RequestContext) -> str:
    assert ctx.tenant is not None and ctx.model is not None
    material = {
        "e": ctx.endpoint,
        "m": ctx.model.name,
        "cap": output_cap(ctx, ctx.model),
        "b": {k: v for k, v in ctx.body.items() if k not in EXCLUDED},
    }
    digest = hashlib.sha256(orjson.dumps(material, option=orjson.OPT_SORT_KEYS)).hexdigest()
    scope = SHARED if ctx.tenant.cache.shared else ctx.tenant.name
    return f"{scope}:{digest}"


async def lookup(ctx: RequestContext) -> Stored | None:
    tenant = ctx.tenant
    assert tenant is not None
    if not cacheable(ctx):
        ctx.cache_status = "off" if tenant.cache.mode == "off" else "bypass"
        return None
    rt = ctx.runtime
    key = ctx.cache_key = cache_key(ctx)
    cc = (ctx.headers.get(b"cache-control") or b"").lower()
    ctx.cache_store = b"no-store" not in cc
    if b"no-cache" in cc:
        ctx.cache_status = "bypass"
        return None
    try:
        admission = _admission(ctx)
        if admission is None:
            raw, ctx.flight_leader = await rt.state.cache_lookup(key, rt.lease_ms)
        else:
            raw, ctx.flight_leader, res = await rt.state.cache_lookup_admit(
                key, rt.lease_ms, admission
            )
            if res is not None:  # a miss this request computes: admitted already
                ctx.cache_status = "miss"
                admitted(ctx, admission, res)
        if raw is not None:
            return _hit(ctx, raw)
        deadline = time.monotonic() + rt.config.gateway.cache.single_flight_wait_seconds
        while not ctx.flight_leader and time.monotonic() < deadline:
            # Someone else computes this answer: wait for it (or take over if they fail).
            assert ctx.out is not None
            await interruptible(ctx.out, rt.flights.wait(key, 0.1))
            raw, ctx.flight_leader = await rt.state.cache_lookup(key, rt.lease_ms)
            if raw is not None:
                return _hit(ctx, raw)
    except StateUnavailable as exc:
        raise state_unavailable(str(exc)) from None
    ctx.cache_status = "miss"
    return None


def _admission(ctx: RequestContext) -> Admission | None:
    """The admission a miss will need, asked for with the lookup (one round trip to a
    shared state instead of two), or None when the worst case fails outright: ``admit``
    says so after a miss, while a hit is admitted at its own charge."""
    try:
        return admission_for(ctx)
    except GatewayError:
        return None


def _hit(ctx: RequestContext, raw: bytes) -> Stored:
    tenant = ctx.tenant
    assert tenant is not None
    stored = Stored.decode(raw)
    ctx.cache_status = "hit"
    model = ctx.runtime.catalog.models.get(stored.model)
    u = stored.usage
    if model is not None:
        ctx.saved = model.price.cost(
            int(u.get("prompt_tokens", 0)),
            int(u.get("completion_tokens", 0)),
            int(u.get("cached_tokens", 0)),
        )
    share = tenant.hit_charge
    ctx.hit_charge = int((Decimal(ctx.saved) * share).to_integral_value(ROUND_FLOOR))
    return stored


async def finish(ctx: RequestContext) -> None:
    key = ctx.cache_key
    if key is None:
        return
    rt = ctx.runtime
    tenant = ctx.tenant
    assert tenant is not None
    try:
        value = _entry(ctx) if _storable(ctx) else None
        if value is not None or ctx.flight_leader:
            await rt.state.cache_store(
                key, value, tenant.cache.ttl_seconds * 1000, ctx.flight_leader
            )
    finally:
        if ctx.flight_leader:
            rt.flights.notify(key)


def _storable(ctx: RequestContext) -> bool:
    return (
        ctx.cache_store
        and ctx.completed
        and ctx.error is None
        and ctx.cache_status != "hit"
        and not ctx.replayed
        and ctx.clamped_to is None
        and ctx.usage is not None
        and ctx.route is not None
        and ctx.model is ctx.route.model
    )


def _entry(ctx: RequestContext) -> bytes:
    model, u = ctx.model, ctx.usage
    assert model is not None and u is not None
    if ctx.stream:
        body = orjson.dumps(ctx.streamed.answer(ctx.usage_raw))
    else:
        body = ctx.response_body
    usage = {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "cached_tokens": u.cached_tokens,
    }
    return Stored(
        kind="cache",
        model=model.name,
        provider=model.provider,
        route=ctx.route.reason if ctx.route else "",
        body=body,
        usage=usage,
    ).encode()
