"""What `gateway serve` sets up for itself as a process: the garbage collector tuned for
serving (gctune), and process metrics on /metrics."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
from fake_upstream import FakeUpstream
from servers.configs import gateway_config, policy, tenant
from servers.gateway import start_process, write_config
from servers.prometheus import total

from gateway import gctune

MSG = [{"role": "user", "content": "hello there"}]


async def _concurrently(url: str, n: int, concurrency: int) -> None:
    """``n`` streamed chat requests, ``concurrency`` at a time."""
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:

        async def one(i: int) -> None:
            async with sem:
                r = await http.post(
                    "/v1/chat/completions",
                    json={"model": "cheap", "messages": MSG, "user": f"u{i}", "stream": True},
                    headers={"Authorization": "Bearer key-1"},
                )
                assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n"), r.text

        await asyncio.gather(*(one(i) for i in range(n)))


def test_served_process_collects_garbage_rarely(tmp_path: Path, fake: FakeUpstream) -> None:
    path = write_config(
        tmp_path, gateway_config(fake.base_url), {"p": policy({"t1": tenant("key-1")})}
    )
    gw = start_process(path, log=tmp_path / "gateway.log")
    try:
        with httpx.Client(base_url=gw.url, timeout=30) as http:

            def collections() -> float:
                return total(http.get("/metrics").text, "python_gc_collections_total")

            before = collections()
            n = 400
            asyncio.run(_concurrently(gw.url, n, 50))
            text = http.get("/metrics").text
    finally:
        gw.stop()
    # Fifty requests in flight hold thousands of objects the collector tracks: with
    # CPython's default threshold (700) these 400 requests set off about 30 collections
    # (measured: 28); with the gateway's, none or a few.
    assert total(text, "python_gc_collections_total") - before < 8
    assert total(text, "process_resident_memory_bytes") > 10 * 2**20
    assert gctune.YOUNG_THRESHOLD > 10 * 700
