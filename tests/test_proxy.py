"""Forwarding through the gateway to an OpenAI-compatible upstream (the fake)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
from fake_upstream import FakeUpstream
from servers.configs import PROVIDER_KEY, directive, gateway_config, policy, tenant
from servers.gateway import Gateway, free_port

from gateway.api import asgi

MSG = [{"role": "user", "content": "Say something about the sea"}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


@pytest.fixture
def gw(make_gateway: Callable[..., Gateway], fake: FakeUpstream) -> Gateway:
    return make_gateway(gateway_config(fake.base_url), {"p": policy({"t1": tenant("key-1")})})


def test_every_field_reaches_the_client_unchanged(gw: Gateway, fake: FakeUpstream) -> None:
    body = {
        "model": "cheap",
        "messages": MSG,
        "tools": TOOLS,
        "logprobs": True,
        **directive(extra=True),
    }
    r = gw.http().post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer key-1"})
    assert r.status_code == 200
    got = r.json()
    assert got["x_fake_extra"] == {"nested": True}  # a field the gateway has never heard of
    msg = got["choices"][0]["message"]
    assert msg["tool_calls"][0]["function"]["name"] == "get_weather"
    assert got["choices"][0]["finish_reason"] == "tool_calls"
    assert got["system_fingerprint"]
    assert "refusal" in msg
    # and the SDK parses it
    resp = gw.client("key-1").chat.completions.create(
        model="cheap", messages=MSG, tools=TOOLS, logprobs=True, extra_body=directive(extra=True)
    )
    assert resp.choices[0].message.tool_calls
    assert (resp.model_extra or {})["x_fake_extra"] == {"nested": True}


def test_logprobs_and_response_format(gw: Gateway) -> None:
    client = gw.client("key-1")
    resp = client.chat.completions.create(
        model="cheap",
        messages=MSG,
        logprobs=True,
        top_logprobs=2,
        response_format={"type": "json_object"},
    )
    assert resp.choices[0].logprobs is not None and resp.choices[0].logprobs.content


def test_stream_fields_and_unknown_fields(gw: Gateway) -> None:
    client = gw.client("key-1")
    chunks = list(
        client.chat.completions.create(
            model="cheap",
            messages=MSG,
            stream=True,
            tools=TOOLS,
            extra_body=directive(extra=True),
        )
    )
    assert all((c.model_extra or {}).get("x_fake_extra") == {"nested": True} for c in chunks)
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls and calls[0].function and calls[0].function.name == "get_weather"


def test_what_goes_upstream(gw: Gateway, fake: FakeUpstream) -> None:
    client = gw.client("key-1")
    list(client.chat.completions.create(model="cheap", messages=MSG, stream=True))
    req = fake.last_request()
    assert req.headers["authorization"] == f"Bearer {PROVIDER_KEY}"
    assert "key-1" not in json.dumps(dict(req.headers))
    assert req.body["model"] == "fake-cheap"  # the upstream name, not the gateway name
    assert req.body["stream_options"] == {"include_usage": True}
    assert req.body["max_tokens"] == 1000  # the model's cap, since the request set none
    client.chat.completions.create(model="cheap", messages=MSG, max_completion_tokens=7, seed=3)
    req = fake.last_request()
    assert req.body["max_completion_tokens"] == 7 and "max_tokens" not in req.body
    assert req.body["seed"] == 3 and "stream_options" not in req.body


def test_embeddings_through_upstream(gw: Gateway, fake: FakeUpstream) -> None:
    client = gw.client("key-1")
    raw = client.embeddings.with_raw_response.create(model="embed", input=["a b c", "d"])
    emb = raw.parse()
    assert len(emb.data) == 2
    assert fake.last_request().body["model"] == "fake-embed"
    assert raw.headers["x-gateway-cost-usd"] == f"0.{emb.usage.prompt_tokens * 100:09d}"


def error(r: httpx.Response) -> dict[str, Any]:
    return dict(r.json()["error"])


@pytest.mark.parametrize(
    ("fake_directive", "status", "code", "words"),
    [
        ({"status": 500}, 502, "upstream_error", "HTTP 500"),
        ({"status": 503}, 502, "upstream_error", "HTTP 503"),
        ({"status": 429, "retry_after": 7}, 503, "upstream_rate_limited", "rate limiting"),
        ({"malformed": True}, 502, "upstream_bad_response", "cannot read"),
        ({"disconnect_after": 0}, 502, "upstream_bad_response", "closed"),
        (
            {
                "status": 400,
                "error": {"message": "Invalid value for temperature", "param": "temperature"},
            },
            400,
            "invalid_request_error",
            "Invalid value for temperature",
        ),
    ],
)
def test_upstream_failures_map_to_openai_errors(
    gw: Gateway, fake_directive: dict[str, Any], status: int, code: str, words: str
) -> None:
    body = {"model": "cheap", "messages": MSG, **directive(**fake_directive)}
    r = gw.http().post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer key-1"})
    assert r.status_code == status, r.text
    err = error(r)
    assert err["code"] == code or err["type"] == code
    assert words in err["message"]
    assert PROVIDER_KEY not in r.text
    if status == 503:
        assert r.headers["retry-after"] == "7"
    usage = gw.http().get("/v1/gateway/usage", headers={"Authorization": "Bearer key-1"}).json()
    assert usage["windows"][0]["spent_usd"] == "0.000000000", "a failed call costs nothing"


def test_upstream_refuses_the_gateway_key(
    make_gateway: Callable[..., Gateway], fake: FakeUpstream
) -> None:
    cfg = gateway_config(fake.base_url)
    cfg["providers"]["fake"]["api_key"] = "sk-wrong-provider-key-123456"
    gw = make_gateway(cfg, {"p": policy({"t1": tenant("key-1")})})
    r = gw.http().post(
        "/v1/chat/completions",
        json={"model": "cheap", "messages": MSG},
        headers={"Authorization": "Bearer key-1"},
    )
    assert r.status_code == 502
    assert error(r)["code"] == "upstream_auth_failed"
    assert "sk-wrong" not in r.text and "api_key" in error(r)["message"]


def test_upstream_down_names_the_provider(make_gateway: Callable[..., Gateway]) -> None:
    gw = make_gateway(
        gateway_config(f"http://127.0.0.1:{free_port()}/v1"), {"p": policy({"t1": tenant("key-1")})}
    )
    with pytest.raises(openai.APIStatusError) as exc:
        gw.client("key-1").chat.completions.create(model="cheap", messages=MSG)
    assert exc.value.status_code == 502
    assert "'fake'" in exc.value.message and "unreachable" in exc.value.message


def test_upstream_timeout(make_gateway: Callable[..., Gateway], fake: FakeUpstream) -> None:
    cfg = gateway_config(fake.base_url)
    cfg["providers"]["fake"]["timeouts"] = {
        "connect": 1,
        "first_byte": 0.5,
        "idle": 0.5,
        "non_stream": 0.5,
    }
    gw = make_gateway(cfg, {"p": policy({"t1": tenant("key-1")})})
    r = gw.http().post(
        "/v1/chat/completions",
        json={"model": "cheap", "messages": MSG, **directive(delay=2)},
        headers={"Authorization": "Bearer key-1"},
    )
    assert r.status_code == 504 and error(r)["code"] == "upstream_timeout"


def test_stream_is_relayed_without_buffering(gw: Gateway) -> None:
    client = gw.client("key-1")
    t0 = time.monotonic()
    stream = client.chat.completions.create(
        model="cheap",
        messages=MSG,
        stream=True,
        extra_body=directive(tokens=6, chunk_delay=0.25),
    )
    arrivals = [time.monotonic() - t0 for _ in stream]
    assert arrivals[-1] > 1.4  # the whole stream takes ~1.75 s ...
    assert arrivals[1] < 0.6  # ... but the first tokens arrive as they are produced


def test_an_idle_stream_ends_with_an_error_event(
    make_gateway: Callable[..., Gateway], fake: FakeUpstream
) -> None:
    # (a long stream that keeps flowing completes: test_resilience.py)
    cfg = gateway_config(fake.base_url)
    cfg["providers"]["fake"]["timeouts"] = {
        "connect": 1,
        "first_byte": 1,
        "idle": 0.6,
        "non_stream": 1,
    }
    gw = make_gateway(cfg, {"p": policy({"t1": tenant("key-1")})})
    client = gw.client("key-1")
    # idle longer than the idle timeout: the stream ends with an OpenAI-shaped error event
    with pytest.raises(openai.APIError) as exc:
        list(
            client.chat.completions.create(
                model="cheap",
                messages=MSG,
                stream=True,
                extra_body=directive(tokens=4, chunk_delay=1.5),
            )
        )
    assert "timed out" in str(exc.value.message)


def test_client_disconnect_cancels_the_upstream(gw: Gateway, fake: FakeUpstream) -> None:
    stats_before = fake.stats()
    with (
        gw.http() as http,
        http.stream(
            "POST",
            "/v1/chat/completions",
            json={
                "model": "cheap",
                "messages": MSG,
                "stream": True,
                **directive(tokens=50, chunk_delay=0.1),
            },
            headers={"Authorization": "Bearer key-1"},
        ) as r,
    ):
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: {") for line in got)
    deadline = time.monotonic() + 5
    while fake.stats()["aborted"] == stats_before["aborted"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fake.stats()["aborted"] > stats_before["aborted"], "upstream call was not cancelled"
    # the consumed part is charged and on the ledger as a client disconnect
    time.sleep(0.2)
    ledger = gw.http().get("/admin/ledger", headers={"Authorization": "Bearer admin-key"}).json()
    row = ledger["data"][0]
    assert row["status"] == 499 and row["error_code"] == "client_disconnected"
    assert 0 < row["completion_tokens"] < 50 and row["usage_source"] == "counted"
    assert int(row["cost"]) > 0


def _leave_before_the_answer(
    gw: Gateway, fake: FakeUpstream, timeout: float, delay: float
) -> dict[str, Any]:
    """A non-stream request whose client gives up after ``timeout`` s while the upstream
    thinks for ``delay`` s: the upstream call is cancelled, and its ledger row (returned)
    is a client disconnect that costs nothing."""
    aborted = fake.stats()["aborted"]
    with pytest.raises(httpx.ReadTimeout), gw.http(timeout=timeout) as http:
        http.post(
            "/v1/chat/completions",
            json={"model": "cheap", "messages": MSG, **directive(delay=delay)},
            headers={"Authorization": "Bearer key-1"},
        )
    deadline = time.monotonic() + 3
    while fake.stats()["aborted"] == aborted and time.monotonic() < deadline:
        time.sleep(0.02)
    assert fake.stats()["aborted"] > aborted, "the upstream call was not cancelled"
    time.sleep(0.2)
    ledger = gw.http().get("/admin/ledger", headers={"Authorization": "Bearer admin-key"}).json()
    row: dict[str, Any] = ledger["data"][0]
    assert (row["status"], row["error_code"], row["cost"]) == (499, "client_disconnected", 0)
    return row


def test_under_uvicorn_a_disconnect_is_noticed_at_once_without_the_late_watcher(
    gw: Gateway, fake: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection itself tells (CycleWatch): with the task-based watcher pushed out
    of reach, a client that leaves while the upstream thinks still cancels the call, and
    soon after it left."""
    monkeypatch.setattr(asgi, "WATCH_AFTER_SECONDS", 3600.0)
    row = _leave_before_the_answer(gw, fake, timeout=0.1, delay=5)
    assert row["latency_ms"] < 1000, "noticed long after the client left"


def test_concurrent_clients(gw: Gateway) -> None:
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            c = gw.client("key-1")
            for _ in range(5):
                c.chat.completions.create(model="cheap", messages=MSG)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_client_gone_before_a_non_stream_answer_pays_nothing(
    gw: Gateway, fake: FakeUpstream
) -> None:
    _leave_before_the_answer(gw, fake, timeout=0.8, delay=3)
    usage = gw.http().get("/v1/gateway/usage", headers={"Authorization": "Bearer key-1"}).json()
    assert usage["windows"][0]["reserved_usd"] == "0.000000000", "the reservation is released"


def _raw_exchange(gw: Gateway, body: dict[str, Any]) -> bytes:
    """A request over a plain socket, and the response's bytes exactly as they came."""
    import socket

    data = json.dumps(body).encode()
    host, port = gw.url.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer key-1\r\n"
            b"content-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n%b" % (len(data), data)
        )
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _shape(raw: bytes) -> tuple[bytes, list[bytes], bytes]:
    """Status line, header names in order, and the body's framing (its chunk sizes or
    its length), leaving out the values that change per request."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    names = [line.split(b":", 1)[0] for line in lines]
    if b"transfer-encoding" in names:
        sizes = []
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            n = int(size_line, 16)
            sizes.append(size_line)
            rest = rest[n + 2 :]
        return status, names, b" ".join(sizes[-1:])  # ends with the zero-size chunk
    return status, names, b"%d" % len(rest)


@pytest.mark.parametrize("stream", [False, True])
def test_heads_written_by_the_gateway_are_uvicorns(
    gw: Gateway, stream: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under uvicorn the gateway writes response heads (and a stream's end) itself; the
    bytes have the shape uvicorn's own ``send`` gives them: same status line, headers in
    the same order and case, same framing, the connection closed when asked."""
    body: dict[str, Any] = {"model": "cheap", "messages": MSG, "stream": stream}
    fast = _raw_exchange(gw, body)
    monkeypatch.setattr(asgi, "_status_lines", {})  # every head through uvicorn's send
    slow = _raw_exchange(gw, body)
    assert _shape(fast) == _shape(slow)
    status, names, framing = _shape(fast)
    assert status == b"HTTP/1.1 200 OK"
    assert names[:2] == [b"date", b"server"] or names[:2] == [b"server", b"date"]
    assert b"connection" in names  # the client asked to close: said, and done (recv ended)
    assert framing == (b"0" if stream else framing)
    if stream:
        assert b"transfer-encoding" in names and b"data: [DONE]" in fast
    else:
        assert b"content-length" in names and json.loads(fast.partition(b"\r\n\r\n")[2])


def test_a_head_is_left_to_uvicorn_where_it_would_refuse_or_log() -> None:
    """``_head`` on a stand-in for uvicorn's cycle: names in lower case as uvicorn sends
    them; a header uvicorn would refuse (it raises), a started response, or uvicorn's own
    access log on: None, so that uvicorn's ``send`` does it."""
    from types import SimpleNamespace

    def cycle(**over: Any) -> Any:
        fields: dict[str, Any] = {
            "response_started": False, "disconnected": False, "access_log": False,
            "flow": SimpleNamespace(write_paused=False), "scope": {"method": "POST"},
            "default_headers": [(b"server", b"uvicorn")], "keep_alive": True,
            "waiting_for_100_continue": True,
        }  # fmt: skip
        return SimpleNamespace(**{**fields, **over})

    def head(c: Any, headers: list[tuple[bytes, bytes]]) -> bytes | None:
        r = asgi.AsgiResponder(None)  # type: ignore[arg-type]
        r._cycle = c
        out = r._head(200, headers)
        return None if out is None else b"".join(out)

    asgi._status_lines.setdefault(200, b"HTTP/1.1 200 OK\r\n")
    c = cycle()
    assert head(c, [(b"X-Up", b"v")]) == b"HTTP/1.1 200 OK\r\nserver: uvicorn\r\nx-up: v\r\n"
    assert c.response_started and not c.waiting_for_100_continue
    assert head(cycle(keep_alive=False), []) == (
        b"HTTP/1.1 200 OK\r\nserver: uvicorn\r\nconnection: close\r\n"
    )
    assert head(cycle(), [(b"x", b"a\r\nset-cookie: evil")]) is None
    assert head(cycle(), [(b"bad name", b"v")]) is None
    assert head(cycle(), [(b"x", b"tab\tis fine")]) is not None
    refused: list[dict[str, Any]] = [
        {"response_started": True}, {"access_log": True}, {"disconnected": True},
        {"scope": {"method": "HEAD"}}, {"flow": SimpleNamespace(write_paused=True)},
    ]  # fmt: skip
    for over in refused:
        assert head(cycle(**over), []) is None, over
