"""The gateway's own endpoints: models, usage, estimate, admin, health, metrics."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import orjson
from litestar import Request, Response, get, post

from ..config.snapshot import Tenant
from ..errors import GatewayError, bad_cursor, bad_request, not_found, state_unavailable
from ..money import nanos_to_usd
from ..pipeline.admit import reserve_prompt_tokens, worst_case
from ..pipeline.context import RequestContext, new_request_id
from ..pipeline.parse import parse
from ..pipeline.route import route, visible_models
from ..runtime import Runtime
from ..state.base import LedgerQuery, LedgerRow, StateUnavailable, WindowState

Req = Request[Any, Any, Any]


def _rt(request: Req) -> Runtime:
    rt: Runtime = request.app.state.runtime
    return rt


def _tenant(request: Req) -> Tenant:
    tenant: Tenant = request.scope["state"]["gateway_tenant"]
    return tenant


def _json(data: Any, status: int = 200) -> Response[bytes]:
    return Response(content=orjson.dumps(data), status_code=status, media_type="application/json")


def _iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def window_json(w: WindowState) -> dict[str, Any]:
    return {
        "window": w.window,
        "limit_usd": None if w.limit is None else nanos_to_usd(w.limit),
        "spent_usd": nanos_to_usd(w.spent),
        "reserved_usd": nanos_to_usd(w.reserved),
        "remaining_usd": None if w.remaining is None else nanos_to_usd(w.remaining),
        "resets_at": _iso(w.resets_at_ms),
    }


async def _windows(rt: Runtime, tenant: Tenant) -> list[WindowState]:
    try:
        windows = await rt.state.usage(tenant.name, tenant.budgets)
    except StateUnavailable as exc:
        raise state_unavailable(str(exc)) from None
    rt.note_windows(tenant.name, windows)
    return windows


async def _usage(rt: Runtime, tenant: Tenant) -> dict[str, Any]:
    windows = await _windows(rt, tenant)
    return {
        "object": "gateway.usage",
        "tenant": tenant.name,
        "windows": [window_json(w) for w in windows],
    }


# -- OpenAI-compatible ---------------------------------------------------------------------
def _model_entry(rt: Runtime, name: str) -> dict[str, Any]:
    model = rt.catalog.resolve(name)
    owned = model.provider if model is not None else "gateway"
    entry: dict[str, Any] = {"id": name, "object": "model", "created": 0, "owned_by": owned}
    if model is None:
        entry["x_gateway"] = {"kind": "routed"}
    else:
        entry["x_gateway"] = {
            "kind": "alias" if name in rt.catalog.aliases else "model",
            "model": model.name,
            "type": model.kind,
            "tier": model.tier,
        }
    return entry


@get("/v1/models")
async def list_models(request: Req) -> Response[bytes]:
    rt, tenant = _rt(request), _tenant(request)
    names = sorted(visible_models(rt.catalog, rt.policy.routes, tenant))
    return _json({"object": "list", "data": [_model_entry(rt, n) for n in names]})


@get("/v1/models/{model_id:path}")
async def get_model(request: Req) -> Response[bytes]:
    rt, tenant = _rt(request), _tenant(request)
    name = str(request.path_params["model_id"]).lstrip("/")
    if name not in visible_models(rt.catalog, rt.policy.routes, tenant):
        raise GatewayError(
            404,
            f"The model {name!r} does not exist or you do not have access to it.",
            type="invalid_request_error",
            code="model_not_found",
            param="model",
        )
    return _json(_model_entry(rt, name))


# -- gateway ---------------------------------------------------------------------------------
@get("/v1/gateway/usage")
async def usage(request: Req) -> Response[bytes]:
    return _json(await _usage(_rt(request), _tenant(request)))


@post("/v1/gateway/estimate", status_code=200)
async def estimate(request: Req) -> Response[bytes]:
    """What a request body would reserve, and why, without calling upstream."""
    rt, tenant = _rt(request), _tenant(request)
    raw = await request.body()
    endpoint = request.query_params.get("endpoint")
    if endpoint is None:
        try:
            probe = orjson.loads(raw)
        except orjson.JSONDecodeError:
            probe = {}
        endpoint = "embeddings" if isinstance(probe, dict) and "input" in probe else "chat"
    if endpoint not in ("chat", "embeddings"):
        raise bad_request("endpoint must be 'chat' or 'embeddings'.", param="endpoint")
    now = rt.clock.now_ms()
    ctx = RequestContext(
        runtime=rt,
        endpoint=endpoint,
        upstream_path="/chat/completions" if endpoint == "chat" else "/embeddings",
        request_id=new_request_id(now),
        started=time.perf_counter(),
        started_ms=now,
        policy=rt.policy,
        headers=dict(request.scope["headers"]),
        raw=raw,
        tenant=tenant,
    )
    await parse(ctx)
    await route(ctx)
    amount, tokens, max_out = worst_case(ctx)
    assert ctx.route is not None and ctx.prompt is not None
    model = ctx.route.model
    windows = await _windows(rt, tenant)
    blocking = [w.window for w in windows if w.remaining is not None and amount > w.remaining]
    reserved_prompt = reserve_prompt_tokens(ctx.prompt.tokens)
    return _json(
        {
            "object": "gateway.estimate",
            "model": model.name,
            "provider": model.provider,
            "route": ctx.route.reason,
            "fallbacks": [m.name for m in ctx.route.chain[1:]],
            "prompt_tokens": ctx.prompt.tokens,
            "prompt_tokens_reserved": reserved_prompt,
            "max_output_tokens": max_out,
            "tokens_for_rate_limit": tokens,
            "reserve_usd": nanos_to_usd(amount),
            "price_per_million_usd": {
                "input": nanos_to_usd(model.price.input),
                "cached_input": nanos_to_usd(model.price.cached_input),
                "output": nanos_to_usd(model.price.output),
            },
            "explanation": (
                f"{reserved_prompt} prompt tokens (counted {ctx.prompt.tokens}, plus a margin) at "
                f"${nanos_to_usd(model.price.input)}/1M + {max_out} output tokens at "
                f"${nanos_to_usd(model.price.output)}/1M, on the most expensive model of the "
                "fallback chain"
            ),
            "fits": not blocking,
            "blocked_by": blocking,
            "windows": [window_json(w) for w in windows],
        }
    )


# -- admin -----------------------------------------------------------------------------------
def _admin_tenant(rt: Runtime, name: str) -> Tenant:
    tenant = rt.policy.tenants.get(name)
    if tenant is None:
        raise not_found(f"No tenant named {name!r}.")
    return tenant


@get("/admin/tenants")
async def admin_tenants(request: Req) -> Response[bytes]:
    rt = _rt(request)
    out = []
    for tenant in rt.policy.tenants.values():
        out.append(await _usage(rt, tenant))
    return _json({"object": "list", "data": out})


@get("/admin/tenants/{tenant_name:str}/usage")
async def admin_tenant_usage(request: Req) -> Response[bytes]:
    rt = _rt(request)
    return _json(await _usage(rt, _admin_tenant(rt, str(request.path_params["tenant_name"]))))


def ledger_row_json(r: LedgerRow) -> dict[str, Any]:
    d = {k: getattr(r, k) for k in r.__slots__}
    d["time"] = _iso(r.ts_ms)
    d["cost_usd"] = nanos_to_usd(r.cost)
    d["reserved_usd"] = nanos_to_usd(r.reserved)
    d["overrun_usd"] = nanos_to_usd(r.overrun)
    d["credit_usd"] = nanos_to_usd(r.credit)
    return d


def _time_param(request: Req, name: str) -> int | None:
    v = request.query_params.get(name)
    if v is None:
        return None
    try:
        if v.isdigit():
            return int(v)
        return int(datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp() * 1000)
    except ValueError:
        raise bad_request(
            f"{name} must be an ISO 8601 time or epoch milliseconds.", param=name
        ) from None


@get("/admin/ledger")
async def admin_ledger(request: Req) -> Response[bytes]:
    rt = _rt(request)
    qp = request.query_params
    try:
        limit = min(max(int(qp.get("limit", "100")), 1), 1000)
        status = int(qp["status"]) if "status" in qp else None
    except ValueError:
        raise bad_request("limit and status must be integers.") from None
    end_user = qp.get("end_user")
    if end_user is not None:
        # An end user's rows are read from its own index (Redis state): by position only.
        if not qp.get("tenant"):
            raise bad_request(
                "end_user needs tenant: an end user id belongs to its tenant.", param="end_user"
            )
        if any(k in qp for k in ("model", "status", "since", "until")):
            raise bad_request(
                "end_user combines only with tenant, limit and cursor.", param="end_user"
            )
    q = LedgerQuery(
        tenant=qp.get("tenant"),
        end_user=end_user,
        model=qp.get("model"),
        since_ms=_time_param(request, "since"),
        until_ms=_time_param(request, "until"),
        status=status,
        limit=limit,
        cursor=qp.get("cursor"),
    )
    try:
        page = await rt.state.ledger(q)
    except StateUnavailable as exc:
        raise state_unavailable(str(exc)) from None
    except ValueError:  # a cursor this backend did not make
        raise bad_cursor() from None
    return _json(
        {
            "object": "list",
            "data": [ledger_row_json(r) for r in page.rows],
            "next_cursor": page.next_cursor,
            "has_more": page.next_cursor is not None,
        }
    )


# -- operations ------------------------------------------------------------------------------
@get("/healthz")
async def healthz() -> Response[bytes]:
    return _json({"status": "ok"})


@get("/readyz")
async def readyz(request: Req) -> Response[bytes]:
    rt = _rt(request)
    problems = []
    if not rt.ready:
        problems.append("starting up")
    try:
        await rt.state.ping()
    except StateUnavailable as exc:
        problems.append(f"state backend unavailable: {exc}")
    body: dict[str, Any] = {
        "status": "ready" if not problems else "not_ready",
        "state": rt.state.name,
        "policy_digest": rt.policy.digest,
        "tokenizer": "tiktoken" if rt.tokens.exact else "estimate",
    }
    if rt.policies.last_error:
        body["policy_reload_error"] = rt.policies.last_error
    if problems:
        body["problems"] = problems
    return _json(body, 200 if not problems else 503)


@get("/metrics")
async def metrics(request: Req) -> Response[bytes]:
    rt = _rt(request)
    if not rt.config.gateway.metrics.enabled:
        raise not_found("Metrics are disabled (metrics.enabled: false in gateway.yaml).")
    return Response(
        content=rt.metrics.exposition(),
        media_type="text/plain; version=0.0.4; charset=utf-8",
    )


ROUTES = [
    list_models,
    get_model,
    usage,
    estimate,
    admin_tenants,
    admin_tenant_usage,
    admin_ledger,
    healthz,
    readyz,
    metrics,
]
