"""Metrics with several worker processes (``gateway serve --workers 2``, state in Redis):
prometheus-client's multiprocess mode in a directory cleaned at start; every scrape, from
whichever worker answers it, sums both workers, and the sums match the ledger."""

from __future__ import annotations

import re
import shutil
import time
from collections import Counter as Tally
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from servers.configs import gateway_config, policy, tenant
from servers.gateway import start_process, write_config
from servers.prometheus import samples, total

pytestmark = [pytest.mark.redis, pytest.mark.slow]

N = 80
TENANTS = {"t1": ("key-1", 50), "t2": ("key-2", 30)}  # name: (key, requests)


def _per_process(directory: Path) -> dict[int, str]:
    """The /metrics text each worker process alone would give."""
    pids = {int(m[1]) for f in directory.glob("*.db") if (m := re.search(r"_(\d+)\.db$", f.name))}
    out = {}
    for pid in pids:
        one = directory.parent / f"only-{pid}"
        one.mkdir()
        for f in directory.glob(f"*_{pid}.db"):
            shutil.copy(f, one / f.name)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(one))  # type: ignore[no-untyped-call]
        out[pid] = generate_latest(registry).decode()
    return out


def _request(url: str, key: str, i: int) -> httpx.Response:
    body: dict[str, Any] = {
        "model": "mock-chat",
        "messages": [{"role": "user", "content": f"post number {i}"}],
    }
    if i % 4 == 0:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    if i % 10 == 1:
        body["temperature"] = 0  # cacheable, and the same each time: hits after the first
        body["messages"] = [{"role": "user", "content": "the same slogan"}]
    # A fresh connection each time, so the kernel spreads them over both workers.
    with httpx.Client(base_url=url, timeout=30) as http:
        r = http.post(
            "/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {key}", "Connection": "close"},
        )
        return r


def test_two_workers_sum_to_the_ledger(tmp_path: Path, redis_state: dict[str, Any]) -> None:
    mp = tmp_path / "multiproc"
    mp.mkdir()
    stale = mp / "counter_424242.db"
    stale.write_bytes(b"left over from an earlier run")
    cfg = gateway_config(
        **redis_state,
        metrics={"multiproc_dir": str(mp)},
        providers={"mock": {"type": "mock", "mock_latency_ms": 20}},
    )
    path = write_config(
        tmp_path / "gw",
        cfg,
        {
            "p": policy(
                {name: tenant(key, budgets={"daily_usd": 10}) for name, (key, _) in TENANTS.items()}
            )
        },
    )
    gw = start_process(path, workers=2, log=tmp_path / "gateway.log")
    try:
        assert not stale.exists(), "the multiprocess directory is emptied at start"
        # both workers have started (each exports the model catalog once it is up)
        deadline = time.monotonic() + 60
        while len(list(mp.glob("gauge_max_*.db"))) < 2:
            assert time.monotonic() < deadline, "the second worker did not start"
            time.sleep(0.1)

        jobs = [(key, i) for key, n in TENANTS.values() for i in range(n)]
        assert len(jobs) == N
        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(lambda job: _request(gw.url, *job).status_code, jobs))
        assert statuses == [200] * N

        with httpx.Client(base_url=gw.url, timeout=30) as http:
            rows: list[dict[str, Any]] = []
            cursor = None
            while True:
                params = {"limit": "1000", **({"cursor": cursor} if cursor else {})}
                page = http.get(
                    "/admin/ledger", params=params, headers={"Authorization": "Bearer admin-key"}
                ).json()
                rows += page["data"]
                cursor = page["next_cursor"]
                if not cursor:
                    break
            # several scrapes on fresh connections: whichever worker answers, the same sums
            pages = []
            for _ in range(6):
                r = http.get("/metrics", headers={"Connection": "close"})
                assert r.status_code == 200
                pages.append(r.text)
    finally:
        gw.stop()

    assert len(rows) == N
    ledger_usd = Decimal(sum(int(r["cost"]) for r in rows)) / Decimal(10**9)
    assert ledger_usd > 0
    hits = sum(1 for r in rows if r["cache"] == "hit")
    assert hits > 0
    for text in pages:
        assert total(text, "gateway_requests_total") == N
        for name, (_, n) in TENANTS.items():
            assert total(text, "gateway_requests_total", tenant=name) == n
        cost = Decimal(str(total(text, "gateway_cost_usd_total")))
        assert abs(cost - ledger_usd) <= Decimal("1e-9"), (cost, ledger_usd)
        assert total(text, "gateway_cost_nanodollars_total") == sum(int(r["cost"]) for r in rows)
        billed = [r for r in rows if r["cache"] != "hit"]
        assert total(text, "gateway_tokens_total", kind="prompt") == sum(
            r["prompt_tokens"] for r in billed
        )
        assert total(text, "gateway_tokens_total", kind="completion") == sum(
            r["completion_tokens"] for r in billed
        )
        assert total(text, "gateway_cache_hits_total") == hits
        assert total(text, "gateway_request_duration_seconds_count") == N
        assert total(text, "gateway_in_flight_requests") == 0
        # gauges are not summed over workers: one series per model, value 1
        info = {
            dict(labels)["model"]: v
            for (n, labels), v in samples(text).items()
            if n == "gateway_model_info"
        }
        assert info == {"mock-chat": 1, "mock-embed": 1}
        assert not any("pid" in dict(labels) for (_, labels) in samples(text))

    # the workers stopped cleanly and took their live gauges along
    assert not list(mp.glob("gauge_live*")), sorted(f.name for f in mp.iterdir())
    # and both workers really served: each one's own files hold part of the requests
    # (read after the stop, so nothing changes underneath)
    per_pid = {pid: total(text, "gateway_requests_total") for pid, text in _per_process(mp).items()}
    served = Tally({pid: n for pid, n in per_pid.items() if n})
    assert len(served) == 2, per_pid
    assert sum(served.values()) == N
