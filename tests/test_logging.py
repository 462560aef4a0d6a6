"""Logs of a real ``gateway serve`` process: one structured access line per request on
stdout, other logs on stderr; never a key or prompt text unless the operator turns on
``logging.log_prompts``; the format and level are honoured."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fake_upstream import FakeUpstream
from servers.configs import PROVIDER_KEY, gateway_config, key_hash, policy, tenant
from servers.gateway import free_port, write_config

from gateway.config.deployment import LoggingConfig
from gateway.logs import AccessLog

KEY = "sk-tenant-very-secret-key-4242"
PROMPT = "Zebra prompt text that must stay private 7731"
ACCESS_FIELDS = {
    "ts",
    "msg",
    "request_id",
    "endpoint",
    "tenant",
    "key",
    "requested_model",
    "model",
    "provider",
    "route",
    "stream",
    "status",
    "error",
    "prompt_tokens",
    "cached_tokens",
    "completion_tokens",
    "reasoning_tokens",
    "cost_usd",
    "cache",
    "replay",
    "latency_ms",
    "upstream_ms",
}


class Served:
    def __init__(self, url: str, out: Path, err: Path) -> None:
        self.url = url
        self.out = out
        self.err = err

    def stdout(self) -> str:
        return self.out.read_text()

    def stderr(self) -> str:
        return self.err.read_text()

    def access_lines(self, count: int, timeout: float = 10) -> list[str]:
        """Wait for ``count`` access lines (written every 100 ms) and return them."""
        deadline = time.monotonic() + timeout
        while True:
            lines = [ln for ln in self.stdout().splitlines() if ln.strip()]
            if len(lines) >= count or time.monotonic() > deadline:
                return lines
            time.sleep(0.05)


@contextlib.contextmanager
def serve(directory: Path, config: dict[str, Any], broken_stdout: bool = False) -> Iterator[Served]:
    """``gateway serve`` with stdout and stderr in files of their own (or, with
    ``broken_stdout``, stdout a pipe whose reader is gone once the gateway is ready)."""
    path = write_config(directory, config, {"p": policy({"t1": tenant(KEY)})})
    port = free_port()
    out, err = directory / "stdout.log", directory / "stderr.log"
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(path), "--port", str(port)],
            stdout=subprocess.PIPE if broken_stdout else o,
            stderr=e,
            env=dict(os.environ),
            start_new_session=True,
        )
    served = Served(f"http://127.0.0.1:{port}", out, err)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"gateway exited:\n{served.stderr()}"
            with contextlib.suppress(httpx.HTTPError), httpx.Client(timeout=2) as http:
                if http.get(served.url + "/readyz").status_code == 200:
                    break
            assert time.monotonic() < deadline, "gateway not ready in 60s"
            time.sleep(0.1)
        if proc.stdout is not None:
            proc.stdout.close()
        yield served
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _config(fake: FakeUpstream, **logging: Any) -> dict[str, Any]:
    return gateway_config(fake.base_url, logging={"access_log": True, **logging})


def _requests(url: str) -> list[httpx.Response]:
    """A success, a stream, an upstream failure, a bad key and a malformed body."""
    msgs = [{"role": "user", "content": PROMPT}]
    auth = {"Authorization": f"Bearer {KEY}"}
    out = []
    with httpx.Client(base_url=url, timeout=30) as http:
        out.append(
            http.post(
                "/v1/chat/completions", json={"model": "cheap", "messages": msgs}, headers=auth
            )
        )
        with http.stream(
            "POST",
            "/v1/chat/completions",
            json={"model": "cheap", "messages": msgs, "stream": True},
            headers=auth,
        ) as r:
            r.read()
            out.append(r)
        body = {"model": "cheap", "messages": msgs, "metadata": {"fake": '{"status": 500}'}}
        out.append(http.post("/v1/chat/completions", json=body, headers=auth))
        wrong = {"Authorization": f"Bearer {KEY}-wrong"}
        out.append(
            http.post(
                "/v1/chat/completions", json={"model": "cheap", "messages": msgs}, headers=wrong
            )
        )
        out.append(
            http.post(
                "/v1/chat/completions",
                json={"model": "cheap", "messages": msgs, "max_tokens": PROMPT},
                headers=auth,
            )
        )
    assert [r.status_code for r in out] == [200, 200, 502, 401, 400]
    return out


def _in_request_order(lines: list[str], responses: list[httpx.Response]) -> list[dict[str, Any]]:
    """The access entries, one per response, matched by request id (lines are written
    when a request is recorded, which may be after the next one started)."""
    assert len(lines) == len(responses), lines
    by_id = {e["request_id"]: e for e in map(json.loads, lines)}
    return [by_id[r.headers["x-gateway-request-id"]] for r in responses]


def test_one_json_access_line_per_request_without_secrets(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    with serve(tmp_path, _config(fake, level="info", format="json")) as gw:
        responses = _requests(gw.url)
        lines = gw.access_lines(len(responses))
        stderr = gw.stderr()
        stdout = gw.stdout()
    entries = _in_request_order(lines, responses)
    for entry, resp in zip(entries, responses, strict=True):
        assert set(entry) >= ACCESS_FIELDS, ACCESS_FIELDS - set(entry)
        assert entry["msg"] == "request"
        assert entry["status"] == resp.status_code
        assert entry["request_id"] == resp.headers["x-gateway-request-id"]
        assert "request_body" not in entry
    ok, stream, failed, unauthorized, bad = entries
    assert ok["tenant"] == "t1" and ok["model"] == "cheap" and ok["provider"] == "fake"
    assert ok["route"] == "direct" and ok["cache"] == "bypass" and not ok["stream"]
    assert ok["cost_usd"] == responses[0].headers["x-gateway-cost-usd"]
    assert ok["prompt_tokens"] > 0 and ok["completion_tokens"] > 0
    assert ok["latency_ms"] >= ok["upstream_ms"] > 0
    assert ok["key"] == key_hash(KEY).removeprefix("sha256:")[:12]  # a fingerprint only
    assert stream["stream"] and stream["ttft_ms"] > 0 and stream["completion_tokens"] > 0
    assert failed["error"] == "upstream_error" and failed["cost_usd"] == "0.000000000"
    assert unauthorized["tenant"] == "" and unauthorized["error"] == "invalid_api_key"
    assert bad["error"] == "invalid_request_error" and bad["tenant"] == "t1"
    # nothing secret anywhere: not the tenant's key, not its full hash, not the provider's
    # key, not the prompt
    everything = stdout + stderr
    for secret in (KEY, key_hash(KEY).removeprefix("sha256:"), PROVIDER_KEY, PROMPT, "Zebra"):
        assert secret not in everything, secret
    # other logs: JSON lines on stderr, info level included
    logs = [json.loads(ln) for ln in stderr.splitlines() if ln.strip()]
    assert logs and all({"ts", "level", "logger", "msg"} <= set(d) for d in logs)
    assert any(d["msg"].startswith("gateway ready") and d["level"] == "info" for d in logs)
    assert not any(d.get("msg") == "request" for d in logs)


def test_prompts_are_logged_only_when_enabled(fake: FakeUpstream, tmp_path: Path) -> None:
    with serve(tmp_path, _config(fake, log_prompts=True, level="warning")) as gw:
        responses = _requests(gw.url)
        entries = _in_request_order(gw.access_lines(len(responses)), responses)
        stderr = gw.stderr()
    assert entries[0]["request_body"]["messages"][0]["content"] == PROMPT
    assert entries[1]["request_body"]["stream"] is True
    assert not entries[3].get("request_body")  # unauthenticated: the body was never read
    text = json.dumps(entries)
    assert KEY not in text and PROVIDER_KEY not in text  # keys never, even now
    # level warning: the info lines are gone, the log is not empty of everything
    assert "gateway ready" not in stderr


def test_text_format(fake: FakeUpstream, tmp_path: Path) -> None:
    with serve(tmp_path, _config(fake, format="text", level="debug")) as gw:
        responses = _requests(gw.url)
        lines = gw.access_lines(len(responses))
        stderr = gw.stderr()
    assert len(lines) == len(responses)
    entries = [dict(part.split("=", 1) for part in ln.split(" ") if "=" in part) for ln in lines]
    by_id = {e["request_id"]: e for e in entries}
    first = by_id[responses[0].headers["x-gateway-request-id"]]
    assert first["msg"] == "request" and first["tenant"] == "t1" and first["status"] == "200"
    assert first["cost_usd"] == responses[0].headers["x-gateway-cost-usd"]
    assert not any(ln.startswith("{") for ln in lines)
    assert " INFO gateway: gateway ready" in stderr  # text lines on stderr
    assert not any(ln.startswith("{") for ln in stderr.splitlines())
    for secret in (KEY, PROVIDER_KEY, PROMPT):
        assert secret not in "\n".join(lines) + stderr


class _BrokenPipe(io.BytesIO):
    """stdout whose reader went away, until ``fixed``."""

    fixed = False

    def write(self, data: bytes) -> int:  # type: ignore[override]
        if not self.fixed:
            raise BrokenPipeError(32, "Broken pipe")
        return super().write(data)


def test_access_lines_that_cannot_be_written_are_counted_and_reported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stream = _BrokenPipe()
    dropped: list[int] = []
    access = AccessLog(LoggingConfig(format="json"), stream=stream, on_drop=dropped.append)
    access._buf += [b'{"msg":"request"}\n'] * 3
    with caplog.at_level(logging.WARNING, logger="gateway.logs"):
        access.flush()
        access._buf.append(b'{"msg":"request"}\n')
        access.flush()
    assert dropped == [3, 1]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "BrokenPipeError" in warnings[0]  # once per outage
    assert "gateway_access_log_lines_dropped_total" in warnings[0]
    stream.fixed = True
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gateway.logs"):
        access._buf.append(b'{"msg":"request"}\n')
        access.flush()
    assert stream.getvalue() == b'{"msg":"request"}\n' and dropped == [3, 1]
    assert [r.getMessage() for r in caplog.records] == ["access log lines are written again"]


def test_a_gateway_whose_stdout_is_gone_counts_the_lines_it_drops(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    with serve(tmp_path, _config(fake, format="json"), broken_stdout=True) as gw:
        with httpx.Client(base_url=gw.url, timeout=30) as http:
            for _ in range(3):
                r = http.post(
                    "/v1/chat/completions",
                    json={"model": "cheap", "messages": [{"role": "user", "content": "hi"}]},
                    headers={"Authorization": f"Bearer {KEY}"},
                )
                assert r.status_code == 200  # requests are served all the same
            deadline = time.monotonic() + 10
            dropped = 0.0
            while dropped < 3 and time.monotonic() < deadline:
                time.sleep(0.1)  # lines are written every 100 ms
                for line in http.get("/metrics").text.splitlines():
                    if line.startswith("gateway_access_log_lines_dropped_total "):
                        dropped = float(line.split()[1])
        stderr = gw.stderr()
    assert dropped == 3
    assert stderr.count("access log lines cannot be written (BrokenPipeError") == 1
