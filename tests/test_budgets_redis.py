"""Budgets on Redis: several gateway processes share one budget exactly, and the gateway
never fails open when Redis is unreachable."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fake_upstream import FakeUpstream
from servers.configs import gateway_config, policy, tenant
from servers.gateway import Gateway, free_port, start_process, write_config
from test_budgets import budget_for_20, hammer, nanos

MSG = [{"role": "user", "content": "Write one line about budgets"}]
AUTH = {"Authorization": "Bearer key-1"}


def worst_case(tmp_path: Path, cfg: dict[str, Any]) -> int:
    """What one request of the test reserves, asked of a gateway's estimate endpoint."""
    probe = write_config(tmp_path / "probe", cfg, {"p": policy({"t1": tenant("key-1")})})
    gw = start_process(probe, log=tmp_path / "probe.log")
    try:
        with httpx.Client(timeout=30) as http:
            est = http.post(
                gw.url + "/v1/gateway/estimate",
                headers=AUTH,
                json={"model": "cheap", "messages": MSG, "max_tokens": 100},
            ).json()
    finally:
        gw.stop()
    return nanos(est["reserve_usd"])


async def test_two_processes_share_one_budget_exactly(
    tmp_path: Path, fake: FakeUpstream, redis_state: dict[str, Any]
) -> None:
    cfg = gateway_config(fake.base_url, **redis_state)
    worst = worst_case(tmp_path, cfg)
    limit, limit_usd = budget_for_20(worst)
    path = write_config(
        tmp_path / "run",
        cfg,
        {"p": policy({"t1": tenant("key-1", budgets={"daily_usd": limit_usd})})},
    )
    a = start_process(path, log=tmp_path / "a.log")
    b = start_process(path, log=tmp_path / "b.log")
    try:
        await hammer([a, b], worst, limit, "redis, 2 gateway processes")
    finally:
        a.stop()
        b.stop()


@pytest.fixture
def redis_port() -> Iterator[tuple[int, Callable[[], subprocess.Popen[bytes]]]]:
    """A port for a private redis-server the test starts and kills."""
    port = free_port()
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        procs.append(proc)
        deadline = time.monotonic() + 10
        while (
            subprocess.run(
                ["redis-cli", "-p", str(port), "ping"], capture_output=True, check=False
            ).stdout.strip()
            != b"PONG"
        ):
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
        return proc

    yield port, start
    for p in procs:
        p.kill()
        p.wait()


def test_never_fails_open_when_redis_is_unreachable(
    make_gateway: Callable[..., Gateway],
    fake: FakeUpstream,
    redis_port: tuple[int, Callable[[], subprocess.Popen[bytes]]],
) -> None:
    port, start_redis = redis_port
    gw = make_gateway(
        gateway_config(fake.base_url, state=f"redis://127.0.0.1:{port}/0"),
        {"p": policy({"t1": tenant("key-1", budgets={"daily_usd": 1})})},
    )
    http = gw.http()
    body = {"model": "cheap", "messages": MSG}
    ready = http.get("/readyz")
    assert ready.status_code == 503
    assert "state backend unavailable" in " ".join(ready.json()["problems"])
    r = http.post("/v1/chat/completions", json=body, headers=AUTH)
    assert r.status_code == 503
    err = r.json()["error"]
    assert (
        err["code"] == "state_backend_unavailable" and "no request is forwarded" in err["message"]
    )
    assert fake.calls() == 0

    redis = start_redis()  # the gateway retries and becomes ready by itself
    deadline = time.monotonic() + 10
    while http.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, "the gateway did not notice Redis came back"
        time.sleep(0.2)
    assert http.post("/v1/chat/completions", json=body, headers=AUTH).status_code == 200

    redis.kill()
    redis.wait()
    r = http.post("/v1/chat/completions", json=body, headers=AUTH)
    assert r.status_code == 503 and r.json()["error"]["code"] == "state_backend_unavailable"
    assert fake.calls() == 1, "nothing is forwarded while budgets cannot be checked"
    assert http.get("/readyz").status_code == 503
