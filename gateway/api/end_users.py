"""A tenant's own customers (end users): balance, budgets and spend, prepaid credit
top-ups, and their ledger. Reached with the tenant's key; a tenant sees only its own end
users (an id used by two tenants is two end users)."""

from __future__ import annotations

import time
from typing import Any

import orjson
from litestar import Response, get, post

from ..config.snapshot import Tenant
from ..errors import GatewayError, bad_cursor, bad_request, state_unavailable
from ..money import MAX_EXACT_NANOS, MoneyError, nanos_to_usd, usd_to_nanos
from ..pipeline.admit import end_user_terms_for
from ..pipeline.context import new_request_id
from ..pipeline.parse import END_USER_RULE, valid_end_user
from ..state.base import EndUserState, LedgerQuery, LedgerRow, StateUnavailable
from .routes import Req, _json, _rt, _tenant, ledger_row_json, window_json

MAX_KEY_LENGTH = 255


def _end_user(request: Req) -> str:
    end_user = str(request.path_params["end_user_id"])
    if not valid_end_user(end_user):
        raise bad_request(
            f"Invalid end user id {end_user[:64]!r}: an end user id is {END_USER_RULE}.",
            code="invalid_end_user",
        )
    return end_user


def _state_json(tenant: Tenant, end_user: str, st: EndUserState) -> dict[str, Any]:
    return {
        "object": "gateway.end_user",
        "id": end_user,
        "tenant": tenant.name,
        "prepaid": tenant.end_users.prepaid,
        "balance_usd": nanos_to_usd(st.balance),
        "held_usd": nanos_to_usd(st.windows[0].reserved if st.windows else 0),
        "requests_in_flight": st.in_flight,
        "windows": [window_json(w) for w in st.windows],
    }


@get("/v1/gateway/end-users/{end_user_id:str}")
async def get_end_user(request: Req) -> Response[bytes]:
    """Balance, budgets and spend per window: what the tenant's UI shows its customer."""
    rt, tenant = _rt(request), _tenant(request)
    end_user = _end_user(request)
    try:
        st = await rt.state.end_user_usage(tenant.name, end_user_terms_for(tenant, end_user))
    except StateUnavailable as exc:
        raise state_unavailable(str(exc)) from None
    return _json(_state_json(tenant, end_user, st))


def _amount(body: Any) -> int:
    if not isinstance(body, dict) or "amount_usd" not in body:
        raise bad_request(
            'The body must be a JSON object with "amount_usd", e.g. {"amount_usd": "10.00"}.',
            param="amount_usd",
        )
    unknown = sorted(set(body) - {"amount_usd"})
    if unknown:
        raise bad_request(f"Unknown field(s): {', '.join(unknown)}.", param=unknown[0])
    raw = body["amount_usd"]
    try:
        if not isinstance(raw, str | int | float):
            raise MoneyError("not a number")
        nanos = usd_to_nanos(raw)
    except MoneyError as exc:
        raise bad_request(
            f"amount_usd must be a decimal amount exact to the nano-dollar ({exc}); send it "
            'as a string, e.g. "10.00".',
            param="amount_usd",
        ) from None
    if nanos <= 0 or nanos >= MAX_EXACT_NANOS:
        raise bad_request(
            "amount_usd must be more than 0 and less than $9,007,199.",
            param="amount_usd",
        )
    return nanos


@post("/v1/gateway/end-users/{end_user_id:str}/credits", status_code=200)
async def top_up(request: Req) -> Response[bytes]:
    """Add prepaid credits. An ``Idempotency-Key`` is required: a retried top-up (same key)
    is applied once and answered as before, with ``idempotent-replayed: true``."""
    rt, tenant = _rt(request), _tenant(request)
    end_user = _end_user(request)
    key = (request.headers.get("idempotency-key") or "").strip()
    if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable():
        raise bad_request(
            "A top-up needs an Idempotency-Key header (1 to 255 printable characters), so a "
            "retried top-up is applied once. Use a new key for each new top-up.",
            code="idempotency_key_required",
        )
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"The body is not valid JSON: {exc}.") from None
    nanos = _amount(body)
    now = rt.clock.now_ms()
    started = time.perf_counter()
    row = LedgerRow(
        id=new_request_id(now),
        ts_ms=now,
        tenant=tenant.name,
        key_fp=str(request.scope["state"].get("gateway_key_fp", "")),
        endpoint="credits",
        requested_model="",
        end_user=end_user,
        credit=nanos,
    )
    try:
        res = await rt.state.top_up(tenant.name, key, row)
    except StateUnavailable as exc:
        raise state_unavailable(str(exc)) from None
    if res.state == "mismatch":
        raise GatewayError(
            422,
            f"Idempotency-Key {key!r} was already used for a top-up of another amount or end "
            f"user (ledger row {res.row_id}); nothing was added. Use a new key for a new top-up.",
            type="invalid_request_error",
            code="idempotency_key_reused",
        )
    row.latency_ms = int((time.perf_counter() - started) * 1000)
    replayed = res.state == "replayed"
    headers = {"idempotent-replayed": "true"} if replayed else {}
    rt.metrics.credits_topped_up(tenant.name, 0 if replayed else nanos)
    return Response(
        content=orjson.dumps(
            {
                "object": "gateway.credit_top_up",
                "id": res.row_id,
                "end_user": end_user,
                "amount_usd": nanos_to_usd(nanos),
                "balance_usd": nanos_to_usd(res.balance),
                "replayed": replayed,
            }
        ),
        status_code=200,
        media_type="application/json",
        headers=headers,
    )


@get("/v1/gateway/end-users/{end_user_id:str}/ledger")
async def end_user_ledger(request: Req) -> Response[bytes]:
    """The end user's ledger rows (calls and top-ups), newest first, paginated."""
    rt, tenant = _rt(request), _tenant(request)
    end_user = _end_user(request)
    qp = request.query_params
    try:
        limit = min(max(int(qp.get("limit", "100")), 1), 1000)
    except ValueError:
        raise bad_request("limit must be an integer.", param="limit") from None
    q = LedgerQuery(tenant=tenant.name, end_user=end_user, limit=limit, cursor=qp.get("cursor"))
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


END_USER_ROUTES = [get_end_user, top_up, end_user_ledger]
