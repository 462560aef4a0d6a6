"""Stage 6, admit: rate limits and the budget reservation, in one atomic state call.

The worst case is reserved: counted prompt tokens (with a safety margin) at the input
price, plus the most output the request may produce at the output price. A chat request
that sets no max tokens gets the model's cap, and the gateway sends that cap upstream,
so the worst case really is the worst case. If it does not fit, the request is rejected
(402) before any money is spent, or, with ``on_budget_exceeded: clamp``, its max tokens
are lowered to what fits."""

from __future__ import annotations

from ..config.catalog import Model
from ..config.snapshot import Tenant
from ..errors import GatewayError, bad_request, budget_exceeded, rate_limited, state_unavailable
from ..money import nanos_to_usd
from ..state.base import Admission, AdmitResult, EndUserTerms, RateLimits, StateUnavailable
from .context import RequestContext
from .headers import rate_limit_headers
from .route import requested_max_output

# Prompt counts are exact for OpenAI tokenizers but only close for other providers';
# the reservation covers that difference.
PROMPT_MARGIN_NUM, PROMPT_MARGIN_DEN, PROMPT_MARGIN_ADD = 11, 10, 16


def reserve_prompt_tokens(tokens: int) -> int:
    return -(-tokens * PROMPT_MARGIN_NUM // PROMPT_MARGIN_DEN) + PROMPT_MARGIN_ADD


def output_cap(ctx: RequestContext, model: Model) -> int:
    """Max completion tokens per choice for this request on ``model``."""
    if ctx.endpoint != "chat":
        return 0
    if ctx.clamped_to is not None:
        return ctx.clamped_to
    req = requested_max_output(ctx)
    return req if req is not None else model.max_output_tokens


def worst_case(ctx: RequestContext) -> tuple[int, int, int]:
    """(nano-dollars, tokens for tpm, max output tokens over all choices), for the most
    expensive model of the fallback chain, so a fallback is covered too."""
    assert ctx.prompt is not None and ctx.route is not None
    n = _choices(ctx)
    prompt = reserve_prompt_tokens(ctx.prompt.tokens)
    amount = tokens = max_out = 0
    for model in ctx.route.chain:
        out = output_cap(ctx, model) * n
        amount = max(amount, model.price.cost(prompt, out))
        tokens = max(tokens, ctx.prompt.tokens + out)
        max_out = max(max_out, out)
    return amount, tokens, max_out


def _choices(ctx: RequestContext) -> int:
    n = ctx.body.get("n") if ctx.endpoint == "chat" else 1
    return n if isinstance(n, int) and n > 0 else 1


async def admit(
    ctx: RequestContext, *, amount: int | None = None, tokens: int | None = None
) -> None:
    """Reserve for the request; ``amount``/``tokens`` override the worst case (cache hits
    and replays reserve only what they may be charged and count no tokens). A request
    admitted in the cache lookup's round trip (see ``cache.lookup``) is not admitted
    again."""
    if ctx.admission is not None:
        return
    a = admission_for(ctx, amount, tokens)
    try:
        res = await ctx.runtime.state.admit(a)
    except StateUnavailable as exc:
        raise state_unavailable(str(exc)) from None
    admitted(ctx, a, res)


def admission_for(
    ctx: RequestContext, amount: int | None = None, tokens: int | None = None
) -> Admission:
    """What to ask the state for: the worst case, unless ``amount``/``tokens`` say
    otherwise. A request whose worst case exceeds a tokens-per-minute limit outright
    can never fit: 400, before asking."""
    rt = ctx.runtime
    tenant = ctx.tenant
    assert tenant is not None and ctx.model is not None
    if amount is None or tokens is None:
        amount, tokens, _ = worst_case(ctx)
    limits, klim = tenant.limits, ctx.key_limits
    eu = end_user_terms(ctx)
    for tpm in (limits.tpm, klim.tpm if klim else None, eu.limits.tpm if eu else None):
        if tpm is not None and tokens > tpm:
            raise bad_request(
                f"This request needs up to {tokens} tokens (prompt plus max output), more than "
                f"your limit of {tpm} tokens per minute. Lower max_tokens or shorten the prompt.",
                code="tokens_exceed_tpm",
            )
    min_amount = None
    if tenant.on_budget_exceeded == "clamp" and ctx.endpoint == "chat" and ctx.clamped_to is None:
        assert ctx.prompt is not None and ctx.route is not None
        prompt = reserve_prompt_tokens(ctx.prompt.tokens)
        out = tenant.clamp_min_tokens * _choices(ctx)
        min_amount = max(m.price.cost(prompt, out) for m in ctx.route.chain)
        if min_amount >= amount:
            min_amount = None
    return Admission(
        tenant=tenant.name,
        reservation_id=ctx.request_id,
        amount=amount,
        tokens=tokens,
        budgets=tenant.budgets,
        limits=RateLimits(limits.rpm, limits.tpm, limits.concurrent),
        lease_ms=rt.lease_ms,
        min_amount=min_amount,
        key=ctx.key_fp,
        key_limits=None if klim is None else RateLimits(klim.rpm, klim.tpm, klim.concurrent),
        end_user=eu,
    )


def admitted(ctx: RequestContext, a: Admission, res: AdmitResult) -> None:
    """Take the state's answer to ``a``: hold the reservation (lowering max tokens if
    less was granted), or raise the rejection."""
    rt = ctx.runtime
    rt.note_windows(a.tenant, res.windows)
    ctx.end_user_state = res.end_user
    if not res.ok:
        raise _rejection(ctx, res, a.amount)
    ctx.admission = res
    ctx.reservation_id = ctx.request_id
    ctx.worst_case = res.granted
    ctx.admitted_tokens = a.tokens
    rt.leases.hold(a.tenant, ctx.request_id)
    if res.granted < a.amount:
        _clamp(ctx, res.granted)


def end_user_terms_for(tenant: Tenant, end_user: str) -> EndUserTerms:
    """What the tenant's ``end_users`` policy applies to ``end_user``."""
    d = tenant.end_users
    lim = d.limits
    return EndUserTerms(
        end_user, d.budgets, RateLimits(lim.rpm, lim.tpm, lim.concurrent), d.prepaid
    )


def end_user_terms(ctx: RequestContext) -> EndUserTerms | None:
    """The terms of the call's end user, if it names one."""
    if not ctx.end_user or ctx.tenant is None:
        return None
    if ctx.end_user_terms is None or ctx.end_user_terms.id != ctx.end_user:
        ctx.end_user_terms = end_user_terms_for(ctx.tenant, ctx.end_user)
    return ctx.end_user_terms


def _clamp(ctx: RequestContext, granted: int) -> None:
    """Lower max tokens so the worst case on every model of the chain fits ``granted``."""
    assert ctx.prompt is not None and ctx.route is not None
    n = _choices(ctx)
    prompt = reserve_prompt_tokens(ctx.prompt.tokens)
    per_choice = min(m.price.max_output_for(granted, prompt) for m in ctx.route.chain) // n
    ctx.clamped_to = per_choice
    assert ctx.route is not None
    ctx.route.reason += f";clamp:max_tokens={per_choice}"


def _rejection(ctx: RequestContext, res: AdmitResult, amount: int) -> GatewayError:
    by = res.rejected_by or "rpm"
    cost = f"this request may cost up to ${nanos_to_usd(amount)}"
    if by == "credits":
        ctx.reject_window = "end_user_balance"
        eu = res.end_user
        balance, held = (eu.balance, eu.windows[0].reserved) if eu else (0, 0)
        return budget_exceeded(
            f"Insufficient credits: {cost}, but end user {ctx.end_user!r} has a balance of "
            f"${nanos_to_usd(balance)} with ${nanos_to_usd(held)} held by its requests in "
            f"flight. Top up its credits (POST /v1/gateway/end-users/{ctx.end_user}/credits) "
            "or lower max_tokens.",
            code="insufficient_credits",
            scope="end_user",
        )
    if by in ("budget", "end_user_budget"):
        of_end_user = by == "end_user_budget"
        windows = res.end_user.windows if of_end_user and res.end_user else res.windows
        w = next(x for x in windows if x.window == res.window)
        ctx.reject_window = f"end_user_{w.window}" if of_end_user else w.window
        whose = f"end user {ctx.end_user!r}'s" if of_end_user else "your"
        resets = "never (total budget)" if w.resets_at_ms is None else _iso(w.resets_at_ms)
        return budget_exceeded(
            f"Budget exceeded: {cost}, but {whose} {w.window} budget of "
            f"${nanos_to_usd(w.limit or 0)} has ${nanos_to_usd(w.spent)} "
            f"spent and ${nanos_to_usd(w.reserved)} reserved by requests in flight "
            f"(${nanos_to_usd(w.remaining or 0)} left). It resets {resets}. "
            "Lower max_tokens, use a cheaper model, or ask your operator to raise the budget.",
            scope="end_user" if of_end_user else "tenant",
        )
    ctx.reject_limit = by
    tenant = ctx.tenant
    if by.startswith("key_"):
        limits, who = ctx.key_limits, "this key is"
    elif by.startswith("end_user_"):
        limits = tenant.end_users.limits if tenant else None
        who = f"end user {ctx.end_user!r} is"
    else:
        limits, who = (tenant.limits if tenant else None), f"tenant {ctx.tenant_name!r} is"
    kind = by.removeprefix("key_").removeprefix("end_user_")
    what = {
        "rpm": f"{limits.rpm if limits else '?'} requests per minute",
        "tpm": f"{limits.tpm if limits else '?'} tokens per minute",
        "concurrent": f"{limits.concurrent if limits else '?'} concurrent requests",
    }[kind]
    retry = res.retry_after_ms / 1000
    return rate_limited(
        f"Rate limit reached: {who} limited to {what}. Retry after {retry:.1f}s.",
        retry,
        dict(rate_limit_headers(res.rate)),
    )


def _iso(ms: int) -> str:
    from datetime import UTC, datetime

    return "at " + datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
