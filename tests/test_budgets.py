"""Budgets and the ledger, end to end: reserve, settle, never overspend, never lose a
charge (embedded state; the Redis variants are in test_budgets_redis.py)."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fake_upstream import FakeUpstream
from servers.configs import directive, gateway_config, policy, tenant
from servers.gateway import Gateway, start_process, write_config

from gateway.cli import main as cli_main
from gateway.clock import ManualClock

MSG = [{"role": "user", "content": "Write one line about budgets"}]
ADMIN = {"Authorization": "Bearer admin-key"}
AUTH = {"Authorization": "Bearer key-1"}


def nanos(usd: str) -> int:
    return int(Decimal(usd) * 1_000_000_000)


def ledger(gw: Gateway, **params: Any) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    cursor = None
    with httpx.Client(base_url=gw.url, timeout=30) as http:
        while True:
            q = {**params, "limit": 500, **({"cursor": cursor} if cursor else {})}
            page = http.get("/admin/ledger", params=q, headers=ADMIN).json()
            rows.extend(page["data"])
            cursor = page["next_cursor"]
            if not cursor:
                return rows


def usage(gw: Gateway, key: str = "key-1") -> dict[str, Any]:
    with httpx.Client(base_url=gw.url, timeout=30) as http:
        body = http.get("/v1/gateway/usage", headers={"Authorization": f"Bearer {key}"}).json()
    return {w["window"]: w for w in body["windows"]}


def prometheus_cost(gw: Gateway, tenant_name: str = "t1") -> Decimal:
    with httpx.Client(base_url=gw.url, timeout=30) as http:
        text = http.get("/metrics").text
    total = Decimal(0)
    for line in text.splitlines():
        if line.startswith("gateway_cost_usd_total{") and f'tenant="{tenant_name}"' in line:
            total += Decimal(line.rsplit(" ", 1)[1])
    return total


def test_rejected_before_any_upstream_call(
    make_gateway: Callable[..., Gateway], fake: FakeUpstream
) -> None:
    gw = make_gateway(
        gateway_config(fake.base_url),
        {"p": policy({"t1": tenant("key-1", budgets={"daily_usd": "0.0001"})})},
    )
    with pytest.raises(openai.APIStatusError) as exc:
        gw.client("key-1").chat.completions.create(model="premium", messages=MSG, max_tokens=900)
    assert exc.value.status_code == 402
    err = exc.value.body
    assert isinstance(err, dict) and err["code"] == "budget_exceeded"
    msg = err["message"]
    assert "daily budget of $0.000100000" in msg
    assert "$0.000000000 spent" in msg and "reserved" in msg
    assert re.search(r"resets at \d{4}-\d\d-\d\dT00:00:00Z", msg)
    assert fake.calls() == 0
    # the rejection is on the ledger at cost 0
    (row,) = ledger(gw)
    assert row["status"] == 402 and row["error_code"] == "budget_exceeded" and row["cost"] == 0


def budget_for_20(worst: int) -> tuple[int, str]:
    """A daily limit that fits about 20 worst cases: (nanos, USD string)."""
    limit = worst * 20 + worst // 2
    return limit, str(Decimal(limit) / 1_000_000_000)


async def hammer(gateways: list[Gateway], worst: int, limit: int, label: str) -> None:
    """200 concurrent requests spread over ``gateways`` sharing one budget of ``limit``:
    not one nano-dollar over, and headers = usage = ledger."""
    clients = [gw.aclient("key-1", timeout=60) for gw in gateways]

    async def one(i: int) -> tuple[int, int]:
        try:
            raw = await clients[i % len(clients)].chat.completions.with_raw_response.create(
                model="cheap",
                messages=[{"role": "user", "content": f"line {i}"}],
                max_tokens=100,
                extra_body=directive(delay=0.3, tokens=60),
            )
        except openai.APIStatusError as exc:
            return exc.status_code, 0
        return 200, nanos(raw.headers["x-gateway-cost-usd"])

    t0 = time.monotonic()
    results = await asyncio.gather(*(one(i) for i in range(200)))
    elapsed = time.monotonic() - t0
    for c in clients:
        await c.close()
    ok = [c for s, c in results if s == 200]
    assert {s for s, _ in results} <= {200, 402}
    spent = nanos(usage(gateways[0])["daily"]["spent_usd"])
    assert all(nanos(usage(gw)["daily"]["spent_usd"]) == spent for gw in gateways)
    rows = ledger(gateways[0])
    print(
        f"\n{label}: 200 concurrent, budget ${Decimal(limit) / 10**9} "
        f"(~{limit // worst} worst cases): {len(ok)} served, {200 - len(ok)} rejected (402), "
        f"spent {spent / limit:.1%} of the limit, {elapsed:.2f}s"
    )
    assert spent <= limit, "overspent"
    assert len(ok) >= 20
    assert spent == sum(ok) == sum(r["cost"] for r in rows)
    assert len(rows) == 200


async def test_concurrency_never_overspends(
    make_gateway: Callable[..., Gateway], fake: FakeUpstream
) -> None:
    # worst case per request: (ceil(prompt*1.1)+16) * $1/1M + 100 * $2/1M; ~20 fit.
    probe = make_gateway(gateway_config(fake.base_url), {"p": policy({"t1": tenant("key-1")})})
    est = (
        probe.http()
        .post(
            "/v1/gateway/estimate",
            json={"model": "cheap", "messages": MSG, "max_tokens": 100},
            headers=AUTH,
        )
        .json()
    )
    worst = nanos(est["reserve_usd"])
    limit, limit_usd = budget_for_20(worst)
    gw = make_gateway(
        gateway_config(fake.base_url),
        {"p": policy({"t1": tenant("key-1", budgets={"daily_usd": limit_usd})})},
    )
    await hammer([gw], worst, limit, "embedded")


def test_reconciliation_after_a_mixed_run(
    make_gateway: Callable[..., Gateway], fake: FakeUpstream
) -> None:
    gw = make_gateway(gateway_config(fake.base_url), {"p": policy({"t1": tenant("key-1")})})
    client = gw.client("key-1")
    seen = 0  # nano-dollars the client was told (headers and final usage chunks)
    for i in range(4):
        raw = client.chat.completions.with_raw_response.create(
            model="cheap" if i % 2 else "premium",
            messages=[{"role": "user", "content": f"n{i}"}],
            extra_body=directive(cached_tokens=3, reasoning_tokens=2),
        )
        seen += nanos(raw.headers["x-gateway-cost-usd"])
    for i in range(3):  # streams that report usage to the client
        chunks = list(
            client.chat.completions.create(
                model="cheap",
                messages=[{"role": "user", "content": f"s{i}"}],
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        seen += nanos((chunks[-1].model_extra or {})["x_gateway"]["cost_usd"])
    for directive_kw in ({"status": 500}, {"malformed": True}):  # failures cost nothing
        with pytest.raises(openai.APIStatusError):
            client.chat.completions.create(
                model="cheap", messages=MSG, extra_body=directive(**directive_kw)
            )
    with pytest.raises(openai.APIError):  # cut mid-stream: charged for what was consumed
        list(
            client.chat.completions.create(
                model="cheap",
                messages=MSG,
                stream=True,
                stream_options={"include_usage": True},
                extra_body=directive(tokens=30, disconnect_after=10),
            )
        )
    embed = client.embeddings.with_raw_response.create(model="embed", input=["a", "b"])
    seen += nanos(embed.headers["x-gateway-cost-usd"])

    rows = ledger(gw)
    cut = [r for r in rows if r["stream"] and r["status"] >= 500]
    assert len(cut) == 1 and cut[0]["cost"] > 0 and cut[0]["usage_source"] == "counted"
    failed = [r for r in rows if not r["stream"] and r["status"] >= 500]
    assert len(failed) == 2 and all(r["cost"] == 0 for r in failed)
    ledger_total = sum(r["cost"] for r in rows)
    assert ledger_total == seen + cut[0]["cost"]
    assert nanos(usage(gw)["total"]["spent_usd"]) == ledger_total
    time.sleep(0.05)
    assert prometheus_cost(gw) == Decimal(ledger_total) / 10**9


def test_cached_and_reasoning_tokens_are_priced(
    make_gateway: Callable[..., Gateway], fake: FakeUpstream
) -> None:
    gw = make_gateway(gateway_config(fake.base_url), {"p": policy({"t1": tenant("key-1")})})
    raw = gw.client("key-1").chat.completions.with_raw_response.create(
        model="premium",
        messages=MSG,
        extra_body=directive(
            usage={
                "prompt_tokens": 1000,
                "completion_tokens": 300,
                "cached_tokens": 400,
                "reasoning_tokens": 100,
            }
        ),
    )
    # premium: $10 input, $5 cached input, $30 output per 1M tokens
    assert raw.headers["x-gateway-cost-usd"] == "0.017000000"  # 600*10 + 400*5 + 300*30
    (row,) = ledger(gw)
    assert (
        row["prompt_tokens"],
        row["cached_tokens"],
        row["completion_tokens"],
        row["reasoning_tokens"],
    ) == (1000, 400, 300, 100)


def test_clamp_lowers_max_tokens(make_gateway: Callable[..., Gateway], fake: FakeUpstream) -> None:
    gw = make_gateway(
        gateway_config(fake.base_url),
        {
            "p": policy(
                {
                    "t1": tenant(
                        "key-1",
                        budgets={"daily_usd": "0.002"},
                        on_budget_exceeded="clamp",
                        clamp_min_tokens=50,
                    )
                }
            )
        },
    )
    raw = gw.client("key-1").chat.completions.with_raw_response.create(
        model="cheap", messages=MSG, max_tokens=5000
    )
    sent = fake.last_request().body["max_tokens"]
    assert 50 <= sent < 1000  # $0.002 covers fewer than 1000 output tokens at $2/1M
    assert f"clamp:max_tokens={sent}" in raw.headers["x-gateway-route"]


def test_window_rollover(make_gateway: Callable[..., Gateway], fake: FakeUpstream) -> None:
    # 2026-01-31 23:59:00 UTC
    clock = ManualClock(1_769_903_940_000)
    gw = make_gateway(
        gateway_config(fake.base_url),
        {"p": policy({"t1": tenant("key-1", budgets={"daily_usd": 1, "monthly_usd": 2})})},
        clock=clock,
    )
    client = gw.client("key-1")
    client.chat.completions.create(model="cheap", messages=MSG)
    before = usage(gw)
    assert before["daily"]["resets_at"] == "2026-02-01T00:00:00Z"
    assert before["monthly"]["resets_at"] == "2026-02-01T00:00:00Z"
    spent = nanos(before["daily"]["spent_usd"])
    assert spent > 0 and nanos(before["monthly"]["spent_usd"]) == spent
    clock.advance(120_000)  # past midnight and into February
    after = usage(gw)
    assert nanos(after["daily"]["spent_usd"]) == 0
    assert nanos(after["monthly"]["spent_usd"]) == 0
    assert nanos(after["total"]["spent_usd"]) == spent
    assert after["daily"]["resets_at"] == "2026-02-02T00:00:00Z"
    assert after["monthly"]["resets_at"] == "2026-03-01T00:00:00Z"
    client.chat.completions.create(model="cheap", messages=MSG)
    clock.advance(86_400_000)  # Feb 2: daily resets, monthly keeps February's spend
    later = usage(gw)
    assert nanos(later["daily"]["spent_usd"]) == 0
    assert nanos(later["monthly"]["spent_usd"]) > 0


def test_usage_estimate_and_admin(make_gateway: Callable[..., Gateway], fake: FakeUpstream) -> None:
    gw = make_gateway(
        gateway_config(fake.base_url),
        {"p": policy({"t1": tenant("key-1", budgets={"daily_usd": 1}), "t2": tenant("key-2")})},
    )
    http = gw.http()
    est = http.post(
        "/v1/gateway/estimate",
        json={"model": "premium", "messages": MSG, "max_tokens": 10},
        headers=AUTH,
    ).json()
    assert est["model"] == "premium" and est["max_output_tokens"] == 10
    assert est["fits"] is True and "output tokens" in est["explanation"]
    expected = (est["prompt_tokens_reserved"] * 10 + 10 * 30) * 1000
    assert nanos(est["reserve_usd"]) == expected
    assert fake.calls() == 0
    for i in range(3):
        gw.client("key-1").chat.completions.create(model="cheap", messages=MSG, user=f"u{i}")
    gw.client("key-2").chat.completions.create(model="premium", messages=MSG)
    t1 = http.get("/admin/tenants/t1/usage", headers=ADMIN).json()
    assert t1["tenant"] == "t1" and t1["windows"][0]["limit_usd"] == "1.000000000"
    assert http.get("/admin/tenants/t1/usage", headers=AUTH).status_code == 401
    assert http.get("/admin/tenants/zzz/usage", headers=ADMIN).status_code == 404
    rows = ledger(gw, tenant="t1")
    assert len(rows) == 3 and {r["end_user"] for r in rows} == {"u0", "u1", "u2"}
    page = http.get("/admin/ledger", params={"limit": 2}, headers=ADMIN).json()
    assert len(page["data"]) == 2 and page["has_more"]
    nxt = http.get(
        "/admin/ledger", params={"limit": 2, "cursor": page["next_cursor"]}, headers=ADMIN
    ).json()
    ids = [r["id"] for r in page["data"] + nxt["data"]]
    assert len(set(ids)) == 4 and not nxt["has_more"]
    assert [r["model"] for r in ledger(gw, model="premium")] == ["premium"]
    row = rows[0]
    for field in (
        "id",
        "ts_ms",
        "tenant",
        "key_fp",
        "requested_model",
        "model",
        "provider",
        "route",
        "prompt_tokens",
        "cached_tokens",
        "completion_tokens",
        "reasoning_tokens",
        "cost",
        "cache",
        "replay",
        "status",
        "error_code",
        "latency_ms",
        "attempts",
    ):
        assert field in row
    assert "key-1" not in json.dumps(rows)


def _load(gw: Gateway, stop: threading.Event, done: list[str], n_threads: int = 6) -> None:
    def worker() -> None:
        with httpx.Client(base_url=gw.url, timeout=10) as http:
            while not stop.is_set():
                try:
                    r = http.post(
                        "/v1/chat/completions",
                        headers=AUTH,
                        json={"model": "cheap", "messages": MSG},
                    )
                except httpx.HTTPError:
                    continue
                if r.status_code == 200:
                    done.append(r.headers["x-gateway-request-id"])

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(n_threads)]
    for t in threads:
        t.start()


def test_kill_9_loses_no_completed_request(
    tmp_path: Path, fake: FakeUpstream, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "ledger.db"
    cfg = gateway_config(fake.base_url, state=f"sqlite:///{db}")
    path = write_config(tmp_path, cfg, {"p": policy({"t1": tenant("key-1")})})
    gw = start_process(path, log=tmp_path / "gw.log")
    stop = threading.Event()
    done: list[str] = []
    try:
        _load(gw, stop, done)
        deadline = time.monotonic() + 20
        while len(done) < 300 and time.monotonic() < deadline:
            time.sleep(0.05)
        gw.kill9()  # in the middle of the load
        completed = set(done)
    finally:
        stop.set()
        gw.stop()
    time.sleep(0.2)
    assert len(completed) >= 300
    gw2 = start_process(path, log=tmp_path / "gw.log")
    try:
        rows = ledger(gw2)
        ids = {r["id"] for r in rows}
        missing = completed - ids
        assert not missing, f"{len(missing)} completed requests missing from the ledger"
        assert nanos(usage(gw2)["total"]["spent_usd"]) == sum(r["cost"] for r in rows)
        print(
            f"\nkill -9: {len(completed)} completed before the kill, all on the ledger "
            f"({len(rows)} rows incl. requests in flight at the kill)"
        )
    finally:
        gw2.stop()
    # the CLI reads the same ledger
    capsys.readouterr()
    assert cli_main(["usage", "--config", str(path), "--by", "model", "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out[0]["model"] == "cheap" and out[0]["requests"] == len(rows)
