"""The upstream HTTP client against exact bytes: bodies that end at connection close,
stale keep-alive connections, TLS with a private CA."""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest
import trustme
from fake_upstream import FakeUpstream
from pydantic import ValidationError
from servers.configs import gateway_config, policy, tenant
from servers.gateway import Gateway
from servers.proxy import connect_proxy
from servers.raw import raw_server

from gateway.config.deployment import ProviderConfig
from gateway.upstream.rawhttp import Pool, Proxy, parse_proxy, post

MSG = [{"role": "user", "content": "hi"}]
COMPLETION = json.dumps({
    "id": "chatcmpl-raw", "object": "chat.completion", "created": 1, "model": "raw",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "from raw"},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
}).encode()  # fmt: skip


def with_length(body: bytes = COMPLETION) -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%b" % (
        len(body), body)  # fmt: skip


def gateway_for(make: Callable[..., Gateway], base_url: str, **provider: object) -> Gateway:
    cfg = gateway_config(base_url)
    cfg["providers"]["fake"].update(provider)
    return make(cfg, {"p": policy({"t1": tenant("key-1")})})


def test_body_that_ends_when_the_connection_closes(make_gateway: Callable[..., Gateway]) -> None:
    reply = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n" + COMPLETION
    with raw_server(lambda req, n: reply, keep_open=False) as port:
        gw = gateway_for(make_gateway, f"http://127.0.0.1:{port}/v1")
        resp = gw.client("key-1").chat.completions.create(model="cheap", messages=MSG)
    assert resp.choices[0].message.content == "from raw"


def test_a_stale_keep_alive_connection_is_replaced(make_gateway: Callable[..., Gateway]) -> None:
    # The server answers one request per connection but does not say so (no
    # "connection: close"); the second request finds the pooled connection closed.
    with raw_server(lambda req, n: with_length() if n == 0 else None) as port:
        gw = gateway_for(make_gateway, f"http://127.0.0.1:{port}/v1")
        client = gw.client("key-1")
        for _ in range(3):
            assert client.chat.completions.create(model="cheap", messages=MSG).choices


def test_no_answer_at_all_is_a_clear_502(make_gateway: Callable[..., Gateway]) -> None:
    with raw_server(lambda req, n: None) as port:
        gw = gateway_for(make_gateway, f"http://127.0.0.1:{port}/v1")
        with pytest.raises(openai.APIStatusError) as exc:
            gw.client("key-1").chat.completions.create(model="cheap", messages=MSG)
    assert exc.value.status_code == 502
    assert "closed before the response was complete" in exc.value.message


def test_not_http_at_all(make_gateway: Callable[..., Gateway]) -> None:
    with raw_server(lambda req, n: b"SSH-2.0-OpenSSH_9.2\r\n\r\n", keep_open=False) as port:
        gw = gateway_for(make_gateway, f"http://127.0.0.1:{port}/v1")
        with pytest.raises(openai.APIStatusError) as exc:
            gw.client("key-1").chat.completions.create(model="cheap", messages=MSG)
    assert exc.value.status_code == 502 and "invalid HTTP response" in exc.value.message


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_server(ca: trustme.CA) -> Iterator[int]:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
    with raw_server(lambda req, n: with_length(), tls=ctx) as port:
        yield port


def test_tls_with_a_private_ca(
    make_gateway: Callable[..., Gateway], ca: trustme.CA, tls_server: int, tmp_path: Path
) -> None:
    pem = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(pem))
    url = f"https://localhost:{tls_server}/v1"
    trusted = gateway_for(make_gateway, url, tls_ca_file=str(pem))
    resp = trusted.client("key-1").chat.completions.create(model="cheap", messages=MSG)
    assert resp.choices[0].message.content == "from raw"
    # the system CAs do not know this certificate: refused, and the reason is given
    untrusted = gateway_for(make_gateway, url)
    with pytest.raises(openai.APIStatusError) as exc:
        untrusted.client("key-1").chat.completions.create(model="cheap", messages=MSG)
    assert exc.value.status_code == 502
    assert "certificate" in exc.value.message.lower()


def test_closing_waits_until_tls_connections_are_gone(ca: trustme.CA, tls_server: int) -> None:
    """At shutdown the loop closes right after the upstreams: a TLS connection whose close
    (close_notify) had not finished then failed with "Event loop is closed" and left an
    unclosed transport (seen once in CI)."""
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)

    async def run() -> tuple[bool, bool]:
        pool = Pool("localhost", tls_server, client_ctx, limit=2, idle_seconds=30)
        r = await post(pool, b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n", b"{}", 5)
        await r.read()
        r.release()
        [conn] = pool._idle
        await pool.aclose()
        return conn.closed, conn.gone.done()

    assert asyncio.run(run()) == (True, True)


def test_push_hands_the_sink_one_reads_chunks_in_one_call() -> None:
    """Chunks that queued up in the socket arrive in one read; the sink gets them in one
    call, so the relay writes them to the client in one system call, not one each."""
    head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
    parts = [head + b"1\r\na\r\n", b"1\r\nb\r\n2\r\ncd\r\n1\r\ne\r\n", b"0\r\n\r\n"]

    class Sink:
        stopped = False

        def __init__(self) -> None:
            self.calls: list[bytes] = []

        def __call__(self, data: bytes) -> bool:
            self.calls.append(data)
            return True

    async def run(port: int) -> tuple[list[bytes], bytes]:
        pool = Pool("127.0.0.1", port, None, limit=2, idle_seconds=30)
        r = await post(pool, b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n", b"{}", 5)
        sink = Sink()
        await r.push(sink, timeout=5)
        rest = await r.read()
        r.release()
        pool.close()
        return sink.calls, rest

    with raw_server(lambda req, n: parts) as port:
        calls, rest = asyncio.run(run(port))
    assert calls == [b"a", b"bcde"]
    assert rest == b""


# -- through an HTTP proxy (CONNECT tunnels) ----------------------------------------------
def test_an_https_upstream_through_a_proxy_with_credentials(
    make_gateway: Callable[..., Gateway], ca: trustme.CA, tls_server: int, tmp_path: Path
) -> None:
    """TLS to the upstream inside the tunnel (the proxy sees only CONNECT), the password
    percent-decoded, and keep-alive: three calls, one tunnel."""
    pem = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(pem))
    expected = "Basic " + base64.b64encode(b"gw:p@ss w").decode()
    with connect_proxy(required_auth=expected) as (pport, log):
        gw = gateway_for(
            make_gateway,
            f"https://localhost:{tls_server}/v1",
            tls_ca_file=str(pem),
            proxy=f"http://gw:p%40ss%20w@127.0.0.1:{pport}",
        )
        client = gw.client("key-1")
        for _ in range(3):
            resp = client.chat.completions.create(model="cheap", messages=MSG)
            assert resp.choices[0].message.content == "from raw"
        assert log.tunnels == [(f"localhost:{tls_server}", expected)]


def test_an_http_upstream_through_a_proxy(make_gateway: Callable[..., Gateway]) -> None:
    with raw_server(lambda req, n: with_length()) as port, connect_proxy() as (pport, log):
        gw = gateway_for(
            make_gateway, f"http://127.0.0.1:{port}/v1", proxy=f"http://127.0.0.1:{pport}"
        )
        resp = gw.client("key-1").chat.completions.create(model="cheap", messages=MSG)
        assert resp.choices[0].message.content == "from raw"
        assert log.tunnels == [(f"127.0.0.1:{port}", None)]


def test_a_proxy_that_refuses_the_tunnel_is_a_clear_error(
    make_gateway: Callable[..., Gateway],
) -> None:
    with raw_server(lambda req, n: with_length()) as port, connect_proxy("Basic x") as (pp, log):
        gw = gateway_for(
            make_gateway, f"http://127.0.0.1:{port}/v1", proxy=f"http://127.0.0.1:{pp}"
        )
        with pytest.raises(openai.APIStatusError) as exc:
            gw.client("key-1").chat.completions.create(model="cheap", messages=MSG)
        assert log.refused[0] == f"127.0.0.1:{port}"
    msg = exc.value.message
    assert exc.value.status_code in (502, 503), msg
    assert f"through proxy 127.0.0.1:{pp}" in msg and "407 Proxy Authentication Required" in msg


def test_proxy_urls_are_checked_without_showing_credentials() -> None:
    ok = ProviderConfig(base_url="https://x/v1", proxy="http://u:secret@proxy.internal:3128")
    assert ok.proxy is not None
    assert parse_proxy(ok.proxy.get_secret_value()) == Proxy(
        "proxy.internal", 3128, b"Basic " + base64.b64encode(b"u:secret")
    )
    assert ProviderConfig(base_url="https://x/v1", proxy="").proxy is None  # ${X:-} unset
    for bad, says in [
        ("https://u:secret@proxy:3128", "must be http://"),
        ("http://u:secret@proxy:port", "port is not a number"),
        ("http://u:secret@proxy:3128/path", "nothing more"),
        ("proxy:3128", "must be http://"),
    ]:
        with pytest.raises(ValidationError) as exc:
            ProviderConfig(base_url="https://x/v1", proxy=bad)
        shown = exc.value.errors()[0]["msg"]  # what the config loader reports (not the input)
        assert says in shown and "secret" not in shown, shown


def test_a_failed_handshake_in_a_tunnel_frees_its_place_in_the_pool(tls_server: int) -> None:
    """The connection counts against the pool's limit once: TLS that fails inside the
    tunnel (an untrusted certificate) frees it, and the next try can connect again."""

    async def run() -> int:
        untrusting = ssl.create_default_context()  # the system CAs: not the test CA
        with connect_proxy() as (pport, _):
            pool = Pool("localhost", tls_server, untrusting, 1, 30, Proxy("127.0.0.1", pport))
            for _ in range(2):  # with the place still taken, the second would wait forever
                with pytest.raises(ssl.SSLCertVerificationError):
                    await asyncio.wait_for(pool.acquire(5), 10)
            await asyncio.sleep(0.2)  # the failed transports' connection_lost, if any
            await pool.aclose()
            return pool._open

    assert asyncio.run(run()) == 0


def test_a_proxy_that_never_answers_fails_within_the_connect_timeout(
    make_gateway: Callable[..., Gateway],
) -> None:
    """``connect`` bounds the tunnel's opening too, and the error says it was the
    connection (not a response within ``non_stream``)."""
    with connect_proxy(silent=True) as (pport, _):
        gw = gateway_for(
            make_gateway,
            "http://upstream.invalid/v1",
            proxy=f"http://127.0.0.1:{pport}",
            timeouts={"connect": 0.5, "non_stream": 30},
            retries={"max_attempts": 1},
        )
        t0 = time.monotonic()
        with pytest.raises(openai.APIStatusError) as exc:
            gw.client("key-1").with_options(max_retries=0).chat.completions.create(
                model="cheap", messages=MSG
            )
        took = time.monotonic() - t0
    msg = exc.value.message
    assert exc.value.status_code == 502 and took < 5, (took, msg)
    assert f"cannot connect to upstream.invalid through proxy 127.0.0.1:{pport}" in msg, msg
    assert "no connection within 0.5 s" in msg, msg


def test_an_ipv6_upstream_is_named_in_brackets_in_connect() -> None:
    async def run() -> None:
        with connect_proxy(required_auth="Basic x") as (pport, log):
            pool = Pool("::1", 8443, None, 1, 30, Proxy("127.0.0.1", pport))
            with pytest.raises(OSError, match="407"):
                await pool.acquire(5)
            assert log.refused == ["[::1]:8443"]

    asyncio.run(run())


def test_a_stream_through_a_proxy_arrives_whole(
    make_gateway: Callable[..., Gateway], fake: FakeUpstream
) -> None:
    """Chunks relayed from the upstream connection's callback through a tunnel, and the
    usage chunk at the end, as without a proxy."""
    with connect_proxy() as (pport, log):
        gw = gateway_for(make_gateway, fake.base_url, proxy=f"http://127.0.0.1:{pport}")
        chunks = gw.stream("key-1", MSG, tokens=30)
        assert len(log.tunnels) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text) > 30 and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 30
