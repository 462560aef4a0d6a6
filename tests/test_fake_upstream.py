"""The fake upstream itself, exercised with a plain aiohttp client: OpenAI shapes, the
behaviour directives, scripts, the control API and the thread runner."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from fake_upstream import Behaviour, DirectiveError, FakeUpstream, answers, tokens

KEY = "sk-provider-key-123456"
HELLO = [{"role": "user", "content": "Say hello"}]


@pytest.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream(api_key=KEY) as f:
        yield f


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as s:
        yield s


async def chat(
    http: aiohttp.ClientSession, fake: FakeUpstream, **body: Any
) -> tuple[int, dict[str, Any]]:
    body.setdefault("model", "gpt-4o-mini")
    body.setdefault("messages", HELLO)
    async with http.post(fake.base_url + "/chat/completions", json=body) as resp:
        return resp.status, await resp.json()


async def stream(http: aiohttp.ClientSession, fake: FakeUpstream, **body: Any) -> list[Any]:
    """The data of each SSE event: parsed JSON, or the raw text when it is not JSON."""
    body.setdefault("model", "gpt-4o-mini")
    body.setdefault("messages", HELLO)
    body["stream"] = True
    async with http.post(fake.base_url + "/chat/completions", json=body) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        text = await resp.text()
    return [_data(event) for event in text.split("\n\n") if event]


def _data(event: str) -> Any:
    assert event.startswith("data: ")
    data = event.removeprefix("data: ")
    try:
        return json.loads(data)
    except ValueError:
        return data


def content(events: list[Any]) -> str:
    return "".join(
        e["choices"][0]["delta"].get("content") or ""
        for e in events
        if isinstance(e, dict) and e.get("choices")
    )


# -- answers -----------------------------------------------------------------------------
async def test_chat_completion_has_openai_shape(fake, http) -> None:
    status, body = await chat(http, fake)
    assert status == 200
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert isinstance(body["created"], int)
    assert body["model"] == "gpt-4o-mini"
    assert body["system_fingerprint"].startswith("fp_")
    (choice,) = body["choices"]
    assert choice["index"] == 0
    assert choice["finish_reason"] == "stop"
    assert choice["logprobs"] is None
    message = choice["message"]
    assert message["role"] == "assistant"
    assert message["refusal"] is None
    words = message["content"].split()
    assert answers.MIN_WORDS <= len(words) < answers.MIN_WORDS + answers.MORE_WORDS
    usage = body["usage"]
    assert usage["completion_tokens"] == len(words)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == 0
    assert usage["completion_tokens_details"]["reasoning_tokens"] == 0
    assert "x_fake_extra" not in body


async def test_answers_are_deterministic_per_messages(fake, http) -> None:
    _, a = await chat(http, fake)
    _, b = await chat(http, fake, model="gpt-4o")
    _, c = await chat(http, fake, messages=[{"role": "user", "content": "Something else"}])
    text = a["choices"][0]["message"]["content"]
    assert b["choices"][0]["message"]["content"] == text
    assert c["choices"][0]["message"]["content"] != text
    assert a["id"] != b["id"]  # every call is a new completion
    assert b["model"] == "gpt-4o"


def test_words_are_one_token_each() -> None:
    if not tokens.load():
        pytest.skip("tiktoken's o200k_base is not available")
    for word in answers._WORDS:
        assert tokens.count(word) == 1, word
        assert tokens.count(" " + word) == 1, word


async def test_usage_counts_prompt_with_tiktoken(fake, http) -> None:
    if not tokens.load():
        pytest.skip("tiktoken's o200k_base is not available")
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is the capital of France?", "name": "ann"},
    ]
    _, body = await chat(http, fake, messages=messages)
    texts = ["system", "You are terse.", "user", "What is the capital of France?", "ann"]
    expected = 3 + 3 * 2 + 1 + sum(tokens.count(t) for t in texts)
    assert body["usage"]["prompt_tokens"] == expected
    assert body["usage"]["completion_tokens"] == tokens.count(
        body["choices"][0]["message"]["content"]
    )


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
async def test_max_tokens_cuts_the_answer(fake, http, field) -> None:
    _, body = await chat(http, fake, **{field: 2, "metadata": {"fake": {"tokens": 9}}})
    assert body["choices"][0]["finish_reason"] == "length"
    assert len(body["choices"][0]["message"]["content"].split()) == 2
    assert body["usage"]["completion_tokens"] == 2


async def test_tokens_directive_and_n_choices(fake, http) -> None:
    _, body = await chat(http, fake, n=2, metadata={"fake": {"tokens": 7}})
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert all(len(c["message"]["content"].split()) == 7 for c in body["choices"])
    assert body["usage"]["completion_tokens"] == 14


async def test_stream_without_include_usage(fake, http) -> None:
    _, whole = await chat(http, fake)
    events = await stream(http, fake)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all("usage" not in c for c in chunks)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
    assert chunks[-1]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert content(events) == whole["choices"][0]["message"]["content"]
    # one chunk per completion token, between the role chunk and the finish chunk
    assert len(chunks) - 2 == whole["usage"]["completion_tokens"]


async def test_stream_with_include_usage_ends_like_openai(fake, http) -> None:
    events = await stream(http, fake, stream_options={"include_usage": True})
    assert events[-1] == "[DONE]"
    *chunks, last = events[:-1]
    assert all(c["usage"] is None for c in chunks)
    assert last["choices"] == []
    assert last["usage"]["completion_tokens"] == len(chunks) - 2
    assert last["usage"]["total_tokens"] == (
        last["usage"]["prompt_tokens"] + last["usage"]["completion_tokens"]
    )


async def test_stream_options_without_stream_is_rejected(fake, http) -> None:
    status, body = await chat(http, fake, stream_options={"include_usage": True})
    assert status == 400
    assert body["error"]["param"] == "stream_options"


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
            },
        },
    },
    {"type": "function", "function": {"name": "get_time", "parameters": {}}},
]


async def test_tools_produce_a_tool_call(fake, http) -> None:
    _, body = await chat(http, fake, tools=TOOLS)
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function"
    assert call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "fake", "unit": "c"}

    named = {"type": "function", "function": {"name": "get_time"}}
    _, body = await chat(http, fake, tools=TOOLS, tool_choice=named)
    assert body["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_time"

    _, body = await chat(http, fake, tools=TOOLS, tool_choice="none")
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["choices"][0]["message"]["content"]


async def test_tool_call_stream(fake, http) -> None:
    events = await stream(http, fake, tools=TOOLS)
    chunks = events[:-1]
    first = chunks[0]["choices"][0]["delta"]["tool_calls"][0]
    assert first["function"] == {"name": "get_weather", "arguments": ""}
    arguments = "".join(
        c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"] for c in chunks[1:-1]
    )
    assert json.loads(arguments) == {"city": "fake", "unit": "c"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


async def test_logprobs(fake, http) -> None:
    _, body = await chat(http, fake, logprobs=True, top_logprobs=3)
    choice = body["choices"][0]
    entries = choice["logprobs"]["content"]
    assert "".join(e["token"] for e in entries) == choice["message"]["content"]
    for e in entries:
        assert e["logprob"] <= 0
        assert bytes(e["bytes"]).decode() == e["token"]
        assert len(e["top_logprobs"]) == 3
        assert e["top_logprobs"][0]["token"] == e["token"]
    events = await stream(http, fake, logprobs=True)
    assert events[1]["choices"][0]["logprobs"]["content"][0]["token"] == entries[0]["token"]


async def test_extra_unknown_fields(fake, http) -> None:
    _, body = await chat(http, fake, metadata={"fake": {"extra": True}})
    assert body["x_fake_extra"] == {"nested": True}
    events = await stream(http, fake, metadata={"fake": {"extra": {"x_other": [1, 2]}}})
    assert all(e["x_other"] == [1, 2] for e in events[:-1])


async def test_models(fake, http) -> None:
    async with http.get(fake.base_url + "/models") as resp:
        body = await resp.json()
    assert body["object"] == "list"
    assert {m["id"] for m in body["data"]} == set(answers.DEFAULT_MODELS)
    assert all(m["object"] == "model" for m in body["data"])


async def test_restricted_models_answer_404(http) -> None:
    async with FakeUpstream(api_key=KEY, models=["gpt-4o"]) as fake:
        status, body = await chat(http, fake, model="gpt-5-ultra")
        assert status == 404
        assert body["error"]["code"] == "model_not_found"
        assert "gpt-5-ultra" in body["error"]["message"]
        assert (await chat(http, fake, model="gpt-4o"))[0] == 200


# -- embeddings --------------------------------------------------------------------------
async def test_embeddings_float_and_base64_agree(fake, http) -> None:
    url = fake.base_url + "/embeddings"
    body = {"model": "text-embedding-3-small", "input": ["one", "two"]}
    async with http.post(url, json=body) as resp:
        floats = await resp.json()
    async with http.post(url, json={**body, "encoding_format": "base64"}) as resp:
        packed = await resp.json()
    assert floats["object"] == "list"
    assert floats["model"] == "text-embedding-3-small"
    assert [d["index"] for d in floats["data"]] == [0, 1]
    assert all(d["object"] == "embedding" for d in floats["data"])
    vector = floats["data"][0]["embedding"]
    assert len(vector) == 1536
    assert abs(sum(x * x for x in vector) - 1) < 1e-3
    raw = base64.b64decode(packed["data"][0]["embedding"])
    assert list(struct.unpack("<1536f", raw)) == vector
    assert floats["data"][1]["embedding"] != vector
    assert floats["usage"]["prompt_tokens"] == floats["usage"]["total_tokens"] >= 2


async def test_embeddings_dimensions_tokens_and_errors(fake, http) -> None:
    url = fake.base_url + "/embeddings"
    body = {"model": "text-embedding-3-large", "input": [1, 2, 3], "dimensions": 8}
    async with http.post(url, json=body) as resp:
        data = await resp.json()
    assert len(data["data"]) == 1
    assert len(data["data"][0]["embedding"]) == 8
    assert data["usage"]["prompt_tokens"] == 3
    async with http.post(url, json={"model": "text-embedding-3-large", "input": []}) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["param"] == "input"


# -- authentication ----------------------------------------------------------------------
async def test_wrong_or_missing_key_is_401(fake) -> None:
    body = {"model": "gpt-4o-mini", "messages": HELLO}
    async with aiohttp.ClientSession() as anonymous:
        async with anonymous.post(fake.base_url + "/chat/completions", json=body) as resp:
            assert resp.status == 401
            assert (await resp.json())["error"]["type"] == "invalid_request_error"
        headers = {"Authorization": "Bearer sk-client-key-999999"}
        url = fake.base_url + "/chat/completions"
        async with anonymous.post(url, json=body, headers=headers) as resp:
            error = (await resp.json())["error"]
            assert resp.status == 401
            assert error["code"] == "invalid_api_key"
            assert "sk-client-key-999999" not in error["message"]
    # the rejected calls were still received and recorded
    assert fake.calls("gpt-4o-mini") == 2
    assert fake.requests[-1].headers["authorization"] == "Bearer sk-client-key-999999"


async def test_any_key_is_accepted_without_an_expected_key(http) -> None:
    async with FakeUpstream() as fake:
        assert (await chat(http, fake))[0] == 200


# -- directives --------------------------------------------------------------------------
@pytest.mark.parametrize("status", [400, 500, 502, 503])
async def test_status_directive(fake, http, status) -> None:
    got, body = await chat(http, fake, metadata={"fake": {"status": status}})
    assert got == status
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == ("server_error" if status >= 500 else "invalid_request_error")


async def test_429_with_retry_after_and_error_override(fake, http) -> None:
    directive = {"status": 429, "retry_after": 2, "error": {"code": "insufficient_quota"}}
    url = fake.base_url + "/chat/completions"
    body = {"model": "gpt-4o", "messages": HELLO, "metadata": {"fake": directive}}
    async with http.post(url, json=body) as resp:
        assert resp.status == 429
        assert resp.headers["Retry-After"] == "2"
        error = (await resp.json())["error"]
    assert error["type"] == "requests"
    assert error["code"] == "insufficient_quota"


async def test_directive_in_header_and_as_json_string(fake, http) -> None:
    url = fake.base_url + "/chat/completions"
    body = {"model": "gpt-4o", "messages": HELLO}
    headers = {"x-fake-behaviour": '{"status": 503}'}
    async with http.post(url, json=body, headers=headers) as resp:
        assert resp.status == 503
    # OpenAI's metadata values are strings, so the directive may be JSON text
    status, _ = await chat(http, fake, metadata={"fake": '{"status": 500}'})
    assert status == 500
    # the body wins over the header
    body["metadata"] = {"fake": {"status": 200}}
    async with http.post(url, json=body, headers=headers) as resp:
        assert resp.status == 200


async def test_bad_directive_is_a_loud_400(fake, http) -> None:
    status, body = await chat(http, fake, metadata={"fake": {"statuss": 500}})
    assert status == 400
    assert "statuss" in body["error"]["message"]
    assert body["error"]["code"] == "fake_directive"
    with pytest.raises(DirectiveError):
        Behaviour.parse({"delay": -1})
    with pytest.raises(DirectiveError):
        fake.script("gpt-4o", [{"tokens": "many"}])


async def test_usage_override_and_shortcuts(fake, http) -> None:
    override = {
        "prompt_tokens": 100,
        "completion_tokens": 50,
        "cached_tokens": 20,
        "reasoning_tokens": 10,
    }
    _, body = await chat(http, fake, metadata={"fake": {"usage": override}})
    usage = body["usage"]
    assert usage["prompt_tokens"] == 100
    assert usage["completion_tokens"] == 50
    assert usage["total_tokens"] == 150
    assert usage["prompt_tokens_details"]["cached_tokens"] == 20
    assert usage["completion_tokens_details"]["reasoning_tokens"] == 10

    directive = {"tokens": 4, "reasoning_tokens": 30, "cached_tokens": 5}
    _, body = await chat(http, fake, metadata={"fake": directive})
    usage = body["usage"]
    assert usage["completion_tokens"] == 34  # reasoning counts as completion, as at OpenAI
    assert usage["completion_tokens_details"]["reasoning_tokens"] == 30
    assert usage["prompt_tokens_details"]["cached_tokens"] == 5


async def test_no_usage(fake, http) -> None:
    _, body = await chat(http, fake, metadata={"fake": {"no_usage": True}})
    assert "usage" not in body
    events = await stream(
        http, fake, stream_options={"include_usage": True}, metadata={"fake": {"no_usage": True}}
    )
    assert events[-1] == "[DONE]"
    assert all(e["choices"] for e in events[:-1])


async def test_no_done(fake, http) -> None:
    events = await stream(http, fake, metadata={"fake": {"no_done": True}})
    assert "[DONE]" not in events
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


async def test_error_in_stream(fake, http) -> None:
    events = await stream(http, fake, metadata={"fake": {"error_in_stream": 3, "tokens": 8}})
    assert len(events) == 4
    assert events[-1]["error"]["type"] == "server_error"
    assert "[DONE]" not in events


async def test_malformed(fake, http) -> None:
    url = fake.base_url + "/chat/completions"
    body = {"model": "gpt-4o", "messages": HELLO, "metadata": {"fake": {"malformed": True}}}
    async with http.post(url, json=body) as resp:
        assert resp.status == 200
        with pytest.raises(orjson.JSONDecodeError):
            orjson.loads(await resp.read())
    events = await stream(http, fake, metadata={"fake": {"malformed": 2}})
    assert isinstance(events[2], str) and events[2] != "[DONE]"
    assert events[-1] == "[DONE]"
    body["metadata"] = {"fake": {"malformed": "http"}}
    with pytest.raises(aiohttp.ClientResponseError):
        async with http.post(url, json=body) as resp:
            await resp.read()


async def test_disconnect_after_in_stream(fake, http) -> None:
    url = fake.base_url + "/chat/completions"
    body = {
        "model": "gpt-4o",
        "messages": HELLO,
        "stream": True,
        "metadata": {"fake": {"disconnect_after": 3, "tokens": 10}},
    }
    received = b""
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.post(url, json=body) as resp:
            assert resp.status == 200
            async for data in resp.content.iter_any():
                received += data
    assert received.count(b"data: ") == 3


async def test_disconnect_without_answer(fake, http) -> None:
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await chat(http, fake, metadata={"fake": {"disconnect_after": 0}})


async def test_delays(fake, http) -> None:
    t0 = time.perf_counter()
    await chat(http, fake, metadata={"fake": {"delay": 0.15}})
    assert time.perf_counter() - t0 >= 0.15

    body = {
        "model": "gpt-4o",
        "messages": HELLO,
        "stream": True,
        "metadata": {"fake": {"ttft": 0.2, "chunk_delay": 0.05, "tokens": 2}},
    }
    t0 = time.perf_counter()
    async with http.post(fake.base_url + "/chat/completions", json=body) as resp:
        headers_at = time.perf_counter() - t0
        await resp.read()
    total = time.perf_counter() - t0
    assert headers_at < 0.15  # headers come first, the first token later
    assert total >= 0.2 + 4 * 0.05  # role, 2 tokens, finish, [DONE]


async def test_latency_option(http) -> None:
    async with FakeUpstream(latency=0.1) as fake:
        t0 = time.perf_counter()
        await chat(http, fake)
        assert time.perf_counter() - t0 >= 0.1


async def test_abandoned_stream_is_counted(fake, http) -> None:
    body = {
        "model": "gpt-4o",
        "messages": HELLO,
        "stream": True,
        "metadata": {"fake": {"chunk_delay": 0.05, "tokens": 50}},
    }
    async with http.post(fake.base_url + "/chat/completions", json=body) as resp:
        await resp.content.readline()
        resp.close()  # walk away mid-stream
    for _ in range(100):
        if fake.stats()["aborted"]:
            break
        await asyncio.sleep(0.02)
    stats = fake.stats()
    assert stats["aborted"] == 1
    assert stats["in_flight"] == 0


async def test_max_in_flight(fake, http) -> None:
    await asyncio.gather(*(chat(http, fake, metadata={"fake": {"delay": 0.1}}) for _ in range(5)))
    assert fake.stats()["max_in_flight"] == 5


# -- scripts, stats, reset ---------------------------------------------------------------
async def test_script_fails_twice_then_succeeds(fake, http) -> None:
    fake.script("gpt-4o", [{"status": 500}, 503])
    assert fake.pending() == {"gpt-4o": 2}
    assert (await chat(http, fake, model="gpt-4o-mini"))[0] == 200  # other model: unscripted
    assert (await chat(http, fake, model="gpt-4o"))[0] == 500
    assert (await chat(http, fake, model="gpt-4o"))[0] == 503
    assert (await chat(http, fake, model="gpt-4o"))[0] == 200
    assert fake.calls("gpt-4o") == 3
    assert fake.calls() == 4
    assert fake.pending() == {}


async def test_script_for_any_model_and_over_the_request(fake, http) -> None:
    fake.script("*", [{"status": 429, "retry_after": 1}, {}])
    fake.script("gpt-4o", [{"tokens": 3}])
    _, body = await chat(http, fake, model="gpt-4o", metadata={"fake": {"tokens": 9}})
    assert body["usage"]["completion_tokens"] == 3  # scripted beats the request
    assert (await chat(http, fake, model="gpt-4o"))[0] == 429
    assert (await chat(http, fake, model="o3-mini"))[0] == 200
    assert (await chat(http, fake, model="o3-mini"))[0] == 200


async def test_invalid_calls_do_not_use_up_the_script(fake, http) -> None:
    fake.script("gpt-4o", [500])
    assert (await chat(http, fake, model="gpt-4o", messages=[]))[0] == 400
    assert fake.pending() == {"gpt-4o": 1}
    assert (await chat(http, fake, model="gpt-4o"))[0] == 500


async def test_requests_are_recorded(fake, http) -> None:
    await chat(http, fake, model="gpt-4o", stream_options=None, user="u1")
    received = fake.last_request()
    headers, body = received
    assert received.path == "/v1/chat/completions"
    assert headers["Authorization"] == f"Bearer {KEY}"
    assert body == {"model": "gpt-4o", "messages": HELLO, "stream_options": None, "user": "u1"}
    assert fake.requests == [received]


async def test_control_api(fake, http) -> None:
    url = fake.url + "/_control"
    script = {"model": "gpt-4o", "behaviours": [{"status": 500}, {"status": 502}]}
    async with http.post(url + "/script", json=script) as resp:
        assert await resp.json() == {"pending": {"gpt-4o": 2}}
    async with http.post(url + "/script", json={"model": "x", "behaviours": [{"bad": 1}]}) as r:
        assert r.status == 400
    assert (await chat(http, fake, model="gpt-4o"))[0] == 500
    async with http.get(url + "/stats") as resp:
        stats = await resp.json()
    assert stats["calls"] == {"gpt-4o": 1}
    assert stats["total"] == 1
    assert stats["pending"] == {"gpt-4o": 1}
    (request,) = stats["requests"]
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["authorization"] == f"Bearer {KEY}"
    assert request["body"]["model"] == "gpt-4o"
    async with http.post(url + "/reset") as resp:
        assert resp.status == 200
    assert fake.calls() == 0
    assert fake.requests == []
    assert fake.pending() == {}
    assert (await chat(http, fake, model="gpt-4o"))[0] == 200


# -- from synchronous tests --------------------------------------------------------------
def _post(url: str, body: dict[str, Any], key: str = KEY) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def test_in_thread() -> None:
    with FakeUpstream.in_thread(api_key=KEY) as fake:
        assert fake.base_url == f"http://127.0.0.1:{fake.port}/v1"
        url = fake.base_url + "/chat/completions"
        fake.script("gpt-4o", [500])
        assert _post(url, {"model": "gpt-4o", "messages": HELLO})[0] == 500
        status, body = _post(url, {"model": "gpt-4o", "messages": HELLO})
        assert status == 200
        assert body["choices"][0]["message"]["content"]
        assert _post(url, {"model": "gpt-4o", "messages": HELLO}, key="sk-wrong")[0] == 401
        assert fake.calls("gpt-4o") == 3
    with pytest.raises(RuntimeError):
        _ = fake.base_url
