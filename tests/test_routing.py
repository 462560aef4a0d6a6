"""Routing: rules, aliases, the allow-list and budget-aware downgrade."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fake_upstream import FakeUpstream
from servers.configs import gateway_config, policy, tenant
from servers.gateway import Gateway

ROUTES = {
    "auto": {
        "rules": [
            # images count as 1600 prompt tokens each, so this rule comes before "long"
            {"name": "vision", "when": {"has_images": True}, "use": "premium"},
            {"name": "long", "when": {"prompt_tokens_gt": 200}, "use": "premium"},
            {"name": "big-output", "when": {"max_output_gt": 800}, "use": "premium"},
            {"name": "tools", "when": {"has_tools": True}, "use": "premium"},
            {"name": "json", "when": {"has_response_format": True}, "use": "cheap-alias"},
            {"name": "review", "when": {"task": ["code-review", "legal"]}, "use": "premium"},
            {
                "name": "urgent",
                "when": {"user_message_regex": "(?i)\\burgent\\b"},
                "use": "premium",
            },
            {"name": "vip", "when": {"tenant": "vip"}, "use": "premium"},
            {
                "name": "short-and-small",
                "when": {"prompt_tokens_lte": 50, "max_output_lte": 100},
                "use": "cheap",
            },
        ],
        "default": "cheap",
    }
}
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
IMAGE = [
    {"type": "text", "text": "what is this"},
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
]


@pytest.fixture
def gw(make_gateway: Callable[..., Gateway], fake: FakeUpstream) -> Gateway:
    cfg = gateway_config(fake.base_url, aliases={"cheap-alias": "cheap"})
    return make_gateway(
        cfg,
        {
            "p": policy(
                {
                    "t1": tenant("key-1"),
                    "vip": tenant("key-vip"),
                    "limited": tenant("key-lim", models=["auto", "embed"]),
                },
                ROUTES,
            )
        },
    )


def route_of(
    gw: Gateway, body: dict[str, Any], key: str = "key-1", headers: dict[str, str] | None = None
) -> tuple[str, str]:
    with httpx.Client(base_url=gw.url) as http:
        r = http.post(
            "/v1/gateway/estimate",
            json={"model": "auto", **body},
            headers={"Authorization": f"Bearer {key}", **(headers or {})},
        )
    assert r.status_code == 200, r.text
    return r.json()["model"], r.json()["route"]


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


@pytest.mark.parametrize(
    ("body", "headers", "key", "model", "rule"),
    [
        ({"messages": user("hi"), "max_tokens": 50}, None, "key-1", "cheap", "short-and-small"),
        # no max_tokens: the model's cap (1000) applies, so "small output" does not hold
        ({"messages": user("hi")}, None, "key-1", "cheap", "default"),
        ({"messages": user("hi"), "max_tokens": 500}, None, "key-1", "cheap", "default"),
        ({"messages": user("word " * 400)}, None, "key-1", "premium", "long"),
        ({"messages": user("hi"), "max_tokens": 900}, None, "key-1", "premium", "big-output"),
        ({"messages": user("hi"), "tools": TOOLS}, None, "key-1", "premium", "tools"),
        ({"messages": [{"role": "user", "content": IMAGE}]}, None, "key-1", "premium", "vision"),
        (
            {"messages": user("hi"), "response_format": {"type": "json_object"}},
            None,
            "key-1",
            "cheap",
            "json",
        ),
        ({"messages": user("hi")}, {"x-gateway-task": "code-review"}, "key-1", "premium", "review"),
        (
            {"messages": user("hi"), "metadata": {"task": "legal"}},
            None,
            "key-1",
            "premium",
            "review",
        ),
        (
            {
                "messages": [
                    *user("URGENT: old"),
                    {"role": "assistant", "content": "ok"},
                    *user("this is Urgent"),
                ]
            },
            None,
            "key-1",
            "premium",
            "urgent",
        ),
        (
            {
                "messages": [
                    *user("urgent"),
                    {"role": "assistant", "content": "ok"},
                    *user("calm now"),
                ],
                "max_tokens": 500,
            },
            None,
            "key-1",
            "cheap",
            "default",
        ),
        ({"messages": user("hi"), "max_tokens": 500}, None, "key-vip", "premium", "vip"),
    ],
)
def test_rules_first_match_wins(
    gw: Gateway,
    body: dict[str, Any],
    headers: dict[str, str] | None,
    key: str,
    model: str,
    rule: str,
) -> None:
    got_model, reason = route_of(gw, body, key, headers)
    assert (got_model, reason) == (model, f"auto/{rule}")


def test_route_reaches_headers_and_ledger(gw: Gateway, fake: FakeUpstream) -> None:
    raw = gw.client("key-1").chat.completions.with_raw_response.create(
        model="auto", messages=user("hi"), tools=TOOLS
    )
    assert raw.headers["x-gateway-route"] == "auto/tools"
    assert raw.headers["x-gateway-model"] == "premium"
    assert fake.last_request().body["model"] == "fake-premium"
    with httpx.Client(base_url=gw.url) as http:
        row = http.get("/admin/ledger", headers={"Authorization": "Bearer admin-key"}).json()
    assert row["data"][0]["route"] == "auto/tools" and row["data"][0]["requested_model"] == "auto"
    alias = gw.client("key-1").chat.completions.with_raw_response.create(
        model="cheap-alias", messages=user("hi")
    )
    assert alias.headers["x-gateway-route"] == "alias:cheap-alias"
    assert alias.headers["x-gateway-model"] == "cheap"


def test_allow_list(gw: Gateway) -> None:
    with httpx.Client(base_url=gw.url) as http:
        r = http.post(
            "/v1/chat/completions",
            json={"model": "premium", "messages": user("x")},
            headers={"Authorization": "Bearer key-lim"},
        )
        assert r.status_code == 403
        assert "auto, embed" in r.json()["error"]["message"]
        models = http.get("/v1/models", headers={"Authorization": "Bearer key-lim"}).json()
    assert {m["id"] for m in models["data"]} == {"auto", "embed"}
    # a routed name that is allowed may resolve to any model the operator routes to
    assert route_of(gw, {"messages": user("hi"), "tools": TOOLS}, "key-lim")[0] == "premium"


def test_budget_aware_downgrade(make_gateway: Callable[..., Gateway], fake: FakeUpstream) -> None:
    gw = make_gateway(
        gateway_config(fake.base_url),
        {
            "p": policy(
                {
                    "t1": tenant(
                        "key-1",
                        budgets={"daily_usd": "0.01"},
                        downgrade={"below_share": 0.5, "map": {"premium": "cheap"}},
                    )
                }
            )
        },
    )
    client = gw.client("key-1")
    usage = {"prompt_tokens": 100, "completion_tokens": 100}
    first = client.chat.completions.with_raw_response.create(
        model="premium",
        messages=user("hi"),
        max_tokens=100,
        extra_body={"metadata": {"fake": f'{{"usage": {usage}}}'.replace("'", '"')}},
    )
    assert first.headers["x-gateway-model"] == "premium"  # $0.004 of $0.01 spent: 60% left
    second = client.chat.completions.with_raw_response.create(
        model="premium",
        messages=user("hi"),
        max_tokens=100,
        extra_body={"metadata": {"fake": f'{{"usage": {usage}}}'.replace("'", '"')}},
    )
    assert second.headers["x-gateway-model"] == "premium"  # 60% left when it was routed
    third = client.chat.completions.with_raw_response.create(
        model="premium", messages=user("hi"), max_tokens=100
    )
    assert third.headers["x-gateway-model"] == "cheap"  # 20% left: below half
    assert third.headers["x-gateway-route"] == "direct;downgrade:premium->cheap"
    assert fake.last_request().body["model"] == "fake-cheap"
