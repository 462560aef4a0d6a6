"""Response headers the gateway adds (names are contract: see DESIGN.md)."""

from __future__ import annotations

from collections.abc import Iterator

from ..money import nanos_to_usd
from ..state.base import RateState, WindowState
from .context import Header, RequestContext

JSON = (b"content-type", b"application/json")
SSE = (b"content-type", b"text/event-stream; charset=utf-8")


def openai_duration(ms: int) -> str:
    """OpenAI's reset format: ``20ms``, ``1s``, ``6m0s``, ``1h2m3s``."""
    if ms < 1000:
        return f"{max(ms, 0)}ms"
    s = -(-ms // 1000)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h{m}m{s}s"
    if m:
        return f"{m}m{s}s"
    return f"{s}s"


def rate_limit_headers(rate: RateState) -> Iterator[tuple[str, str]]:
    if rate.limit_requests is not None:
        yield "x-ratelimit-limit-requests", str(rate.limit_requests)
        yield "x-ratelimit-remaining-requests", str(rate.remaining_requests)
        yield "x-ratelimit-reset-requests", openai_duration(rate.reset_requests_ms)
    if rate.limit_tokens is not None:
        yield "x-ratelimit-limit-tokens", str(rate.limit_tokens)
        yield "x-ratelimit-remaining-tokens", str(rate.remaining_tokens)
        yield "x-ratelimit-reset-tokens", openai_duration(rate.reset_tokens_ms)


def min_remaining(windows: list[WindowState]) -> int | None:
    rem = [w.remaining for w in windows if w.remaining is not None]
    return min(rem) if rem else None


def gateway_headers(ctx: RequestContext, *, cost: bool) -> list[Header]:
    """Headers for a proxied response. ``cost`` is False for a stream, whose cost goes
    into its final usage chunk instead."""
    h: list[Header] = [(b"x-gateway-request-id", ctx.request_id.encode())]
    model = ctx.model
    if model is not None:
        h.append((b"x-gateway-model", model.name.encode()))
        h.append((b"x-gateway-provider", model.provider.encode()))
    if ctx.route is not None:
        h.append((b"x-gateway-route", ctx.route.reason.encode()))
    h.append((b"x-gateway-cache", ctx.cache_status.encode()))
    if cost:
        h.append((b"x-gateway-cost-usd", nanos_to_usd(ctx.charged).encode()))
    windows = ctx.windows or (ctx.admission.windows if ctx.admission else [])
    remaining = min_remaining(windows)
    if remaining is not None:
        h.append((b"x-gateway-budget-remaining-usd", nanos_to_usd(remaining).encode()))
    if ctx.admission is not None:
        h.extend((k.encode(), v.encode()) for k, v in rate_limit_headers(ctx.admission.rate))
    if ctx.replayed:
        h.append((b"idempotent-replayed", b"true"))
    return h


def usage_extension(ctx: RequestContext) -> dict[str, str]:
    """What a stream's final usage chunk carries besides OpenAI's fields (``x_gateway``):
    the request id, its cost and the budget left, as exact decimal strings."""
    gw = {"request_id": ctx.request_id, "cost_usd": nanos_to_usd(ctx.charged)}
    remaining = min_remaining(ctx.windows)
    if remaining is not None:
        gw["budget_remaining_usd"] = nanos_to_usd(remaining)
    return gw
