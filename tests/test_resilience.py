"""Resilience: fallbacks, retries, the circuit breaker, timeouts and fair capacity,
with faults injected on the fake upstream."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
from fake_upstream import FakeUpstream
from servers.configs import directive, gateway_config, policy, tenant
from servers.gateway import Gateway

MSG = [{"role": "user", "content": "Write a short poem"}]
ADMIN = {"Authorization": "Bearer admin-key"}


def config(fake: FakeUpstream, **provider: Any) -> dict[str, Any]:
    cfg = gateway_config(fake.base_url)
    cfg["models"]["premium"]["fallbacks"] = ["cheap"]
    cfg["providers"]["fake"].update(
        {
            "retries": {
                "max_attempts": 2,
                "backoff_base": 0.05,
                "backoff_max": 0.1,
                "retry_after_max": 5,
            },
            "breaker": {"failure_threshold": 3, "min_requests": 100, "open_seconds": 0.5},
            **provider,
        }
    )
    return cfg


@pytest.fixture
def gw(make_gateway: Callable[..., Gateway], fake: FakeUpstream) -> Gateway:
    return make_gateway(config(fake), {"p": policy({"t1": tenant("key-1")})})


def last_row(gw: Gateway) -> dict[str, Any]:
    with httpx.Client(base_url=gw.url) as http:
        return dict(http.get("/admin/ledger", params={"limit": 1}, headers=ADMIN).json()["data"][0])


def test_5xx_on_premium_falls_back_to_cheap(gw: Gateway, fake: FakeUpstream) -> None:
    fake.script("fake-premium", [{"status": 500}, {"status": 502}])
    raw = gw.client("key-1").chat.completions.with_raw_response.create(
        model="premium", messages=MSG
    )
    assert raw.headers["x-gateway-model"] == "cheap"
    assert raw.headers["x-gateway-route"] == "direct;fallback:premium->cheap"
    assert (fake.calls("fake-premium"), fake.calls("fake-cheap")) == (2, 1)
    row = last_row(gw)
    assert [(a["model"], a["outcome"]) for a in row["attempts"]] == [
        ("premium", "upstream_error"),
        ("premium", "upstream_error"),
        ("cheap", "ok"),
    ]
    usage = raw.parse().usage
    assert usage is not None
    # charged at the price of the model that answered
    assert row["cost"] == usage.prompt_tokens * 1000 + usage.completion_tokens * 2000


def test_429_is_retried_after_retry_after(gw: Gateway, fake: FakeUpstream) -> None:
    fake.script("fake-premium", [{"status": 429, "retry_after": 1}])
    t0 = time.monotonic()
    raw = gw.client("key-1").chat.completions.with_raw_response.create(
        model="premium", messages=MSG
    )
    elapsed = time.monotonic() - t0
    assert raw.headers["x-gateway-model"] == "premium"
    assert fake.calls("fake-premium") == 2
    assert 0.9 < elapsed < 2.5


def test_all_fail_one_clear_error_and_no_charge(gw: Gateway, fake: FakeUpstream) -> None:
    fake.script("fake-premium", [{"status": 503}] * 2)
    fake.script("fake-cheap", [{"status": 500}] * 2)
    with pytest.raises(openai.APIStatusError) as exc:
        gw.client("key-1").chat.completions.create(model="premium", messages=MSG)
    assert exc.value.status_code == 502
    assert "'fake'" in exc.value.message and "cheap" in exc.value.message
    row = last_row(gw)
    assert row["cost"] == 0 and row["status"] == 502 and len(row["attempts"]) == 4


def test_request_errors_do_not_fall_back(gw: Gateway, fake: FakeUpstream) -> None:
    fake.script("fake-premium", [{"status": 400, "error": {"message": "bad tool schema"}}])
    with pytest.raises(openai.BadRequestError) as exc:
        gw.client("key-1").chat.completions.create(model="premium", messages=MSG)
    assert "bad tool schema" in exc.value.message
    assert fake.calls("fake-cheap") == 0 and fake.calls("fake-premium") == 1


def circuit(gw: Gateway, model: str) -> float:
    with httpx.Client(base_url=gw.url) as http:
        for line in http.get("/metrics").text.splitlines():
            if line.startswith("gateway_circuit_state{") and f'model="{model}"' in line:
                return float(line.rsplit(" ", 1)[1])
    return -1


def test_breaker_opens_fails_fast_and_half_opens(
    make_gateway: Callable[..., Gateway], fake: FakeUpstream
) -> None:
    cfg = config(fake, retries={"max_attempts": 1})
    gw = make_gateway(cfg, {"p": policy({"t1": tenant("key-1")})})
    client = gw.client("key-1")
    fake.script("fake-cheap", [{"status": 500}] * 3)
    for _ in range(3):
        with pytest.raises(openai.APIStatusError):
            client.chat.completions.create(model="cheap", messages=MSG)
    assert circuit(gw, "cheap") == 2  # open
    with pytest.raises(openai.APIStatusError) as exc:
        client.chat.completions.create(model="cheap", messages=MSG)
    assert exc.value.status_code == 503 and exc.value.code == "upstream_circuit_open"
    assert fake.calls("fake-cheap") == 3, "no call while the circuit is open"
    # premium falls back over the open circuit of cheap? no: premium is healthy
    assert client.chat.completions.create(model="premium", messages=MSG).choices
    time.sleep(0.6)  # open_seconds: the next call is a probe
    assert client.chat.completions.create(model="cheap", messages=MSG).choices
    assert circuit(gw, "cheap") == 0  # closed again
    fake.script("fake-cheap", [{"status": 500}] * 3)
    for _ in range(3):
        with pytest.raises(openai.APIStatusError):
            client.chat.completions.create(model="cheap", messages=MSG)
    time.sleep(0.6)
    fake.script("fake-cheap", [{"status": 500}])
    with pytest.raises(openai.APIStatusError):  # the probe fails: open again
        client.chat.completions.create(model="cheap", messages=MSG)
    assert circuit(gw, "cheap") == 2


def test_stream_falls_back_only_before_the_first_byte(gw: Gateway, fake: FakeUpstream) -> None:
    client = gw.client("key-1")
    fake.script("fake-premium", [{"status": 500}, {"disconnect_after": 0}])
    raw = client.chat.completions.with_raw_response.create(
        model="premium", messages=MSG, stream=True
    )
    assert raw.headers["x-gateway-model"] == "cheap"
    chunks = list(raw.parse())
    assert chunks[-1].choices[0].finish_reason == "stop"
    fake.reset()
    fake.script("fake-premium", [{"disconnect_after": 4, "tokens": 20}])
    with pytest.raises(openai.APIError) as exc:
        list(client.chat.completions.create(model="premium", messages=MSG, stream=True))
    assert "closed" in exc.value.message or "complete" in exc.value.message
    assert fake.calls("fake-cheap") == 0
    row = last_row(gw)
    assert row["cost"] > 0 and row["completion_tokens"] > 0  # what was consumed


def test_slow_generations_complete(
    make_gateway: Callable[..., Gateway], fake: FakeUpstream
) -> None:
    # A 5-minute stream with a chunk every 10 s, compressed 50x: 30 chunks 0.2 s apart
    # against an idle timeout of 1.2 s (60 s / 50) and a first-byte timeout of 1.2 s.
    cfg = config(fake, timeouts={"connect": 1, "first_byte": 1.2, "idle": 1.2, "non_stream": 12})
    gw = make_gateway(cfg, {"p": policy({"t1": tenant("key-1")})})
    client = gw.client("key-1", timeout=60)
    t0 = time.monotonic()
    chunks = list(
        client.chat.completions.create(
            model="cheap",
            messages=MSG,
            stream=True,
            extra_body=directive(tokens=30, chunk_delay=0.2),
        )
    )
    assert time.monotonic() - t0 > 5.5
    assert chunks[-1].choices[0].finish_reason == "stop"
    # a non-stream generation that takes long (minutes, compressed) completes too
    resp = client.chat.completions.create(
        model="cheap", messages=MSG, extra_body=directive(delay=3)
    )
    assert resp.choices[0].message.content


async def test_fair_capacity_across_tenants(
    make_gateway: Callable[..., Gateway], fake: FakeUpstream
) -> None:
    cfg = config(fake, rpm=600, burst_seconds=1, max_queue_wait=20)  # 10/s, bursts of 10
    gw = make_gateway(cfg, {"p": policy({"a": tenant("key-a"), "b": tenant("key-b")})})
    a, b = gw.aclient("key-a", timeout=60), gw.aclient("key-b", timeout=60)
    t0 = time.monotonic()

    async def call(client: openai.AsyncOpenAI) -> float:
        await client.chat.completions.create(model="cheap", messages=MSG)
        return time.monotonic() - t0

    flood = [asyncio.create_task(call(a)) for _ in range(40)]
    await asyncio.sleep(0.3)
    b_times = await asyncio.gather(*(call(b) for _ in range(5)))
    a_times = await asyncio.gather(*flood)
    print(
        f"\nfairness: tenant A (40 at once) done by {max(a_times):.2f}s; "
        f"tenant B (5, arrived 0.3 s later) done by {max(b_times):.2f}s"
    )
    assert max(a_times) > 3.0  # 40 requests at 10/s
    assert max(b_times) < 1.8  # B was served round-robin, not behind A's queue
    await a.close()
    await b.close()


async def test_capacity_queue_times_out_with_429(
    make_gateway: Callable[..., Gateway], fake: FakeUpstream
) -> None:
    cfg = config(fake, rpm=60, burst_seconds=1, max_queue_wait=0.5)  # 1/s
    gw = make_gateway(cfg, {"p": policy({"t1": tenant("key-1")})})
    client = gw.aclient("key-1")
    results = await asyncio.gather(
        *(client.chat.completions.create(model="cheap", messages=MSG) for _ in range(3)),
        return_exceptions=True,
    )
    errors = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert errors and errors[0].code == "upstream_capacity_exhausted"
    assert int(errors[0].response.headers["retry-after"]) >= 1
    await client.close()
