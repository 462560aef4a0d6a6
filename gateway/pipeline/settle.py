"""Stage 8, settle: replace the reservation by what the request actually cost.

Runs exactly once per admitted request, whatever happened: after a success (before the
response's last byte), after a failure (charge 0), after a stream was cut or abandoned
(charge what was consumed, never more than reserved), and when the client disconnected
(the pipeline runs it shielded from cancellation). The ledger row is committed in the
same state call."""

from __future__ import annotations

from ..errors import state_unavailable
from ..state.base import LedgerRow, Settlement, StateUnavailable
from .context import RequestContext
from .usage import count_streamed


def actual_cost(ctx: RequestContext) -> int:
    if ctx.hit_charge is not None:
        return ctx.hit_charge
    u, model = ctx.usage, ctx.model
    if u is None or model is None:
        return 0
    if not ctx.stream and ctx.client_gone and not ctx.completed:
        return 0  # a non-stream answer the client never received
    return model.price.cost(u.prompt_tokens, u.completion_tokens, u.cached_tokens)


def ledger_row(ctx: RequestContext) -> LedgerRow:
    u = ctx.usage
    model = ctx.model
    err = ctx.error
    return LedgerRow(
        id=ctx.request_id,
        ts_ms=ctx.started_ms,
        tenant=ctx.tenant_name,
        key_fp=ctx.key_fp,
        endpoint=ctx.endpoint,
        requested_model=ctx.requested_model,
        model=model.name if model else "",
        provider=model.provider if model else "",
        route=ctx.route.reason if ctx.route else "",
        end_user=ctx.end_user,
        stream=ctx.stream,
        status=err.status if err is not None else (499 if ctx.client_gone else ctx.status),
        error_code=err.error_code
        if err is not None
        else ("client_disconnected" if ctx.client_gone else ""),
        prompt_tokens=u.prompt_tokens if u else 0,
        cached_tokens=u.cached_tokens if u else 0,
        completion_tokens=u.completion_tokens if u else 0,
        reasoning_tokens=u.reasoning_tokens if u else 0,
        reserved=ctx.worst_case,
        cache=ctx.cache_status,
        replay=ctx.replayed,
        usage_source=u.source if u else "none",
        attempts=[a.as_dict() for a in ctx.attempts],
        latency_ms=int(ctx.elapsed() * 1000),
        ttft_ms=None if ctx.ttft is None else int(ctx.ttft * 1000),
        upstream_ms=int(ctx.upstream_seconds * 1000),
    )


async def settle(ctx: RequestContext) -> None:
    if ctx.settled or not ctx.reservation_id:
        return
    ctx.settled = True
    rt = ctx.runtime
    tenant = ctx.tenant
    assert tenant is not None
    if ctx.usage is None and ctx.streamed and ctx.model is not None:
        ctx.usage = count_streamed(ctx, ctx.model)  # a stream cut short: what was consumed
    charge = actual_cost(ctx)
    u = ctx.usage
    used_tokens = (u.prompt_tokens + u.completion_tokens) if u and ctx.hit_charge is None else 0
    row = ledger_row(ctx)
    ctx.row = row
    try:
        res = await rt.state.settle(
            Settlement(
                tenant=tenant.name,
                reservation_id=ctx.reservation_id,
                charge=charge,
                tokens_delta=used_tokens - ctx.admitted_tokens,
                budgets=tenant.budgets,
                row=row,
                end_user=ctx.end_user_terms,
            )
        )
    except StateUnavailable as exc:
        ctx.charged = 0
        raise state_unavailable(str(exc)) from None
    finally:
        rt.leases.release(tenant.name, ctx.reservation_id)
    ctx.charged = res.charged
    ctx.windows = res.windows
    if res.end_user is not None:
        ctx.end_user_state = res.end_user
    rt.note_windows(tenant.name, res.windows)
