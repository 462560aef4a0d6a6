"""The real OpenAI SDK against the gateway with the built-in mock provider: every
endpoint, sync and async, stream and not."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from openai import AsyncOpenAI, OpenAI
from servers.gateway import Gateway

MSG = [{"role": "user", "content": "Write a tagline for a coffee shop"}]


@pytest.fixture
def gw(make_gateway: Callable[..., Gateway]) -> Gateway:
    return make_gateway()


def test_chat_non_stream(gw: Gateway) -> None:
    client = gw.client("key-1")
    raw = client.chat.completions.with_raw_response.create(model="mock-chat", messages=MSG)
    resp = raw.parse()
    assert raw.status_code == 200
    assert resp.object == "chat.completion"
    assert resp.choices[0].message.content
    assert resp.usage is not None and resp.usage.completion_tokens > 0
    h = raw.headers
    assert h["x-gateway-model"] == "mock-chat"
    assert h["x-gateway-provider"] == "mock"
    assert h["x-gateway-route"] == "direct"
    assert h["x-gateway-request-id"].startswith("req_")
    # cost = prompt * $1/1M + completion * $2/1M, in exact decimal
    expected = resp.usage.prompt_tokens * 1000 + resp.usage.completion_tokens * 2000
    assert h["x-gateway-cost-usd"] == f"0.{expected:09d}"


def test_chat_stream_with_and_without_usage(gw: Gateway) -> None:
    client = gw.client("key-1")
    chunks = list(client.chat.completions.create(model="mock-chat", messages=MSG, stream=True))
    assert chunks and all(c.object == "chat.completion.chunk" for c in chunks)
    assert all(not c.usage for c in chunks), "usage chunk must be stripped when not asked for"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("Mock:")

    chunks = list(
        client.chat.completions.create(
            model="mock-chat", messages=MSG, stream=True, stream_options={"include_usage": True}
        )
    )
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    extra = last.model_extra or {}
    assert extra["x_gateway"]["cost_usd"].startswith("0.")
    assert extra["x_gateway"]["request_id"].startswith("req_")


def test_embeddings_and_models(gw: Gateway) -> None:
    client = gw.client("key-1")
    emb = client.embeddings.create(model="mock-embed", input=["hello", "world"])
    assert len(emb.data) == 2 and len(emb.data[0].embedding) == 256
    assert emb.usage.prompt_tokens > 0
    ids = {m.id for m in client.models.list()}
    assert {"mock-chat", "mock-embed"} <= ids
    assert client.models.retrieve("mock-chat").id == "mock-chat"


async def test_async_client(gw: Gateway) -> None:
    client: AsyncOpenAI = gw.aclient("key-1")
    resp = await client.chat.completions.create(model="mock-chat", messages=MSG)
    assert resp.choices[0].message.content
    stream = await client.chat.completions.create(model="mock-chat", messages=MSG, stream=True)
    parts = [c async for c in stream]
    assert parts[-1].choices[0].finish_reason == "stop"
    emb = await client.embeddings.create(model="mock-embed", input="x")
    assert emb.data[0].embedding
    models = [m.id async for m in client.models.list()]
    assert "mock-chat" in models
    await client.close()


def test_sync_client_reuses_connections(gw: Gateway) -> None:
    client: OpenAI = gw.client("key-1")
    for _ in range(20):
        client.chat.completions.create(model="mock-chat", messages=MSG, max_tokens=5)
    usage = gw.http().get("/v1/gateway/usage", headers={"Authorization": "Bearer key-1"}).json()
    assert usage["tenant"] == "t1"
