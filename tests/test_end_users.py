"""End users inside a tenant, end to end with the OpenAI SDK, on both state backends:
prepaid credits that never go below zero, idempotent top-ups, tenant and end-user budgets
enforced together, tenants isolated, end-user ids never in metrics."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest
from fake_upstream import FakeUpstream
from servers.configs import directive, gateway_config, policy, tenant
from servers.gateway import Gateway

from gateway.clock import ManualClock

MSG = [{"role": "user", "content": "Write one line about credits"}]
PREPAID = {"end_users": {"prepaid": True}}


def nanos(usd: str) -> int:
    return int(Decimal(usd) * 1_000_000_000)


def usd(n: int) -> str:
    return str(Decimal(n) / 1_000_000_000)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def top_up(
    gw: Gateway, end_user: str, amount: str, idem: str | None, key: str = "key-1"
) -> httpx.Response:
    headers = auth(key) | ({"Idempotency-Key": idem} if idem else {})
    with httpx.Client(base_url=gw.url, timeout=30) as http:
        return http.post(
            f"/v1/gateway/end-users/{end_user}/credits",
            headers=headers,
            json={"amount_usd": amount},
        )


def end_user(gw: Gateway, eu: str, key: str = "key-1") -> dict[str, Any]:
    with httpx.Client(base_url=gw.url, timeout=30) as http:
        r = http.get(f"/v1/gateway/end-users/{eu}", headers=auth(key))
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def end_user_ledger(gw: Gateway, eu: str, key: str = "key-1") -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    cursor = None
    with httpx.Client(base_url=gw.url, timeout=30) as http:
        while True:
            q: dict[str, Any] = {"limit": 17, **({"cursor": cursor} if cursor else {})}
            page = http.get(f"/v1/gateway/end-users/{eu}/ledger", params=q, headers=auth(key))
            assert page.status_code == 200, page.text
            body = page.json()
            rows.extend(body["data"])
            cursor = body["next_cursor"]
            if not cursor:
                return rows


def worst_case(gw: Gateway) -> int:
    with httpx.Client(base_url=gw.url, timeout=30) as http:
        est = http.post(
            "/v1/gateway/estimate",
            headers=auth("key-1"),
            json={"model": "cheap", "messages": MSG, "max_tokens": 100},
        ).json()
    return nanos(est["reserve_usd"])


async def test_100_concurrent_calls_from_one_end_user_with_a_balance_for_10(
    make_gateway: Callable[..., Gateway], fake: FakeUpstream, state: dict[str, Any]
) -> None:
    """The balance never goes below zero, failed calls cost nothing, and the balance
    equals top-ups minus charges exactly: in the API, the ledger and the headers."""
    gw = make_gateway(
        gateway_config(fake.base_url, **state), {"p": policy({"t1": tenant("key-1", **PREPAID)})}
    )
    worst = worst_case(gw)
    credits = 10 * worst + worst // 3
    assert top_up(gw, "cust-42", usd(credits), "first").status_code == 200
    client = gw.aclient("key-1", timeout=60)
    rng = random.Random(5)

    async def one(i: int) -> tuple[int, int, str]:
        failing = rng.random() < 0.2
        how = directive(
            delay=0.2, tokens=rng.randint(1, 90), **({"status": 500} if failing else {})
        )
        # Half name the end user with the header, half with OpenAI's own user field.
        named: dict[str, Any] = (
            {"extra_headers": {"x-gateway-end-user": "cust-42"}} if i % 2 else {"user": "cust-42"}
        )
        try:
            raw = await client.chat.completions.with_raw_response.create(
                model="cheap", messages=MSG, max_tokens=100, extra_body=how, **named
            )
        except openai.APIStatusError as exc:
            body = exc.body if isinstance(exc.body, dict) else {}
            return exc.status_code, 0, str(body.get("code"))
        return 200, nanos(raw.headers["x-gateway-cost-usd"]), ""

    results = await asyncio.gather(*(one(i) for i in range(100)))
    await client.close()
    statuses = {s for s, _, _ in results}
    assert statuses <= {200, 402, 502}, statuses
    assert {c for s, _, c in results if s == 402} <= {"insufficient_credits"}
    served = [c for s, c, _ in results if s == 200]
    failed = sum(s == 502 for s, _, _ in results)
    assert len(served) + failed >= 10  # 10 worst cases fit at once; failures were admitted
    info = end_user(gw, "cust-42")
    balance = nanos(info["balance_usd"])
    charged = sum(served)
    print(
        f"\n{state['state'].split(':')[0]}: 100 concurrent calls, credits for ~10: "
        f"{len(served)} served, {sum(s == 402 for s, _, _ in results)} refused (402), "
        f"{failed} failed upstream (502, free), "
        f"balance left ${usd(balance)}"
    )
    assert balance >= 0
    assert balance == credits - charged
    assert (info["held_usd"], info["requests_in_flight"]) == ("0.000000000", 0)
    rows = end_user_ledger(gw, "cust-42")
    assert len(rows) == 101  # every call (served, refused, failed) and the top-up
    assert sum(r["credit"] for r in rows) == balance
    assert sum(r["cost"] for r in rows) == charged
    assert sum(r["credit"] for r in rows if r["endpoint"] == "credits") == credits
    assert all(r["cost"] == 0 for r in rows if r["status"] != 200)
    # The end user's spend windows count what it was charged.
    total = next(w for w in info["windows"] if w["window"] == "total")
    assert nanos(total["spent_usd"]) == charged


def test_a_retried_top_up_is_applied_once(
    make_gateway: Callable[..., Gateway], state: dict[str, Any]
) -> None:
    gw = make_gateway(gateway_config(**state), {"p": policy({"t1": tenant("key-1", **PREPAID)})})
    first = top_up(gw, "cust-1", "5.00", "topup-1")
    assert first.status_code == 200 and "idempotent-replayed" not in first.headers
    body = first.json()
    assert (body["balance_usd"], body["amount_usd"], body["replayed"]) == (
        "5.000000000",
        "5.000000000",
        False,
    )
    again = top_up(gw, "cust-1", "5.00", "topup-1")
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    assert (again.json()["id"], again.json()["balance_usd"]) == (body["id"], "5.000000000")
    assert top_up(gw, "cust-1", "5.00", "topup-2").json()["balance_usd"] == "10.000000000"
    # The same key for another amount: refused, nothing added.
    reused = top_up(gw, "cust-1", "7.00", "topup-1")
    assert reused.status_code == 422
    assert reused.json()["error"]["code"] == "idempotency_key_reused"
    # No key: refused with a message saying why.
    missing = top_up(gw, "cust-1", "5.00", None)
    assert missing.status_code == 400
    assert "Idempotency-Key" in missing.json()["error"]["message"]
    for bad in ("0", "-1", "abc", "0.0000000001"):
        r = top_up(gw, "cust-1", bad, f"bad-{uuid.uuid4()}")
        assert r.status_code == 400 and r.json()["error"]["param"] == "amount_usd", bad
    assert end_user(gw, "cust-1")["balance_usd"] == "10.000000000"
    rows = end_user_ledger(gw, "cust-1")
    assert sorted(r["credit_usd"] for r in rows) == ["5.000000000", "5.000000000"]


def test_tenant_and_end_user_budgets_are_both_enforced(
    make_gateway: Callable[..., Gateway], fake: FakeUpstream, state: dict[str, Any]
) -> None:
    probe = make_gateway(gateway_config(fake.base_url, **state))
    worst = worst_case(probe)
    eu_daily = usd(worst + worst // 2)  # one call fits, two do not
    tenant_daily = usd(3 * worst + worst // 2)  # three fit
    gw = make_gateway(
        gateway_config(fake.base_url, **state),
        {
            "p": policy(
                {
                    "t1": tenant(
                        "key-1",
                        budgets={"daily_usd": tenant_daily},
                        end_users={"budgets": {"daily_usd": eu_daily}},
                    )
                }
            )
        },
    )
    client = gw.client("key-1")

    def call(eu: str) -> openai.APIStatusError | None:
        try:
            client.chat.completions.create(
                model="cheap",
                messages=MSG,
                max_tokens=100,
                user=eu,
                extra_body=directive(tokens=100, usage={"prompt_tokens": 100}),
            )
        except openai.APIStatusError as exc:
            return exc
        return None

    assert call("alice") is None
    refused = call("alice")
    assert refused is not None and refused.status_code == 402
    assert refused.response.headers["x-gateway-budget-scope"] == "end_user"
    err = refused.body
    assert isinstance(err, dict) and err["code"] == "budget_exceeded" and err["param"] == "user"
    assert "end user 'alice''s daily budget" in err["message"]
    # Other end users still have their own budgets, until the tenant's runs out.
    assert call("bob") is None and call("carol") is None
    refused = call("dave")
    assert refused is not None and refused.status_code == 402
    assert refused.response.headers["x-gateway-budget-scope"] == "tenant"
    assert "your daily budget" in str(refused.body)
    with httpx.Client(base_url=gw.url) as http:
        text = http.get("/metrics").text
    assert 'gateway_budget_rejections_total{tenant="t1",window="end_user_daily"} 1.0' in text
    assert 'gateway_budget_rejections_total{tenant="t1",window="daily"} 1.0' in text
    # End-user ids never become labels.
    assert "alice" not in text and "dave" not in text


def test_end_users_of_two_tenants_are_separate(
    make_gateway: Callable[..., Gateway], state: dict[str, Any]
) -> None:
    gw = make_gateway(
        gateway_config(**state),
        {"p": policy({"t1": tenant("key-1", **PREPAID), "t2": tenant("key-2", **PREPAID)})},
    )
    assert top_up(gw, "alice", "1.00", "k").status_code == 200
    assert top_up(gw, "alice", "0.50", "k", key="key-2").json()["replayed"] is False
    assert end_user(gw, "alice")["balance_usd"] == "1.000000000"
    assert end_user(gw, "alice", key="key-2")["balance_usd"] == "0.500000000"
    assert end_user(gw, "nobody", key="key-2")["balance_usd"] == "0.000000000"
    gw.client("key-1").chat.completions.create(model="mock-chat", messages=MSG, user="alice")
    assert len(end_user_ledger(gw, "alice")) == 2
    assert len(end_user_ledger(gw, "alice", key="key-2")) == 1
    # An end user with no credits in a prepaid tenant is refused before any upstream call.
    with pytest.raises(openai.APIStatusError) as exc:
        gw.client("key-2").chat.completions.create(model="mock-chat", messages=MSG, user="zoe")
    assert exc.value.status_code == 402
    body = exc.value.body
    assert isinstance(body, dict) and body["code"] == "insufficient_credits"
    assert "end user 'zoe' has a balance of $0.000000000" in body["message"]


def admin_ledger(gw: Gateway, **params: Any) -> httpx.Response:
    with httpx.Client(base_url=gw.url, timeout=30) as http:
        return http.get("/admin/ledger", params=params, headers=auth("admin-key"))


def test_operators_page_through_one_end_users_ledger(
    make_gateway: Callable[..., Gateway], state: dict[str, Any]
) -> None:
    """``/admin/ledger?tenant=&end_user=``: the end user's rows of that tenant only, newest
    first, page by page; the same rows its tenant sees for it."""
    gw = make_gateway(
        gateway_config(**state),
        {"p": policy({"t1": tenant("key-1", **PREPAID), "t2": tenant("key-2", **PREPAID)})},
    )
    assert top_up(gw, "alice", "1.00", "a1").status_code == 200
    assert top_up(gw, "alice", "1.00", "a2", key="key-2").status_code == 200
    assert top_up(gw, "bob", "1.00", "b1").status_code == 200
    for user in ("alice", "bob", "alice"):
        gw.client("key-1").chat.completions.create(model="mock-chat", messages=MSG, user=user)
    rows: list[dict[str, Any]] = []
    cursor = None
    while True:
        page = admin_ledger(
            gw, tenant="t1", end_user="alice", limit=2, **({"cursor": cursor} if cursor else {})
        )
        assert page.status_code == 200, page.text
        rows.extend(page.json()["data"])
        cursor = page.json()["next_cursor"]
        if not cursor:
            break
    assert len(rows) == 3  # a top-up and two calls, not bob's nor t2's
    assert {(r["tenant"], r["end_user"]) for r in rows} == {("t1", "alice")}
    assert [r["id"] for r in rows] == [r["id"] for r in end_user_ledger(gw, "alice")]
    assert rows[0]["time"] >= rows[-1]["time"]


def test_the_admin_ledger_refuses_what_it_cannot_answer(
    make_gateway: Callable[..., Gateway], state: dict[str, Any]
) -> None:
    gw = make_gateway(gateway_config(**state), {"p": policy({"t1": tenant("key-1", **PREPAID)})})
    cases = [
        ({"end_user": "alice"}, "end_user", "end_user needs tenant"),
        ({"tenant": "t1", "end_user": "alice", "model": "x"}, "end_user", "combines only"),
        ({"cursor": "garbage"}, "cursor", "cursor is not one this ledger gave out"),
        ({"tenant": "t1", "end_user": "alice", "cursor": "garbage"}, "cursor", "next_cursor"),
    ]
    for params, param, says in cases:
        r = admin_ledger(gw, **params)
        assert r.status_code == 400, (params, r.text)
        err = r.json()["error"]
        assert err["param"] == param and says in err["message"], (params, err)
    with httpx.Client(base_url=gw.url, timeout=30) as http:
        r = http.get(
            "/v1/gateway/end-users/alice/ledger", params={"cursor": "x:y"}, headers=auth("key-1")
        )
    assert r.status_code == 400 and r.json()["error"]["param"] == "cursor", r.text


def test_end_user_ids_are_validated_and_the_header_wins(
    make_gateway: Callable[..., Gateway],
) -> None:
    gw = make_gateway(
        gateway_config(),
        {"p": policy({"t1": tenant("key-1"), "t2": tenant("key-2", end_users={"required": True})})},
    )
    client = gw.client("key-1")
    for bad in ("has space", "x" * 129, "slash/no"):
        with pytest.raises(openai.BadRequestError) as exc:
            client.chat.completions.create(model="mock-chat", messages=MSG, user=bad)
        body = exc.value.body
        assert isinstance(body, dict) and body["code"] == "invalid_end_user", bad
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(
            model="mock-chat",
            messages=MSG,
            user="fine",
            extra_headers={"x-gateway-end-user": "not fine"},
        )
    assert isinstance(exc.value.body, dict) and exc.value.body["param"] == "x-gateway-end-user"
    client.chat.completions.create(
        model="mock-chat",
        messages=MSG,
        user="from-body",
        extra_headers={"x-gateway-end-user": "from-header@example.com"},
    )
    assert len(end_user_ledger(gw, "from-header@example.com")) == 1
    assert end_user_ledger(gw, "from-body") == []
    # A tenant that requires an end user refuses calls that name none.
    with pytest.raises(openai.BadRequestError) as exc:
        gw.client("key-2").chat.completions.create(model="mock-chat", messages=MSG)
    assert isinstance(exc.value.body, dict) and exc.value.body["code"] == "end_user_required"


def test_end_user_rate_limits_name_the_end_user(make_gateway: Callable[..., Gateway]) -> None:
    gw = make_gateway(
        gateway_config(),
        {"p": policy({"t1": tenant("key-1", end_users={"limits": {"rpm": 2}})})},
        clock=ManualClock(1_773_144_005_000),  # the three calls fall in one minute
    )
    client = gw.client("key-1", max_retries=0)
    for _ in range(2):
        client.chat.completions.create(model="mock-chat", messages=MSG, user="eve")
    with pytest.raises(openai.RateLimitError) as exc:
        client.chat.completions.create(model="mock-chat", messages=MSG, user="eve")
    assert "end user 'eve' is limited to 2 requests per minute" in str(exc.value.body)
    client.chat.completions.create(model="mock-chat", messages=MSG, user="frank")


def test_a_cut_stream_costs_the_end_user_what_it_consumed(
    make_gateway: Callable[..., Gateway], fake: FakeUpstream
) -> None:
    gw = make_gateway(
        gateway_config(fake.base_url), {"p": policy({"t1": tenant("key-1", **PREPAID)})}
    )
    top_up(gw, "cust-9", "1.00", "k")
    with pytest.raises(openai.APIError):
        list(
            gw.client("key-1").chat.completions.create(
                model="cheap",
                messages=MSG,
                stream=True,
                user="cust-9",
                extra_body=directive(tokens=30, disconnect_after=10),
            )
        )
    rows = end_user_ledger(gw, "cust-9")
    cut = next(r for r in rows if r["endpoint"] != "credits")
    assert cut["status"] >= 500 and cut["usage_source"] == "counted"
    assert 0 < cut["cost"] < cut["reserved"] and cut["credit"] == -cut["cost"]
    info = end_user(gw, "cust-9")
    assert nanos(info["balance_usd"]) == 10**9 - cut["cost"]
    assert info["held_usd"] == "0.000000000"
