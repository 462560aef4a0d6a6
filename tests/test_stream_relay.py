"""Relaying a stream once it has started: chunks go to the client from the upstream
connection's callback (``push``), and anything unusual hands the rest to the pull loop.
Each case runs through ``gateway serve``'s server (uvicorn, httptools) against the fake
upstream, with the real SDK where it can say what a user sees."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import httpx
import openai
import pytest
from fake_upstream import FakeUpstream
from servers.configs import PROVIDER_KEY, directive, gateway_config, policy, tenant
from servers.gateway import Gateway

from gateway.api.asgi import AsgiResponder
from gateway.pipeline.relay import _Events, _Sink

MSG = [{"role": "user", "content": "Tell me about tides"}]


@pytest.fixture
def gw(make_gateway: Callable[..., Gateway], fake: FakeUpstream) -> Gateway:
    return make_gateway(gateway_config(fake.base_url), {"p": policy({"t1": tenant("key-1")})})


def _ledger(gw: Gateway) -> list[dict[str, Any]]:
    r = gw.http().get("/admin/ledger", headers={"Authorization": "Bearer admin-key"})
    rows: list[dict[str, Any]] = r.json()["data"]
    return rows


def _direct_text(fake: FakeUpstream, **kw: Any) -> str:
    """The answer's text when asked of the fake directly, without the gateway."""
    body = {"model": "gpt-4o-mini", "messages": MSG, "stream": True, **directive(**kw)}
    text = []
    auth = {"Authorization": f"Bearer {PROVIDER_KEY}"}
    with httpx.stream(
        "POST", fake.base_url + "/chat/completions", json=body, headers=auth, timeout=30
    ) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for c in json.loads(line[6:])["choices"]:
                    text.append(c["delta"].get("content") or "")
    return "".join(text)


def test_a_pushed_stream_arrives_whole_and_in_order(gw: Gateway, fake: FakeUpstream) -> None:
    chunks = gw.stream("key-1", MSG, tokens=40)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == _direct_text(fake, tokens=40)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 40
    row = _ledger(gw)[0]
    assert row["status"] == 200 and row["completion_tokens"] == 40 and row["cost"] > 0


def test_an_error_event_mid_stream_ends_it_and_charges_what_was_sent(gw: Gateway) -> None:
    received: list[str] = []
    with pytest.raises(openai.APIError) as exc:
        for c in gw.client("key-1").chat.completions.create(
            model="cheap",
            messages=MSG,
            stream=True,
            extra_body=directive(tokens=20, chunk_delay=0.02, error_in_stream=5),
        ):
            received.extend(ch.delta.content or "" for ch in c.choices)
    # the fake's events 1-4 (event 0 carries the role), then its error event at 5
    assert len([t for t in received if t]) == 4
    assert "fake" in exc.value.message  # the gateway's error event names the provider
    row = _ledger(gw)[0]
    assert row["status"] == 502 and row["error_code"] == "upstream_error"
    assert row["usage_source"] == "counted" and 0 < row["completion_tokens"] < 20
    assert row["cost"] > 0


def test_an_error_event_before_any_content_is_an_error_response(gw: Gateway) -> None:
    """Nothing was sent yet, so the client gets a plain HTTP error (or a fallback)."""
    with pytest.raises(openai.APIStatusError) as exc:
        gw.client("key-1").chat.completions.create(
            model="cheap", messages=MSG, stream=True, extra_body=directive(error_in_stream=0)
        )
    assert exc.value.status_code == 502 and "fake" in exc.value.message
    assert _ledger(gw)[0]["cost"] == 0  # nothing was generated


def _failed_stream(gw: Gateway, **fake: Any) -> openai.APIError:
    """The error the SDK raises while reading a stream the fake misbehaves in."""
    with pytest.raises(openai.APIError) as exc:
        list(
            gw.client("key-1").chat.completions.create(
                model="cheap", messages=MSG, stream=True, extra_body=directive(**fake)
            )
        )
    return exc.value


def test_an_upstream_that_drops_mid_stream(gw: Gateway) -> None:
    exc = _failed_stream(gw, tokens=20, chunk_delay=0.02, disconnect_after=6)
    assert "fake" in str(exc.message)  # names the provider
    row = _ledger(gw)[0]
    assert row["status"] >= 500 and 0 < row["completion_tokens"] < 20 and row["cost"] > 0


def test_a_stream_that_ends_without_done_or_usage_is_cut(gw: Gateway) -> None:
    exc = _failed_stream(gw, tokens=8, chunk_delay=0.02, no_done=True, no_usage=True)
    assert "ended before it was complete" in str(exc.message)


def test_a_client_that_stops_reading_gets_every_byte(
    make_gateway: Callable[..., Gateway], fake: FakeUpstream
) -> None:
    """A client that reads nothing for a while: the gateway's socket buffer fills, the
    server applies backpressure, the relay hands over to the pull loop (which waits for
    the client to drain), and reading resumes with nothing lost or repeated."""
    cfg = gateway_config(fake.base_url)
    cfg["models"]["cheap"]["max_output_tokens"] = 30000  # else the gateway caps the answer
    gw = make_gateway(cfg, {"p": policy({"t1": tenant("key-1")})})
    tokens = 20000  # ~3 MB of SSE: more than the socket buffers hold
    body = json.dumps(
        {"model": "cheap", "messages": MSG, "stream": True, **directive(tokens=tokens)}
    ).encode()
    url = httpx.URL(gw.url)
    sock = socket.create_connection((url.host, url.port or 80))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer key-1\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)
    )
    first = sock.recv(4096)
    assert first.startswith(b"HTTP/1.1 200"), first[:200]
    time.sleep(1.5)  # read nothing meanwhile
    data = bytearray(first)
    sock.settimeout(30)
    while not data.endswith(b"0\r\n\r\n"):
        part = sock.recv(65536)
        assert part, "the gateway closed the connection early"
        data += part
    sock.close()
    _, _, chunked = bytes(data).partition(b"\r\n\r\n")
    sse = _dechunk(chunked)
    events = [e for e in sse.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    text = "".join(
        c["delta"].get("content") or "" for e in events[:-1] for c in json.loads(e[6:])["choices"]
    )
    assert text == _direct_text(fake, tokens=tokens)
    assert _ledger(gw)[0]["completion_tokens"] == tokens


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    i = 0
    while True:
        j = data.index(b"\r\n", i)
        size = int(data[i:j], 16)
        if size == 0:
            return bytes(out)
        out += data[j + 2 : j + 2 + size]
        i = j + 2 + size + 2


def test_a_usage_chunk_that_is_not_json_ends_the_stream_with_an_error(
    make_gateway: Callable[..., Gateway],
) -> None:
    """A usage chunk that is not JSON, arriving after the stream started (so inside the
    upstream connection's callback): the stream ends with an error event naming the
    provider, the request is on the ledger, and the gateway goes on serving."""
    role = b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"raw","choices":[{"index":0,"delta":{"role":"assistant","content":"hi"}}]}\n\n'  # noqa: E501
    broken = b'data: {"usage": {not json\n\n'

    def serve(listener: socket.socket) -> None:
        conn, _ = listener.accept()
        with conn:
            request = b""
            while b"\r\n\r\n" not in request:
                request += conn.recv(65536)
            conn.sendall(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                b"transfer-encoding: chunked\r\n\r\n"
            )
            for event in (role, broken):
                conn.sendall(b"%x\r\n%b\r\n" % (len(event), event))
                time.sleep(0.3)  # the broken chunk comes in a read of its own
            conn.sendall(b"0\r\n\r\n")
            time.sleep(0.5)

    listener = socket.create_server(("127.0.0.1", 0))
    thread = threading.Thread(target=serve, args=(listener,), daemon=True)
    thread.start()
    port = listener.getsockname()[1]
    cfg = gateway_config(f"http://127.0.0.1:{port}/v1")
    gw = make_gateway(cfg, {"p": policy({"t1": tenant("key-1")})})
    got: list[str] = []
    with pytest.raises(openai.APIError) as exc:
        for c in gw.client("key-1").chat.completions.create(
            model="cheap", messages=MSG, stream=True
        ):
            got.extend(ch.delta.content or "" for ch in c.choices)
    assert "fake" in str(exc.value.message)
    thread.join(5)
    listener.close()
    assert got == ["hi"]
    row = _ledger(gw)[0]
    assert row["status"] == 502 and row["error_code"] == "upstream_error"
    assert gw.http().get("/healthz").status_code == 200


def test_the_sink_keeps_an_exception_for_the_request_to_raise() -> None:
    """Inside the connection's callback an exception would surface in the upstream
    parser; the sink stops and keeps it, and the relay raises it in the request's task."""

    class BrokenResponder:
        def can_write_now(self) -> bool:
            return True

        def write_now(self, data: bytes) -> bool:
            raise RuntimeError("the client's transport is gone")

    ctx = SimpleNamespace(first_byte_sent=True, streamed=[], usage=None, usage_raw=None)
    sink = _Sink(_Events(ctx), BrokenResponder())  # type: ignore[arg-type]
    assert sink(b'data: {"choices":[{"index":0,"delta":{"content":"x"}}]}\n\n') is False
    assert sink.stopped and isinstance(sink.crash, RuntimeError)


def test_the_push_path_needs_uvicorns_own_send() -> None:
    """Under any other server (or a uvicorn whose request cycle changed) every chunk goes
    through ``await send``: write_now is never offered."""

    async def send(message: Any) -> None:
        pass

    out = AsgiResponder(send)
    out.started = True
    assert not out.can_write_now()
