"""Many requests at once against one tenant's budget: never a nano-dollar over the limit.

200 admissions race for a budget that fits about 20 worst cases, first on one event loop
(``asyncio.gather``), then from two OS processes sharing the Redis prefix. Every admitted
request settles for a random actual cost (at most what it reserved, or more in the
overrun case). Run with ``pytest -s`` to see the figures."""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis.asyncio
from state_support import REDIS_URL, delete_prefix, needs_redis, new_prefix

from gateway.config.snapshot import BudgetLimits
from gateway.state.base import Admission, LedgerQuery, LedgerRow, RateLimits, Settlement
from gateway.state.redis import RedisState

pytestmark = needs_redis

TENANT = "race"
WORST = 1_000_003  # nano-dollars: the worst case of one request
LIMIT = 20 * WORST + WORST // 2  # fits 20.5 worst cases
BUDGETS = BudgetLimits(daily=LIMIT, monthly=LIMIT + 7, total=LIMIT)
N = 200
HERE = Path(__file__).resolve().parent


@dataclass
class Outcome:
    admitted: int = 0
    clamped: int = 0
    rejected: int = 0
    charged: int = 0

    def add(self, other: Outcome) -> None:
        self.admitted += other.admitted
        self.clamped += other.clamped
        self.rejected += other.rejected
        self.charged += other.charged


async def storm(state: RedisState, n: int, seed: int, actual: str) -> Outcome:
    """``n`` concurrent requests arriving within 100 ms: admit the worst case (every third in
    clamp mode), hold the reservation a moment, settle for a cost drawn by ``actual``:
    'random' (0..granted), 'full' (granted) or 'overrun' (more than granted). Settled
    requests give back what they did not spend, so later arrivals can use it."""
    rng = random.Random(seed)
    out = Outcome()

    async def one(i: int) -> None:
        rid = f"s{seed}-{i}"
        clamp = actual == "random" and i % 3 == 0
        await asyncio.sleep(rng.random() * 0.1)
        res = await state.admit(
            Admission(TENANT, rid, WORST, 100, BUDGETS, RateLimits(), 60_000,
                      min_amount=WORST // 4 if clamp else None)
        )  # fmt: skip
        if not res.ok:
            assert (res.rejected_by, res.granted) == ("budget", 0)
            out.rejected += 1
            return
        out.admitted += 1
        out.clamped += res.granted < WORST
        await asyncio.sleep(rng.random() * 0.005)
        cost = {
            "random": rng.randint(0, res.granted),
            "full": res.granted,
            "overrun": res.granted + rng.randint(1, WORST),
        }[actual]
        row = LedgerRow(id=rid, ts_ms=res.now_ms, tenant=TENANT, key_fp="k", endpoint="chat",
                        requested_model="m", reserved=res.granted)  # fmt: skip
        s = await state.settle(Settlement(TENANT, rid, cost, 0, BUDGETS, row))
        assert s.charged == min(cost, res.granted) == row.cost
        out.charged += s.charged

    await asyncio.gather(*(one(i) for i in range(n)))
    return out


async def check_books(state: RedisState, out: Outcome, label: str, seconds: float) -> None:
    usage = await state.usage(TENANT, BUDGETS)
    ledger = await state.ledger(LedgerQuery(tenant=TENANT, limit=10_000))
    spent = usage[0].spent
    print(
        f"\n{label}: {out.admitted} admitted ({out.clamped} clamped), {out.rejected} rejected; "
        f"spent {spent} of {LIMIT} nano-dollars ({spent / LIMIT:.2%}); "
        f"{seconds * 1000:.0f} ms wall for {N} requests (arrivals spread over 100 ms)"
    )
    assert out.admitted + out.rejected == N
    for w in usage:
        assert w.spent <= (w.limit or 0), w  # never even 1 nano-dollar over
        assert w.reserved == 0, w
    assert spent == out.charged == sum(r.cost for r in ledger.rows)
    assert len(ledger.rows) == out.admitted


@pytest.fixture
async def state() -> AsyncIterator[RedisState]:
    s = RedisState(REDIS_URL, prefix=new_prefix())  # the Redis clock, as in production
    await s.start()
    try:
        yield s
    finally:
        await s.close()
        await delete_prefix(s.prefix)


@pytest.mark.parametrize("actual", ["random", "full", "overrun"])
async def test_concurrent_admissions_never_overspend(state: RedisState, actual: str) -> None:
    t0 = time.perf_counter()
    out = await storm(state, N, seed=1, actual=actual)
    await check_books(state, out, f"1 process, actual={actual}", time.perf_counter() - t0)
    if actual != "random":
        # Each admitted request spends its whole worst case: exactly 20 fit, whatever the
        # interleaving.
        assert out.admitted == 20 and out.charged == 20 * WORST


# -- two processes -------------------------------------------------------------------
async def worker(prefix: str, seed: int) -> None:
    """Run in a child process: wait for the go signal, race, report as JSON on stdout."""
    state = RedisState(REDIS_URL, prefix=prefix)
    await state.start()
    client = redis.asyncio.Redis.from_url(REDIS_URL)
    try:
        print("ready", flush=True)
        assert await client.blpop([f"{prefix}:go"], timeout=30)
        out = await storm(state, N // 2, seed=seed, actual="random")
        print(json.dumps(out.__dict__), flush=True)
    finally:
        await client.aclose()
        await state.close()


CHILD = (
    "import asyncio, sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]; "
    "import test_redis_concurrency as t; asyncio.run(t.worker(sys.argv[3], int(sys.argv[4])))"
)


async def test_two_processes_never_overspend() -> None:
    prefix = new_prefix()
    env = {**os.environ, "GATEWAY_TEST_REDIS_URL": REDIS_URL}
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            CHILD,
            str(HERE),
            str(HERE.parents[1]),
            prefix,
            str(seed),
            stdout=asyncio.subprocess.PIPE,
            env=env,
        )
        for seed in (11, 12)
    ]
    state = RedisState(REDIS_URL, prefix=prefix)
    client = redis.asyncio.Redis.from_url(REDIS_URL)
    try:
        for p in procs:
            assert p.stdout is not None
            line = await asyncio.wait_for(p.stdout.readline(), 60)
            assert line.strip() == b"ready", line
        t0 = time.perf_counter()
        await client.rpush(f"{prefix}:go", "go", "go")  # both start at once
        outputs = [await asyncio.wait_for(p.communicate(), 60) for p in procs]
        seconds = time.perf_counter() - t0
        assert [p.returncode for p in procs] == [0, 0]
        total = Outcome()
        for stdout, _ in outputs:
            total.add(Outcome(**json.loads(stdout.decode().strip().splitlines()[-1])))
        await check_books(state, total, "2 processes, actual=random", seconds)
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()
        await client.aclose()
        await state.close()
        await delete_prefix(prefix)
