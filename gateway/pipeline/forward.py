"""Stage 7, forward: call the upstream, with retries and fallbacks.

For each model in the chain (the routed model, then its fallbacks): ask its circuit
breaker, try the call, and on a retryable failure (connect error, timeout, 429, 5xx,
garbage) retry with exponential backoff and full jitter, honouring ``Retry-After`` up to
a cap; then fall back to the next model. A 4xx caused by the request is answered as is.
A stream falls back only before its first byte reached the client.

The reservation made at admission covers the most expensive model of the chain, so a
fallback never needs a second reservation; failed attempts cost nothing and are listed
on the ledger row."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import orjson

from ..config.catalog import Model
from ..upstream.errors import CircuitOpen, UpstreamBadResponse, UpstreamError, from_status
from .admit import output_cap
from .context import RequestContext, Responder, interruptible
from .headers import JSON, gateway_headers
from .relay import relay_stream
from .settle import settle
from .usage import count_json_response, usage_from


def upstream_body(ctx: RequestContext, model: Model) -> bytes:
    """The client's body with the fields the gateway owns set: the upstream model name,
    the output cap, and (for streams) ``stream_options.include_usage``."""
    body = dict(ctx.body)
    body["model"] = model.upstream_model
    if ctx.endpoint == "chat":
        cap = output_cap(ctx, model)
        has_mct = "max_completion_tokens" in body
        has_mt = "max_tokens" in body
        if has_mct or has_mt:
            if ctx.clamped_to is not None:
                for k in ("max_completion_tokens", "max_tokens"):
                    if k in body:
                        body[k] = cap
        else:
            body[model.max_tokens_param] = cap
        if ctx.stream:
            opts = body.get("stream_options")
            body["stream_options"] = {
                **(opts if isinstance(opts, dict) else {}),
                "include_usage": True,
            }
    return orjson.dumps(body)


def _backoff(attempt: int, base: float, cap: float) -> float:
    return random.uniform(0, min(cap, base * (2**attempt)))


async def forward(ctx: RequestContext, out: Responder) -> None:
    rt = ctx.runtime
    assert ctx.route is not None
    last: UpstreamError | None = None
    for index, model in enumerate(ctx.route.chain):
        if index > 0:
            rt.metrics.fallback(ctx, ctx.route.chain[index - 1], model)
            assert ctx.route is not None
            ctx.route.reason += f";fallback:{ctx.route.chain[index - 1].name}->{model.name}"
        provider = rt.provider_config(model.provider)
        retries = provider.retries
        breaker = rt.breakers.get(model.provider, model.name, provider.breaker)
        for attempt in range(retries.max_attempts):
            wait = breaker.blocked_for()
            if wait > 0:
                last = CircuitOpen(model.provider, model.name, wait)
                ctx.note_attempt(model, last.error_code, last.status, time.perf_counter())
                break
            ctx.model = model
            t0 = time.perf_counter()
            waited = ctx.upstream_seconds
            try:
                async with rt.capacity.slot(ctx, model, out):
                    if ctx.stream:
                        await relay_stream(ctx, out, model, upstream_body(ctx, model), t0)
                    else:
                        await _json_once(ctx, out, model, t0)
            except UpstreamError as exc:
                last = exc
                if not ctx.first_byte_sent:  # a stream that started noted its own failure
                    ctx.note_attempt(model, exc.error_code, exc.upstream_status or exc.status, t0)
                    # A failed attempt (and the backoff after it) is time spent waiting on
                    # the upstream, not gateway overhead.
                    ctx.upstream_seconds = waited + (time.perf_counter() - t0)
                if exc.code not in ("upstream_circuit_open", "upstream_capacity_exhausted"):
                    breaker.record(False)
                rt.metrics.upstream_error(model, exc)
                if ctx.first_byte_sent or not exc.fallback_ok:
                    raise
                if not exc.retryable or attempt + 1 >= retries.max_attempts:
                    break
                if exc.retry_after is not None:
                    if exc.retry_after > retries.retry_after_max:
                        break  # too long to wait here; the next model may answer now
                    delay = exc.retry_after
                else:
                    delay = _backoff(attempt, retries.backoff_base, retries.backoff_max)
                rt.metrics.retry(model)
                await interruptible(out, asyncio.sleep(delay))
                ctx.upstream_seconds += delay
                continue
            breaker.record(True)
            return
    assert last is not None
    raise last


async def _json_once(ctx: RequestContext, out: Responder, model: Model, t0: float) -> None:
    """One non-stream attempt; on success the answer is settled, then sent."""
    up = ctx.runtime.upstreams[model.provider]
    resp = await interruptible(
        out, up.post_json(ctx.upstream_path, upstream_body(ctx, model), model.name)
    )
    ctx.upstream_seconds += resp.upstream_seconds
    data = _check_json(ctx, model, resp.body)
    raw_usage = data.get("usage")
    ctx.usage = usage_from(raw_usage) or count_json_response(ctx, model, data)
    ctx.usage_raw = raw_usage if isinstance(raw_usage, dict) else None
    ctx.response_body = resp.body
    ctx.note_attempt(model, "ok", 200, t0)
    if out.disconnected:
        ctx.client_gone = True
        return
    await settle(ctx)
    await out.send_json(200, [JSON, *gateway_headers(ctx, cost=True)], resp.body)
    ctx.completed = True


def _check_json(ctx: RequestContext, model: Model, body: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise UpstreamBadResponse(model.provider, model.name, "the body is not JSON") from None
    if not isinstance(data, dict):
        raise UpstreamBadResponse(model.provider, model.name, "the body is not a JSON object")
    if "error" in data and "choices" not in data and "data" not in data:
        raise from_status(model.provider, model.name, 502, body, None, ())
    expected = "choices" if ctx.endpoint == "chat" else "data"
    if not isinstance(data.get(expected), list):
        raise UpstreamBadResponse(model.provider, model.name, f"the JSON has no '{expected}' array")
    return data
