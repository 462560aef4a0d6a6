"""Operator switches for metrics and logs."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from servers.configs import gateway_config
from servers.gateway import Gateway


def test_metrics_can_be_disabled(make_gateway: Callable[..., Gateway]) -> None:
    gw = make_gateway(gateway_config(metrics={"enabled": False}))
    http = gw.http()
    r = http.get("/metrics")
    assert r.status_code == 404 and "metrics.enabled" in r.json()["error"]["message"]
    gw.client("key-1").chat.completions.create(
        model="mock-chat", messages=[{"role": "user", "content": "hi"}]
    )
    assert http.get("/readyz").status_code == 200


def test_text_access_log_with_prompts(
    make_gateway: Callable[..., Gateway], capfd: pytest.CaptureFixture[str]
) -> None:
    cfg = gateway_config(logging={"format": "text", "log_prompts": True, "access_log": True})
    gw = make_gateway(cfg)
    gw.client("key-1").chat.completions.create(
        model="mock-chat", messages=[{"role": "user", "content": "two words"}]
    )
    deadline = time.monotonic() + 5
    out = ""
    while "msg=request" not in out and time.monotonic() < deadline:
        time.sleep(0.05)
        out += capfd.readouterr().out
    line = next(x for x in out.splitlines() if "msg=request" in x)
    assert "tenant=t1" in line and "model=mock-chat" in line and "status=200" in line
    # a value with spaces is JSON-quoted, so the line still splits into key=value pairs
    assert (
        'request_body={"model":"mock-chat","messages":[{"role":"user","content":"two words"}]}'
        in line
    )
    assert "key-1" not in line
