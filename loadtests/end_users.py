"""Does the hot path slow down with many end users? Measured on the state backends.

For each backend (embedded: SQLite file in a temporary directory; redis: the server in
``GATEWAY_BENCH_REDIS_URL``, default redis://127.0.0.1:6379/0, under a key prefix of its
own, deleted afterwards), one tenant:

1. calls (admit + settle, as the pipeline makes them) from a handful of end users, at
   concurrency 50: the baseline;
2. 100,000 end users each topped up and charged once;
3. the same calls again, now spread over all 100,000 end users;

and prints throughput and p50/p99 latency of an admit+settle pair before and after, the
memory the end users took, and (embedded) how long a restart takes to rebuild them.

    python -m loadtests.end_users [--end-users 100000] [--calls 20000] [--state both]

A figure table, not a timed test."""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import resource
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable

import redis.asyncio

from gateway.config.snapshot import BudgetLimits
from gateway.pipeline.context import new_request_id
from gateway.state.base import (
    Admission,
    EndUserTerms,
    LedgerRow,
    RateLimits,
    Settlement,
    StateBackend,
)
from gateway.state.embedded import EmbeddedState
from gateway.state.redis import RedisState


def rid() -> str:
    """A ledger row id as the gateway makes them (time-ordered)."""
    return new_request_id(int(time.time() * 1000))


REDIS_URL = os.environ.get("GATEWAY_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
TENANT = "bench"
WORST = 2_000_000  # nano-dollars reserved per call
BUDGETS = BudgetLimits(daily=10**15, monthly=10**15)
EU_BUDGETS = BudgetLimits(daily=10**12, monthly=10**13)


def terms(i: int) -> EndUserTerms:
    return EndUserTerms(f"user-{i}", EU_BUDGETS, RateLimits(tpm=10**9, concurrent=50), True)


def row(rid: str, end_user: str, credit: int = 0) -> LedgerRow:
    return LedgerRow(
        id=rid,
        ts_ms=int(time.time() * 1000),
        tenant=TENANT,
        key_fp="bench",
        endpoint="credits" if credit else "chat",
        requested_model="" if credit else "cheap",
        end_user=end_user,
        credit=credit,
    )


async def call(state: StateBackend, eu: EndUserTerms) -> float:
    """One admit + settle pair, as a request makes them; its latency in ms."""
    request_id = rid()
    t0 = time.perf_counter()
    a = await state.admit(
        Admission(TENANT, request_id, WORST, 500, BUDGETS, RateLimits(), 300_000, end_user=eu)
    )
    if not a.ok:
        raise RuntimeError(f"refused: {a.rejected_by}")
    await state.settle(
        Settlement(
            TENANT, request_id, WORST // 3, -100, BUDGETS, row(request_id, eu.id), end_user=eu
        )
    )
    return (time.perf_counter() - t0) * 1000


async def run(n: int, concurrency: int, job: Callable[[int], Awaitable[float]]) -> list[float]:
    out: list[float] = []
    it = iter(range(n))

    async def worker() -> None:
        for i in it:
            out.append(await job(i))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out


def figures(label: str, lat: list[float], seconds: float) -> str:
    q = statistics.quantiles(lat, n=100)
    return (
        f"  {label:<34} {len(lat) / seconds:>8,.0f} calls/s   "
        f"p50 {q[49]:6.2f} ms   p99 {q[98]:6.2f} ms"
    )


async def measure(state: StateBackend, label: str, users: int, calls: int) -> str:
    rng = random.Random(1)
    if users <= 1000:  # the few end users of the baseline: credits for every call
        for i in range(users):
            await state.top_up(TENANT, rid(), row(rid(), f"user-{i}", 10**12))
    pool = [terms(i) for i in range(users)] if users <= 1000 else None

    async def job(_: int) -> float:
        eu = pool[rng.randrange(len(pool))] if pool else terms(rng.randrange(users))
        return await call(state, eu)

    t0, c0 = time.perf_counter(), time.process_time()
    lat = await run(calls, 50, job)
    cpu = (time.process_time() - c0) * 1000 / calls
    return figures(label, lat, time.perf_counter() - t0) + f"   CPU {cpu:.3f} ms/call"


async def populate(state: StateBackend, users: int) -> float:
    t0 = time.perf_counter()

    async def one(i: int) -> float:
        eu = f"user-{i}"
        await state.top_up(TENANT, f"topup-{i}", row(rid(), eu, 10**9))
        return await call(state, terms(i))

    await run(users, 200, one)
    return time.perf_counter() - t0


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def redis_memory(client: redis.asyncio.Redis) -> float:
    info = await client.info("memory")
    return int(info["used_memory"]) / 2**20


async def bench_embedded(users: int, calls: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/ledger.db"
        state = EmbeddedState(path)
        await state.start()
        before = rss_mb()
        print("embedded (SQLite ledger, counters in memory)")
        print(await measure(state, "10 end users, baseline", 10, calls))
        took = await populate(state, users)
        grown = rss_mb() - before
        print(f"  {users:,} end users topped up and charged once in {took:.1f} s")
        print(await measure(state, f"spread over {users:,} end users", users, calls))
        print(await measure(state, "10 end users again", 10, calls))
        await state.close()
        t0 = time.perf_counter()
        again = EmbeddedState(path)
        await again.start()
        restart = time.perf_counter() - t0
        bal = await again.end_user_usage(TENANT, terms(users - 1))
        await again.close()
        print(
            f"  process memory for them: +{grown:.0f} MB; restart rebuilds them in "
            f"{restart:.2f} s (last end user's balance ${bal.balance / 1e9:.9f})"
        )


async def bench_redis(users: int, calls: int) -> None:
    prefix = f"gwbench:{uuid.uuid4().hex[:8]}"
    state = RedisState(REDIS_URL, prefix=prefix)
    client = redis.asyncio.Redis.from_url(REDIS_URL)
    await state.start()
    try:
        before = await redis_memory(client)
        print(f"redis ({REDIS_URL}, prefix {prefix})")
        print(await measure(state, "10 end users, baseline", 10, calls))
        took = await populate(state, users)
        print(f"  {users:,} end users topped up and charged once in {took:.1f} s")
        print(await measure(state, f"spread over {users:,} end users", users, calls))
        print(await measure(state, "10 end users again", 10, calls))
        grown = await redis_memory(client) - before
        print(
            f"  Redis memory for them: +{grown:.0f} MB (hashes, ledger streams and the "
            f"{calls * 3 + users * 2:,} ledger rows written)"
        )
    finally:
        await state.close()
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*", count=5000)]
        for i in range(0, len(keys), 5000):
            await client.unlink(*keys[i : i + 5000])
        await client.aclose()


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--end-users", type=int, default=100_000)
    p.add_argument("--calls", type=int, default=20_000)
    p.add_argument("--state", choices=["embedded", "redis", "both"], default="both")
    args = p.parse_args()
    print(
        f"admit + settle pairs at concurrency 50, one tenant; {args.calls:,} calls per line "
        "(one process, one core)"
    )
    if args.state in ("embedded", "both"):
        await bench_embedded(args.end_users, args.calls)
    if args.state in ("redis", "both"):
        await bench_redis(args.end_users, args.calls)


if __name__ == "__main__":
    asyncio.run(main())
