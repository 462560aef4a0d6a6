"""Rate limits per tenant (rpm, tpm, concurrent), on both state backends."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
from fake_upstream import FakeUpstream
from servers.configs import directive, gateway_config, policy, tenant
from servers.gateway import Gateway, start_process, write_config

from gateway.clock import ManualClock

MSG = [{"role": "user", "content": "hello"}]
AUTH = {"Authorization": "Bearer key-1"}
# 2026-03-10 12:00:05 UTC: 55 s before the next minute starts
T0 = 1_773_144_005_000


def post(gw: Gateway, key: str = "key-1", **body: Any) -> httpx.Response:
    with httpx.Client(base_url=gw.url, timeout=30) as http:
        return http.post(
            "/v1/chat/completions",
            json={"model": "cheap", "messages": MSG, **body},
            headers={"Authorization": f"Bearer {key}"},
        )


def test_rpm_lets_exactly_the_limit_through(
    make_gateway: Callable[..., Gateway], fake: FakeUpstream, state: dict[str, Any]
) -> None:
    clock = ManualClock(T0)
    gw = make_gateway(
        gateway_config(fake.base_url, **state),
        {"p": policy({"t1": tenant("key-1", limits={"rpm": 5}), "t2": tenant("key-2")})},
        clock=clock,
    )
    statuses = []
    for _ in range(5):
        r = post(gw)
        statuses.append(r.status_code)
        assert r.headers["x-ratelimit-limit-requests"] == "5"
    assert statuses == [200] * 5
    assert r.headers["x-ratelimit-remaining-requests"] == "0"
    assert r.headers["x-ratelimit-reset-requests"] == "55s"
    rejected = post(gw)
    assert rejected.status_code == 429
    err = rejected.json()["error"]
    assert err["code"] == "rate_limit_exceeded" and "5 requests per minute" in err["message"]
    assert rejected.headers["retry-after"] == "55"
    assert fake.calls() == 5, "a rejected request never reaches the upstream"
    assert post(gw, key="key-2").status_code == 200, "tenants are limited separately"
    clock.advance(55_000)  # the next minute
    assert post(gw).status_code == 200


def test_tpm_and_rejections_count_nothing(
    make_gateway: Callable[..., Gateway], fake: FakeUpstream, state: dict[str, Any]
) -> None:
    clock = ManualClock(T0)
    gw = make_gateway(
        gateway_config(fake.base_url, **state),
        {"p": policy({"t1": tenant("key-1", limits={"tpm": 1000, "rpm": 100})})},
        clock=clock,
    )
    first = post(gw, max_tokens=400, **directive(tokens=5))
    assert first.status_code == 200
    # admitted on the estimate (prompt + 400), corrected to the actual usage afterwards
    after_first = int(first.headers["x-ratelimit-remaining-tokens"])
    assert after_first < 600
    big = post(gw, max_tokens=990)
    assert big.status_code == 429 and "tokens per minute" in big.json()["error"]["message"]
    ok = post(gw, max_tokens=100)
    assert ok.status_code == 200
    # the rejected request counted against neither requests nor tokens
    assert int(ok.headers["x-ratelimit-remaining-requests"]) == 98
    remaining = int(ok.headers["x-ratelimit-remaining-tokens"])
    assert remaining > after_first - 200, "the first request's unused tokens were given back"
    too_big = post(gw, max_tokens=5000)
    assert too_big.status_code == 400
    assert too_big.json()["error"]["code"] == "tokens_exceed_tpm"


async def test_concurrent_limit(
    make_gateway: Callable[..., Gateway], fake: FakeUpstream, state: dict[str, Any]
) -> None:
    gw = make_gateway(
        gateway_config(fake.base_url, **state),
        {"p": policy({"t1": tenant("key-1", limits={"concurrent": 2})})},
    )
    client = gw.aclient("key-1")

    async def call(delay: float) -> int:
        try:
            await client.chat.completions.create(
                model="cheap", messages=MSG, extra_body=directive(delay=delay)
            )
        except openai.RateLimitError as exc:
            assert "2 concurrent requests" in exc.message
            return 429
        return 200

    slow = [asyncio.create_task(call(1.0)) for _ in range(2)]
    await asyncio.sleep(0.4)
    assert await call(0) == 429
    assert sorted(await asyncio.gather(*slow)) == [200, 200]
    assert await call(0) == 200  # slots come back when requests finish
    await client.close()


def test_rpm_across_two_gateway_processes(
    tmp_path: Path, fake: FakeUpstream, redis_state: dict[str, Any]
) -> None:
    path = write_config(
        tmp_path,
        gateway_config(fake.base_url, **redis_state),
        {"p": policy({"t1": tenant("key-1", limits={"rpm": 5})})},
    )
    a = start_process(path, log=tmp_path / "a.log")
    b = start_process(path, log=tmp_path / "b.log")
    try:
        # stay inside one rate-limit minute
        if time.time() % 60 > 50:
            time.sleep(61 - time.time() % 60)
        statuses = [post(gw).status_code for _ in range(4) for gw in (a, b)]
        assert statuses.count(200) == 5 and statuses.count(429) == 3
        assert fake.calls() == 5
    finally:
        a.stop()
        b.stop()


def test_a_key_can_have_limits_of_its_own(
    make_gateway: Callable[..., Gateway], fake: FakeUpstream, state: dict[str, Any]
) -> None:
    from servers.configs import key_hash

    clock = ManualClock(T0)
    t1 = tenant("key-1", limits={"rpm": 10})
    t1["keys"].append({"hash": key_hash("key-batch"), "name": "batch-job", "limits": {"rpm": 2}})
    gw = make_gateway(gateway_config(fake.base_url, **state), {"p": policy({"t1": t1})},
                      clock=clock)  # fmt: skip
    batch = [post(gw, key="key-batch") for _ in range(3)]
    assert [r.status_code for r in batch] == [200, 200, 429]
    assert batch[0].headers["x-ratelimit-limit-requests"] == "2"
    assert "this key is limited to 2 requests per minute" in batch[2].json()["error"]["message"]
    # the tenant's other key is not held back by the batch key's limit ...
    main = [post(gw) for _ in range(8)]
    assert [r.status_code for r in main] == [200] * 8
    assert main[0].headers["x-ratelimit-limit-requests"] == "10"
    # ... but both count against the tenant's own limit (2 + 8 = 10)
    assert post(gw).status_code == 429
