"""Idempotency-Key: run once, replay after, wait while in flight, on both backends."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fake_upstream import FakeUpstream
from servers.configs import directive, gateway_config, policy, tenant
from servers.gateway import Gateway, start_process, write_config

MSG = [{"role": "user", "content": "Write a product description"}]


def ledger(gw: Gateway) -> list[dict[str, Any]]:
    with httpx.Client(base_url=gw.url, timeout=30) as http:
        rows = http.get("/admin/ledger", headers={"Authorization": "Bearer admin-key"}).json()
    return list(rows["data"])


@pytest.fixture
def gw(make_gateway: Callable[..., Gateway], fake: FakeUpstream, state: dict[str, Any]) -> Gateway:
    return make_gateway(
        gateway_config(fake.base_url, **state, idempotency={"wait_seconds": 1.5}),
        {"p": policy({"t1": tenant("key-1"), "t2": tenant("key-2")})},
    )


def test_replay_with_the_sdk(gw: Gateway, fake: FakeUpstream) -> None:
    client = gw.client("key-1")
    key = {"Idempotency-Key": f"order-{uuid.uuid4()}"}
    first = client.chat.completions.with_raw_response.create(
        model="cheap", messages=MSG, extra_headers=key
    )
    second = client.chat.completions.with_raw_response.create(
        model="cheap", messages=MSG, extra_headers=key
    )
    assert fake.calls() == 1
    assert "idempotent-replayed" not in first.headers
    assert second.headers["idempotent-replayed"] == "true"
    assert second.parse().model_dump() == first.parse().model_dump()
    assert second.headers["x-gateway-cost-usd"] == "0.000000000"
    assert second.headers["x-gateway-model"] == "cheap"
    rows = ledger(gw)
    replay = next(r for r in rows if r["replay"])
    assert replay["cost"] == 0 and len(rows) == 2


def test_stream_replays_as_a_stream(gw: Gateway, fake: FakeUpstream) -> None:
    client = gw.client("key-1")
    key = {"Idempotency-Key": "stream-1"}
    kw: dict[str, Any] = {
        "model": "cheap",
        "messages": MSG,
        "stream": True,
        "extra_headers": key,
        "stream_options": {"include_usage": True},
    }
    first = [c.model_dump() for c in client.chat.completions.create(**kw)]
    second = [c.model_dump() for c in client.chat.completions.create(**kw)]
    assert fake.calls() == 1
    assert second == first  # every chunk, including the usage chunk


def test_same_key_other_body_is_422(gw: Gateway) -> None:
    client = gw.client("key-1")
    key = {"Idempotency-Key": "k-422"}
    client.chat.completions.create(model="cheap", messages=MSG, extra_headers=key)
    with pytest.raises(openai.UnprocessableEntityError) as exc:
        client.chat.completions.create(
            model="cheap", messages=[{"role": "user", "content": "other"}], extra_headers=key
        )
    assert exc.value.code == "idempotency_key_reused"


def test_failed_first_attempt_releases_the_key(gw: Gateway, fake: FakeUpstream) -> None:
    client = gw.client("key-1")
    key = {"Idempotency-Key": "retry-me"}
    fake.script("fake-cheap", [{"status": 500}])
    with pytest.raises(openai.APIStatusError):
        client.chat.completions.create(model="cheap", messages=MSG, extra_headers=key)
    resp = client.chat.completions.with_raw_response.create(
        model="cheap", messages=MSG, extra_headers=key
    )
    assert resp.status_code == 200 and "idempotent-replayed" not in resp.headers
    assert fake.calls() == 2, "the retry really ran"


async def test_concurrent_duplicate_waits_for_the_first(gw: Gateway, fake: FakeUpstream) -> None:
    client = gw.aclient("key-1")
    key = {"Idempotency-Key": "dup"}

    async def call() -> Any:
        return await client.chat.completions.with_raw_response.create(
            model="cheap", messages=MSG, extra_headers=key, extra_body=directive(delay=0.6)
        )

    a, b = await asyncio.gather(call(), call())
    assert fake.calls() == 1
    assert a.parse().id == b.parse().id
    assert sorted(r.headers.get("idempotent-replayed", "no") for r in (a, b)) == ["no", "true"]
    await client.close()


async def test_bounded_wait_then_409(gw: Gateway, fake: FakeUpstream) -> None:
    client = gw.aclient("key-1")
    key = {"Idempotency-Key": "slow"}
    first = asyncio.create_task(
        client.chat.completions.create(
            model="cheap", messages=MSG, extra_headers=key, extra_body=directive(delay=3)
        )
    )
    await asyncio.sleep(0.3)
    with pytest.raises(openai.ConflictError) as exc:
        await client.chat.completions.create(
            model="cheap", messages=MSG, extra_headers=key, extra_body=directive(delay=3)
        )
    assert exc.value.code == "idempotency_in_progress"
    assert exc.value.response.headers["retry-after"]
    await first
    assert fake.calls() == 1
    await client.close()


def test_keys_are_scoped_to_the_tenant(gw: Gateway, fake: FakeUpstream) -> None:
    key = {"Idempotency-Key": "shared-name"}
    gw.client("key-1").chat.completions.create(model="cheap", messages=MSG, extra_headers=key)
    raw = gw.client("key-2").chat.completions.with_raw_response.create(
        model="cheap", messages=MSG, extra_headers=key
    )
    assert "idempotent-replayed" not in raw.headers
    assert fake.calls() == 2


def test_bad_key_is_rejected(gw: Gateway) -> None:
    with httpx.Client(base_url=gw.url) as http:
        r = http.post(
            "/v1/chat/completions",
            json={"model": "cheap", "messages": MSG},
            headers={"Authorization": "Bearer key-1", "Idempotency-Key": "x" * 300},
        )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_idempotency_key"


def test_embedded_keeps_completed_keys_across_restarts(tmp_path: Path, fake: FakeUpstream) -> None:
    path = write_config(
        tmp_path,
        gateway_config(fake.base_url, state=f"sqlite:///{tmp_path / 'state.db'}"),
        {"p": policy({"t1": tenant("key-1")})},
    )
    key = {"Authorization": "Bearer key-1", "Idempotency-Key": "survives"}
    body = {"model": "cheap", "messages": MSG}
    gw = start_process(path, log=tmp_path / "gw.log")
    try:
        with httpx.Client(base_url=gw.url) as http:
            first = http.post("/v1/chat/completions", json=body, headers=key)
    finally:
        gw.stop()
    gw = start_process(path, log=tmp_path / "gw.log")
    try:
        with httpx.Client(base_url=gw.url) as http:
            again = http.post("/v1/chat/completions", json=body, headers=key)
    finally:
        gw.stop()
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
    assert fake.calls() == 1
