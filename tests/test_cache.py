"""The prompt cache and single-flight, on both backends."""

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

MSG = [{"role": "user", "content": "Summarise the plot of Hamlet"}]


def metric(gw: Gateway, name: str) -> float:
    with httpx.Client(base_url=gw.url) as http:
        text = http.get("/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith((name + "{", name + " "))
    )


def make(
    make_gateway: Callable[..., Gateway], fake: FakeUpstream, state: dict[str, Any], **t1: Any
) -> Gateway:
    return make_gateway(
        gateway_config(fake.base_url, **state),
        {
            "p": policy(
                {
                    "t1": tenant("key-1", **t1),
                    "t2": tenant("key-2"),
                    "s1": tenant("key-s1", cache={"shared": True}),
                    "s2": tenant("key-s2", cache={"shared": True}),
                    # named like the shared entries' scope, but keeps its own
                    "shared": tenant("key-named-shared"),
                }
            )
        },
    )


@pytest.fixture
def gw(make_gateway: Callable[..., Gateway], fake: FakeUpstream, state: dict[str, Any]) -> Gateway:
    return make(make_gateway, fake, state)


def test_deterministic_requests_hit(gw: Gateway, fake: FakeUpstream) -> None:
    client = gw.client("key-1")
    miss = client.chat.completions.with_raw_response.create(
        model="cheap", messages=MSG, temperature=0
    )
    hit = client.chat.completions.with_raw_response.create(
        model="cheap", messages=MSG, temperature=0, user="someone-else"
    )
    assert fake.calls() == 1
    assert miss.headers["x-gateway-cache"] == "miss" and hit.headers["x-gateway-cache"] == "hit"
    assert hit.parse().choices[0].message.content == miss.parse().choices[0].message.content
    assert hit.headers["x-gateway-cost-usd"] == "0.000000000"
    assert metric(gw, "gateway_cache_hits_total") == 1
    saved = metric(gw, "gateway_cache_saved_usd_total")
    assert abs(saved - float(miss.headers["x-gateway-cost-usd"])) < 1e-12


def test_creative_requests_are_not_cached(gw: Gateway, fake: FakeUpstream) -> None:
    client = gw.client("key-1")
    for temperature in (None, 0.7, 0.7):
        kw = {} if temperature is None else {"temperature": temperature}
        raw = client.chat.completions.with_raw_response.create(model="cheap", messages=MSG, **kw)
        assert raw.headers["x-gateway-cache"] == "bypass"
    assert fake.calls() == 3


def test_embeddings_are_cached(gw: Gateway, fake: FakeUpstream) -> None:
    client = gw.client("key-1")
    a = client.embeddings.create(model="embed", input=["one", "two"])
    b = client.embeddings.with_raw_response.create(model="embed", input=["one", "two"])
    assert fake.calls() == 1 and b.headers["x-gateway-cache"] == "hit"
    assert b.parse().data[1].embedding == a.data[1].embedding


def test_cache_control(gw: Gateway, fake: FakeUpstream) -> None:
    client = gw.client("key-1")
    kw: dict[str, Any] = {"model": "cheap", "messages": MSG, "temperature": 0}
    r = client.chat.completions.with_raw_response.create(
        **kw, extra_headers={"Cache-Control": "no-store"}
    )
    assert r.headers["x-gateway-cache"] == "miss"
    r = client.chat.completions.with_raw_response.create(
        **kw, extra_headers={"Cache-Control": "no-cache"}
    )
    assert r.headers["x-gateway-cache"] == "bypass"  # did not read; no-store did not write
    assert fake.calls() == 2
    r = client.chat.completions.with_raw_response.create(**kw)
    assert r.headers["x-gateway-cache"] == "hit"  # the no-cache request stored its answer
    assert fake.calls() == 2


def test_stream_and_non_stream_share_entries(gw: Gateway, fake: FakeUpstream) -> None:
    client = gw.client("key-1")
    kw: dict[str, Any] = {"model": "cheap", "temperature": 0, "tools": None}
    kw.pop("tools")
    streamed = list(client.chat.completions.create(messages=MSG, stream=True, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    hit = client.chat.completions.with_raw_response.create(messages=MSG, **kw)
    assert hit.headers["x-gateway-cache"] == "hit"
    assert hit.parse().choices[0].message.content == text
    other = [{"role": "user", "content": "Summarise Macbeth"}]
    full = client.chat.completions.create(messages=other, **kw)
    chunks = list(
        client.chat.completions.create(
            messages=other, stream=True, stream_options={"include_usage": True}, **kw
        )
    )
    assert fake.calls() == 2
    replayed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert replayed == full.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0
    assert (chunks[-1].model_extra or {})["x_gateway"]["cost_usd"] == "0.000000000"


async def test_single_flight(gw: Gateway, fake: FakeUpstream) -> None:
    client = gw.aclient("key-1")

    async def call(stream: bool) -> str:
        if stream:
            s = await client.chat.completions.create(
                model="cheap",
                messages=MSG,
                temperature=0,
                stream=True,
                extra_body=directive(delay=0.5),
            )
            return "".join([c.choices[0].delta.content or "" async for c in s if c.choices])
        r = await client.chat.completions.create(
            model="cheap", messages=MSG, temperature=0, extra_body=directive(delay=0.5)
        )
        return r.choices[0].message.content or ""

    answers = await asyncio.gather(*(call(i % 4 == 0) for i in range(20)))
    assert fake.calls() == 1, "20 concurrent identical requests make one upstream call"
    assert len(set(answers)) == 1 and answers[0]
    await client.close()


def test_tenants_are_isolated_unless_shared(gw: Gateway, fake: FakeUpstream) -> None:
    kw: dict[str, Any] = {"model": "cheap", "messages": MSG, "temperature": 0}
    gw.client("key-1").chat.completions.create(**kw)
    r = gw.client("key-2").chat.completions.with_raw_response.create(**kw)
    assert r.headers["x-gateway-cache"] == "miss"
    assert fake.calls() == 2
    gw.client("key-s1").chat.completions.create(**kw)
    r = gw.client("key-s2").chat.completions.with_raw_response.create(**kw)
    assert r.headers["x-gateway-cache"] == "hit"
    assert fake.calls() == 3
    r = gw.client("key-named-shared").chat.completions.with_raw_response.create(**kw)
    assert r.headers["x-gateway-cache"] == "miss", "a tenant named 'shared' is not the pool"
    assert fake.calls() == 4


def test_failures_are_not_cached(gw: Gateway, fake: FakeUpstream) -> None:
    client = gw.client("key-1")
    fake.script("fake-cheap", [{"status": 500}])
    with pytest.raises(openai.APIStatusError):
        client.chat.completions.create(model="cheap", messages=MSG, temperature=0)
    r = client.chat.completions.with_raw_response.create(model="cheap", messages=MSG, temperature=0)
    assert r.headers["x-gateway-cache"] == "miss" and fake.calls() == 2


@pytest.mark.parametrize(
    ("cache", "temperature", "expected"),
    [({"mode": "off"}, 0, "off"), ({"mode": "always"}, 1.0, "hit")],
)
def test_modes(
    make_gateway: Callable[..., Gateway],
    fake: FakeUpstream,
    state: dict[str, Any],
    cache: dict[str, Any],
    temperature: float,
    expected: str,
) -> None:
    gw = make(make_gateway, fake, state, cache=cache)
    client = gw.client("key-1")
    for _ in range(2):
        r = client.chat.completions.with_raw_response.create(
            model="cheap", messages=MSG, temperature=temperature
        )
    assert r.headers["x-gateway-cache"] == expected


def test_hit_charge(
    make_gateway: Callable[..., Gateway], fake: FakeUpstream, state: dict[str, Any]
) -> None:
    gw = make(make_gateway, fake, state, cache={"hit_charge": "0.5"})
    client = gw.client("key-1")
    kw: dict[str, Any] = {"model": "cheap", "messages": MSG, "temperature": 0}
    miss = client.chat.completions.with_raw_response.create(**kw)
    hit = client.chat.completions.with_raw_response.create(**kw)
    full = int(miss.headers["x-gateway-cost-usd"].replace(".", ""))
    half = int(hit.headers["x-gateway-cost-usd"].replace(".", ""))
    assert half == full // 2


def test_a_refused_miss_ends_its_single_flight(
    make_gateway: Callable[..., Gateway], fake: FakeUpstream, state: dict[str, Any]
) -> None:
    # The miss is admitted in the lookup's call; refused there, it must still give up the
    # single flight, or the next identical request would wait for an answer never coming.
    gw = make(make_gateway, fake, state, budgets={"daily_usd": "0.000001"})
    client = gw.client("key-1")
    for _ in range(2):
        t0 = time.perf_counter()
        with pytest.raises(openai.APIStatusError) as refused:
            client.chat.completions.create(model="cheap", messages=MSG, temperature=0)
        assert refused.value.status_code == 402
        assert refused.value.response.headers["x-gateway-cache"] == "miss"
        assert time.perf_counter() - t0 < 5, "waited for a single flight that had ended"
    assert fake.calls() == 0
