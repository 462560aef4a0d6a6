"""The benchmark still runs end to end (it is a measurement, never a timed test: nothing
here checks a speed). A short run of ``python -m loadtests.bench`` on both state
backends: the fast upstream, the load generator, the gateway, the private Redis and the
report all work, every request succeeds, and Redis state still makes two round trips per
request outside the cache (issue 7's target, counted with MONITOR)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_a_short_benchmark_run_completes_without_errors(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "loadtests.bench",
            "--state",
            "both",
            "--scenarios",
            "json-c1,stream-c50",
            "--warmup",
            "0.3",
            "--duration",
            "1",
            "--json",
            str(out),
        ],
        cwd=REPO,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["skipped"] == []
    assert results["redis"]["private_pinned_to_driver_core"] is not None
    rows = {(r["state"], r["scenario"]): r["gateway"] for r in results["rows"]}
    assert set(rows) == {
        (state, scenario)
        for state in ("embedded", "redis")
        for scenario in ("json-c1", "stream-c50")
    }
    for (state, scenario), g in rows.items():
        assert g["requests"] > 0 and g["errors"] == 0, (state, scenario, g["statuses"])
        assert set(g["statuses"]) == {"200"}
        assert g["gateway_cpu_ms_per_request"] > 0 and g["peak_rss_mb"] > 0
        assert 0 <= g["gateway_kernel_pct"] <= 100
        # at least: the request and the upstream's answer read, the upstream request
        # and the answer written
        assert g["gateway_reads_per_request"] >= 2 and g["gateway_writes_per_request"] >= 2
    assert rows["embedded", "stream-c50"]["ttft_p50_ms"] is not None
    for scenario in ("json-c1", "stream-c50"):
        direct = results["direct"][scenario]
        assert direct["requests"] > 0 and direct["errors"] == 0
    for kind in ("json", "stream"):
        trips = results["redis_trips"][kind]
        assert trips["outside_cache_per_request"] == 2.0, trips
        assert trips["cache_per_request"] == 1.0, trips
        # the lookup admits the miss it finds, the store ends the single flight
        assert trips["commands_per_request"] == {
            "EVALSHA (cache+state)": 1.0,
            "EVALSHA (state)": 1.0,
            "EVALSHA (cache)": 1.0,
        }, trips
    assert "| state | scenario |" in proc.stdout and "Targets (redis state):" in proc.stdout
    interp = results["machine"]["interpreter"]
    assert interp["executable"] == sys.executable and interp["reference_ms"] > 0
    assert interp["libpython"] in ("shared", "static")
    assert f"fib(25) in {interp['reference_ms']} ms" in proc.stdout


@pytest.mark.skipif(
    shutil.which("valgrind") is None or shutil.which("callgrind_control") is None,
    reason="needs valgrind",
)
def test_instruction_counts_run_end_to_end(tmp_path: Path) -> None:
    """``loadtests.instructions``: the gateway under callgrind, counters zeroed after the
    warm-up and dumped after the measured requests, a count per request reported; in
    Redis state the private redis-server's count beside it."""
    states = "both" if shutil.which("redis-server") else "embedded"
    proc = subprocess.run(
        [sys.executable, "-m", "loadtests.instructions", "--state", states,
         "--scenarios", "json-c50", "--requests", "60", "--warmup", "20",
         "--keep", str(tmp_path)],
        cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    row = next(line for line in lines if line.startswith("| embedded |"))
    per_request = int(row.split("|")[3].replace(",", ""))
    # more than the request's parsing alone; less than the whole start-up (not counted)
    assert 100_000 < per_request < 50_000_000, row
    assert row.split("|")[4].strip() == "", row  # no Redis in embedded state
    assert (tmp_path / "embedded-json-c50.out").stat().st_size > 0
    if states == "both":
        row = next(line for line in lines if line.startswith("| redis |"))
        gateway, redis = (int(row.split("|")[i].replace(",", "")) for i in (3, 4))
        assert 100_000 < gateway < 50_000_000, row
        # three scripts per request (cache lookup with admission, settlement, cache store)
        assert 50_000 < redis < 20_000_000, row
        assert (tmp_path / "redis-json-c50.redis.out").stat().st_size > 0
