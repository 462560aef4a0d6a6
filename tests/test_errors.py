"""Bad input gets a clear OpenAI-shaped error with the right status, never a traceback."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
from servers.configs import gateway_config, policy, tenant
from servers.gateway import Gateway

AUTH = {"Authorization": "Bearer key-1"}
JSON = {**AUTH, "Content-Type": "application/json"}


@pytest.fixture
def gw(make_gateway: Callable[..., Gateway]) -> Gateway:
    return make_gateway(
        gateway_config(requests={"max_body_bytes": 4096}),
        {"p": policy({"t1": tenant("key-1", models=["mock-chat"]), "t2": tenant("key-2")})},
    )


def error_of(r: httpx.Response) -> dict[str, Any]:
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert "Traceback" not in err["message"]
    return dict(err)


@pytest.mark.parametrize(
    ("body", "status", "code", "param", "words"),
    [
        (b"{not json", 400, None, None, "not valid JSON"),
        (b"[1, 2]", 400, None, None, "must be a JSON object"),
        (
            b'{"messages": [{"role": "user", "content": "x"}]}',
            400,
            None,
            "model",
            "provide a model",
        ),
        (
            b'{"model": 42, "messages": [{"role": "user", "content": "x"}]}',
            400,
            None,
            "model",
            "non-empty string",
        ),
        (b'{"model": "mock-chat"}', 400, None, "messages", "messages"),
        (
            b'{"model": "mock-chat", "messages": [{"content": "x"}]}',
            400,
            None,
            "messages[0]",
            "role",
        ),
        (
            b'{"model": "mock-chat", "stream": "yes", "messages": [{"role": "user"}]}',
            400,
            None,
            "stream",
            "boolean",
        ),
        (
            b'{"model": "mock-chat", "max_tokens": -1, "messages": [{"role": "user"}]}',
            400,
            None,
            "max_tokens",
            "positive integer",
        ),
        (
            b'{"model": "nope", "messages": [{"role": "user", "content": "x"}]}',
            404,
            "model_not_found",
            "model",
            "does not exist",
        ),
        (
            b'{"model": "mock-embed", "messages": [{"role": "user", "content": "x"}]}',
            403,
            "model_not_allowed",
            "model",
            "mock-chat",
        ),
    ],
)
def test_bad_bodies(
    gw: Gateway, body: bytes, status: int, code: str | None, param: str | None, words: str
) -> None:
    r = gw.http().post("/v1/chat/completions", content=body, headers=JSON)
    assert r.status_code == status
    err = error_of(r)
    assert err["code"] == code
    assert err["param"] == param
    assert words in err["message"]
    assert r.headers["x-gateway-request-id"].startswith("req_")


def test_wrong_endpoint_kind(gw: Gateway) -> None:
    r = gw.http().post(
        "/v1/embeddings",
        json={"model": "mock-chat", "input": "x"},
        headers={"Authorization": "Bearer key-2"},
    )
    assert r.status_code == 400
    assert "/v1/chat/completions" in error_of(r)["message"]


@pytest.mark.parametrize(
    ("headers", "words"),
    [
        ({}, "Missing API key"),
        ({"Authorization": "Basic abc"}, "Malformed"),
        ({"Authorization": "Bearer wrong-key"}, "Incorrect API key"),
    ],
)
def test_authentication(gw: Gateway, headers: dict[str, str], words: str) -> None:
    for path, method in (
        ("/v1/chat/completions", "POST"),
        ("/v1/models", "GET"),
        ("/v1/gateway/usage", "GET"),
        ("/admin/ledger", "GET"),
    ):
        r = gw.http().request(method, path, headers=headers, json={"model": "mock-chat"})
        assert r.status_code == 401, (path, r.text)
        err = error_of(r)
        assert err["type"] == "authentication_error"
        if path != "/admin/ledger":
            assert words in err["message"]
        assert "wrong-key" not in r.text


def test_sdk_raises_typed_errors(gw: Gateway) -> None:
    with pytest.raises(openai.AuthenticationError):
        gw.client("bad").chat.completions.create(
            model="mock-chat", messages=[{"role": "user", "content": "x"}]
        )
    with pytest.raises(openai.NotFoundError) as nf:
        gw.client("key-2").chat.completions.create(
            model="gpt-99", messages=[{"role": "user", "content": "x"}]
        )
    assert nf.value.code == "model_not_found"
    with pytest.raises(openai.PermissionDeniedError):
        gw.client("key-1").embeddings.create(model="mock-embed", input="x")


def test_body_too_large(gw: Gateway) -> None:
    big = (
        b'{"model": "mock-chat", "messages": [{"role": "user", "content": "' + b"x" * 5000 + b'"}]}'
    )
    r = gw.http().post("/v1/chat/completions", content=big, headers=JSON)
    assert r.status_code == 413
    assert "4096 bytes" in error_of(r)["message"]

    def chunks():  # no Content-Length: the limit still applies while reading
        yield big[:3000]
        yield big[3000:]

    r = gw.http().post("/v1/chat/completions", content=chunks(), headers=JSON)
    assert r.status_code == 413


def test_wrong_content_type(gw: Gateway) -> None:
    r = gw.http().post(
        "/v1/chat/completions",
        content=b"model=mock-chat",
        headers={**AUTH, "Content-Type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 415
    assert "application/json" in error_of(r)["message"]


def test_unknown_path_and_method(gw: Gateway) -> None:
    r = gw.http().get("/v1/nothing-here", headers=AUTH)
    assert r.status_code == 404
    error_of(r)
    r = gw.http().get("/v1/chat/completions", headers=AUTH)
    assert r.status_code == 405
    assert "POST" in error_of(r)["message"]


def test_health_is_open(gw: Gateway) -> None:
    http = gw.http()
    assert http.get("/healthz").json() == {"status": "ok"}
    ready = http.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert http.get("/metrics").status_code == 200
