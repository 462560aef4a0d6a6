"""Policy hot reload: on a file change (polled every second) and on SIGHUP, atomically; a
bad edit keeps the old policy, says why and is counted; a request in flight finishes on
the policy it started with."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from fake_upstream import FakeUpstream
from servers.configs import gateway_config, key_hash, policy, tenant
from servers.gateway import Gateway, start_process
from servers.prometheus import total

MSG = [{"role": "user", "content": "hello"}]


def policy_file(gw: Gateway) -> Path:
    return gw.config_path.parent / "policies" / "p.yaml"


def write_policy(gw: Gateway, tenants: dict[str, Any]) -> None:
    policy_file(gw).write_text(yaml.safe_dump(policy(tenants), sort_keys=False))


def status(gw: Gateway, key: str, model: str = "mock-chat") -> int:
    with httpx.Client(base_url=gw.url, timeout=30) as http:
        r = http.post(
            "/v1/chat/completions",
            json={"model": model, "messages": MSG},
            headers={"Authorization": f"Bearer {key}"},
        )
    return r.status_code


def readyz(gw: Gateway) -> dict[str, Any]:
    with httpx.Client(base_url=gw.url, timeout=10) as http:
        body: dict[str, Any] = http.get("/readyz").json()
    return body


def metrics(gw: Gateway) -> str:
    with httpx.Client(base_url=gw.url, timeout=10) as http:
        return http.get("/metrics").text


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Seconds until ``check()`` held; fails after ``timeout``."""
    t0 = time.monotonic()
    while not check():
        assert time.monotonic() - t0 < timeout, f"not within {timeout}s: {what}"
        time.sleep(0.05)
    return time.monotonic() - t0


def test_file_edit_takes_effect_within_two_seconds(
    make_gateway: Callable[..., Gateway],
) -> None:
    gw = make_gateway(gateway_config(), {"p": policy({"t1": tenant("key-1")})})
    digest = readyz(gw)["policy_digest"]
    assert status(gw, "key-2") == 401
    write_policy(gw, {"t1": tenant("key-1"), "t2": tenant("key-2")})
    took = wait_until(lambda: status(gw, "key-2") == 200, 3, "the new key works")
    assert took < 2.5
    assert status(gw, "key-1") == 200
    assert readyz(gw)["policy_digest"] != digest
    text = metrics(gw)
    assert total(text, "gateway_config_reloads_total", result="success") == 1
    assert total(text, "gateway_config_reload_failures_total") == 0
    assert total(text, "gateway_config_last_reload_successful") == 1


def test_in_flight_stream_finishes_on_the_policy_it_started_with(
    make_gateway: Callable[..., Gateway], fake: FakeUpstream
) -> None:
    gw = make_gateway(
        gateway_config(fake.base_url),
        {"p": policy({"t1": tenant("key-1", budgets={"daily_usd": 10})})},
    )
    digest = readyz(gw)["policy_digest"]
    first_chunk = threading.Event()
    result: dict[str, Any] = {}

    def slow_stream() -> None:
        body = {
            "model": "cheap",
            "messages": MSG,
            "stream": True,
            "stream_options": {"include_usage": True},
            "metadata": {"fake": json.dumps({"tokens": 12, "chunk_delay": 0.25})},
        }
        events = []
        with (
            httpx.Client(base_url=gw.url, timeout=30) as http,
            http.stream(
                "POST",
                "/v1/chat/completions",
                json=body,
                headers={"Authorization": "Bearer key-1"},
            ) as r,
        ):
            result["status"] = r.status_code
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    first_chunk.set()
        result["events"] = events

    thread = threading.Thread(target=slow_stream)
    thread.start()
    try:
        assert first_chunk.wait(10)
        # the tenant's key is removed while its stream runs (3 s at 4 chunks a second)
        write_policy(gw, {"t1": tenant("another-key", budgets={"daily_usd": 10})})
        wait_until(lambda: readyz(gw)["policy_digest"] != digest, 3, "the reload")
        assert status(gw, "key-1", "cheap") == 401  # new requests: the new policy
        assert thread.is_alive(), "the stream should still be running"
    finally:
        thread.join(30)
    assert result["status"] == 200
    events = result["events"]
    assert events[-1] == "[DONE]"
    final = json.loads(events[-2])
    assert final["usage"]["completion_tokens"] == 12
    cost = final["x_gateway"]["cost_usd"]
    assert float(cost) > 0
    # charged to t1, in full, on the policy it started with
    with httpx.Client(base_url=gw.url, timeout=10) as http:
        rows = http.get(
            "/admin/ledger",
            params={"tenant": "t1"},
            headers={"Authorization": "Bearer admin-key"},
        ).json()["data"]
    streamed = [r for r in rows if r["status"] == 200]
    assert len(streamed) == 1 and streamed[0]["cost_usd"] == cost


def _same_size_and_mtime(path: Path, text: str) -> None:
    """Rewrite ``path`` so that polling cannot notice (same size, same mtime)."""
    st = path.stat()
    assert len(text.encode()) == st.st_size
    path.write_text(text)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.slow
def test_sighup_and_a_bad_edit_in_a_gateway_process(tmp_path: Path) -> None:
    from servers.gateway import write_config

    path = write_config(
        tmp_path,
        gateway_config(logging={"level": "info", "access_log": False}),
        {"p": policy({"t1": tenant("key-1")})},
    )
    log = tmp_path / "gateway.log"
    gw = start_process(path, log=log)
    try:
        pfile = policy_file(gw)
        # -- SIGHUP: an edit the file poller cannot see takes effect on the signal
        old = pfile.read_text()
        new = old.replace(key_hash("key-1"), key_hash("key-9"))
        _same_size_and_mtime(pfile, new)
        time.sleep(1.5)  # two poll intervals
        assert status(gw, "key-9") == 401, "the poller should not have seen this edit"
        assert gw.process is not None
        gw.process.send_signal(signal.SIGHUP)
        wait_until(lambda: status(gw, "key-9") == 200, 2, "SIGHUP reload")
        assert status(gw, "key-1") == 401
        assert gw.process.poll() is None  # SIGHUP did not stop the process

        # -- a bad edit: the old policy stays, the reason is logged, counted and shown
        bad = yaml.safe_load(pfile.read_text())
        bad["tenants"]["t2"] = {"keys": [key_hash("key-2")], "budgets": {"daily_usd": -5}}
        pfile.write_text(yaml.safe_dump(bad))
        wait_until(lambda: "policy_reload_error" in readyz(gw), 3, "the refusal")
        ready = readyz(gw)
        assert ready["status"] == "ready"  # the old policy still serves
        assert "p.yaml" in ready["policy_reload_error"]
        assert "daily_usd" in ready["policy_reload_error"]
        assert status(gw, "key-9") == 200 and status(gw, "key-2") == 401
        text = metrics(gw)
        assert total(text, "gateway_config_reload_failures_total") == 1
        assert total(text, "gateway_config_reloads_total", result="failure") == 1
        assert total(text, "gateway_config_last_reload_successful") == 0
        logged = [json.loads(ln) for ln in log.read_text().splitlines() if ln.startswith("{")]
        refused = [d for d in logged if "policy reload refused" in d["msg"]]
        assert len(refused) == 1 and refused[0]["level"] == "error"
        assert "p.yaml" in refused[0]["msg"] and "daily_usd" in refused[0]["msg"]

        # -- not YAML at all: refused too
        pfile.write_text("tenants: [unclosed\n")
        wait_until(
            lambda: total(metrics(gw), "gateway_config_reload_failures_total") == 2,
            3,
            "the second refusal",
        )
        assert "invalid YAML" in readyz(gw)["policy_reload_error"]
        assert status(gw, "key-9") == 200

        # -- fixed: reloaded, the error is gone
        bad["tenants"]["t2"]["budgets"]["daily_usd"] = 5
        pfile.write_text(yaml.safe_dump(bad))
        wait_until(lambda: status(gw, "key-2") == 200, 3, "the fixed policy")
        assert "policy_reload_error" not in readyz(gw)
        text = metrics(gw)
        assert total(text, "gateway_config_last_reload_successful") == 1
        assert total(text, "gateway_config_reloads_total", result="success") == 2
    finally:
        gw.stop()
