"""One suite, both backends: the embedded one and Redis must behave identically.

Every test here takes the ``backend`` fixture (parametrized: embedded, redis) on a
``ManualClock``; the tests at the end check what only the Redis backend has (key layout,
TTLs, the Lua calendar, error translation)."""

from __future__ import annotations

import asyncio
import random
import socket
from dataclasses import replace

import orjson
import pytest
import redis.asyncio
from redis.crc import key_slot
from redis.exceptions import ResponseError
from state_support import REDIS_URL, START_MS, utc_ms

from gateway.clock import ManualClock
from gateway.config.snapshot import BudgetLimits
from gateway.state import resp
from gateway.state.base import (
    Admission,
    AdmitResult,
    EndUserTerms,
    LedgerQuery,
    LedgerRow,
    RateLimits,
    Settlement,
    SettleResult,
    StateBackend,
    StateUnavailable,
    WindowState,
)
from gateway.state.redis import RedisState, compose_lua, redis_key
from gateway.state.windows import DAY_MS, MINUTE_MS, minute, period, periods, resets_at

LEASE = 30_000
TENANT = "acme"


def admission(
    rid: str,
    amount: int,
    *,
    tenant: str = TENANT,
    tokens: int = 0,
    budgets: BudgetLimits | None = None,
    limits: RateLimits | None = None,
    lease_ms: int = LEASE,
    min_amount: int | None = None,
    count_request: bool = True,
    key: str = "",
    key_limits: RateLimits | None = None,
    end_user: EndUserTerms | None = None,
) -> Admission:
    return Admission(
        tenant=tenant,
        reservation_id=rid,
        amount=amount,
        tokens=tokens,
        budgets=budgets or BudgetLimits(),
        limits=limits or RateLimits(),
        lease_ms=lease_ms,
        min_amount=min_amount,
        count_request=count_request,
        key=key,
        key_limits=key_limits,
        end_user=end_user,
    )


def ledger_row(rid: str, ts_ms: int, tenant: str = TENANT, **fields: object) -> LedgerRow:
    fields = {"key_fp": "kfp", "endpoint": "chat", "requested_model": "auto", **fields}
    return LedgerRow(id=rid, ts_ms=ts_ms, tenant=tenant, **fields)  # type: ignore[arg-type]


async def settle(
    backend: StateBackend,
    rid: str,
    charge: int,
    budgets: BudgetLimits | None = None,
    *,
    tenant: str = TENANT,
    tokens_delta: int = 0,
    now: int = 0,
) -> tuple[SettleResult, LedgerRow]:
    row = ledger_row(rid, now, tenant)
    res = await backend.settle(
        Settlement(tenant, rid, charge, tokens_delta, budgets or BudgetLimits(), row)
    )
    return res, row


def spent_reserved(windows: list[WindowState]) -> list[tuple[str, int, int]]:
    return [(w.window, w.spent, w.reserved) for w in windows]


def window(res: AdmitResult | list[WindowState], name: str) -> WindowState:
    ws = res.windows if isinstance(res, AdmitResult) else res
    return next(w for w in ws if w.window == name)


# -- reserve and settle ----------------------------------------------------------------
async def test_reserve_then_settle_charges_the_actual_cost(
    backend: StateBackend, clock: ManualClock
) -> None:
    b = BudgetLimits(daily=10_000, total=50_000)
    res = await backend.admit(admission("r1", 3_000, budgets=b))
    assert (res.ok, res.granted, res.rejected_by, res.window) == (True, 3_000, None, None)
    assert res.now_ms == clock.now_ms()
    daily = window(res, "daily")
    assert (daily.limit, daily.spent, daily.reserved, daily.remaining) == (10_000, 0, 3_000, 7_000)
    assert daily.resets_at_ms == utc_ms(2026, 11, 27)
    monthly = window(res, "monthly")
    assert (monthly.limit, monthly.remaining, monthly.resets_at_ms) == (
        None,
        None,
        utc_ms(2026, 12, 1),
    )
    assert window(res, "total").resets_at_ms is None

    clock.advance(1_500)
    s, row = await settle(backend, "r1", 1_200, b, now=clock.now_ms())
    assert s.charged == 1_200
    assert (row.cost, row.overrun) == (1_200, 0)
    assert spent_reserved(s.windows) == [
        ("daily", 1_200, 0),
        ("monthly", 1_200, 0),
        ("total", 1_200, 0),
    ]
    assert await backend.usage(TENANT, b) == s.windows


async def test_settle_charges_at_most_what_was_reserved(backend: StateBackend) -> None:
    await backend.admit(admission("r1", 3_000))
    s, row = await settle(backend, "r1", 5_000)
    assert (s.charged, row.cost, row.overrun) == (3_000, 3_000, 2_000)
    page = await backend.ledger(LedgerQuery(tenant=TENANT))
    assert [(r.id, r.cost, r.overrun) for r in page.rows] == [("r1", 3_000, 2_000)]


async def test_failed_request_settles_to_zero(backend: StateBackend) -> None:
    b = BudgetLimits(daily=10_000)
    await backend.admit(admission("r1", 3_000, budgets=b))
    s, row = await settle(backend, "r1", 0, b)
    assert (s.charged, row.cost, row.overrun) == (0, 0, 0)
    assert spent_reserved(s.windows) == [("daily", 0, 0), ("monthly", 0, 0), ("total", 0, 0)]


async def test_negative_charge_is_charged_as_zero(backend: StateBackend) -> None:
    await backend.admit(admission("r1", 3_000))
    s, row = await settle(backend, "r1", -5)
    assert (s.charged, row.cost, row.overrun) == (0, 0, 0)


# -- rejections ------------------------------------------------------------------------
async def test_rejections_come_in_order_rpm_tpm_concurrent_budget(
    backend: StateBackend, clock: ManualClock
) -> None:
    clock.advance(12_345)  # into the minute: Retry-After is what is left of it
    until_next_minute = MINUTE_MS - 12_345
    b = BudgetLimits(daily=1_000, monthly=1_000, total=1_000)
    lim = RateLimits(rpm=1, tpm=100, concurrent=1)
    first = await backend.admit(admission("r1", 100, tokens=10, budgets=b, limits=lim))
    assert first.ok
    assert (first.rate.limit_requests, first.rate.remaining_requests) == (1, 0)
    assert (first.rate.limit_tokens, first.rate.remaining_tokens) == (100, 90)
    assert first.rate.reset_requests_ms == first.rate.reset_tokens_ms == until_next_minute

    # Everything is exceeded at once: each check reports in turn as the earlier ones pass.
    res = await backend.admit(admission("x", 5_000, tokens=500, budgets=b, limits=lim))
    assert (res.ok, res.rejected_by, res.retry_after_ms) == (False, "rpm", until_next_minute)
    assert res.granted == 0
    res = await backend.admit(
        admission("x", 5_000, tokens=500, budgets=b, limits=lim, count_request=False)
    )
    assert (res.rejected_by, res.retry_after_ms) == ("tpm", until_next_minute)
    res = await backend.admit(
        admission("x", 5_000, tokens=1, budgets=b, limits=lim, count_request=False)
    )
    assert (res.rejected_by, res.retry_after_ms) == ("concurrent", 1_000)
    lim2 = replace(lim, concurrent=None)
    res = await backend.admit(
        admission("x", 5_000, tokens=1, budgets=b, limits=lim2, count_request=False)
    )
    assert (res.rejected_by, res.window, res.retry_after_ms) == ("budget", "daily", 0)
    res = await backend.admit(
        admission("x", 5_000, budgets=replace(b, daily=None), count_request=False)
    )
    assert (res.rejected_by, res.window) == ("budget", "monthly")
    res = await backend.admit(admission("x", 5_000, budgets=BudgetLimits(total=1_000)))
    assert (res.rejected_by, res.window) == ("budget", "total")
    # The rejected window's figures are reported for the 402 message.
    w = window(res, "total")
    assert (w.limit, w.spent, w.reserved, w.remaining) == (1_000, 0, 100, 900)


async def test_key_limits_apply_on_top_of_the_tenants(
    backend: StateBackend, clock: ManualClock
) -> None:
    tenant_lim = RateLimits(rpm=10, tpm=1_000, concurrent=5)
    klim = RateLimits(rpm=2, tpm=100, concurrent=1)

    def adm(rid: str, key: str, tokens: int = 10, **kw: object) -> Admission:
        return admission(
            rid,
            1,
            tokens=tokens,
            limits=tenant_lim,
            key=key,
            key_limits=klim if key else None,
            **kw,
        )  # type: ignore[arg-type]

    a1 = await backend.admit(adm("a1", "ka"))
    assert a1.ok
    # the key's own limits are reported where it has them
    assert (a1.rate.limit_requests, a1.rate.remaining_requests) == (2, 1)
    assert (a1.rate.limit_tokens, a1.rate.remaining_tokens) == (100, 90)
    assert (await backend.admit(adm("a2", "ka"))).rejected_by == "key_concurrent"
    assert (await backend.admit(adm("b1", "kb"))).ok, "another key has its own counters"
    assert (await backend.admit(adm("t1", ""))).ok, "a key without limits: only the tenant's"
    await backend.settle(Settlement(TENANT, "a1", 0, -5, BudgetLimits(), ledger_row("a1", 0)))
    assert (await backend.admit(adm("a3", "ka", tokens=96))).rejected_by == "key_tpm"
    a3 = await backend.admit(adm("a3", "ka", tokens=90))
    assert a3.ok and a3.rate.remaining_tokens == 5  # 10 - 5 (corrected) + 90
    await backend.settle(Settlement(TENANT, "a3", 0, 0, BudgetLimits(), ledger_row("a3", 0)))
    assert (await backend.admit(adm("a4", "ka", tokens=1))).rejected_by == "key_rpm"
    # a lapsed lease frees the key's concurrency slot too
    assert (await backend.admit(adm("b2", "kb"))).rejected_by == "key_concurrent"
    clock.advance(LEASE)
    assert (await backend.admit(adm("b2", "kb"))).ok
    clock.advance(MINUTE_MS)  # a new minute: the key's counters start again
    assert (await backend.admit(adm("a5", "ka"))).ok
    # the tenant's limits still bind every key
    busy = RateLimits(rpm=10, tpm=1_000, concurrent=1)  # a5 is in flight
    res = await backend.admit(admission("k9", 1, limits=busy, key="kc", key_limits=klim))
    assert res.rejected_by == "concurrent"


async def test_rpm_counts_per_minute_and_retries_are_not_counted(
    backend: StateBackend, clock: ManualClock
) -> None:
    lim = RateLimits(rpm=2)
    assert (await backend.admit(admission("r1", 0, limits=lim))).ok
    retry = await backend.admit(admission("r1b", 0, limits=lim, count_request=False))
    assert retry.ok and retry.rate.remaining_requests == 1
    assert (await backend.admit(admission("r2", 0, limits=lim))).ok
    res = await backend.admit(admission("r3", 0, limits=lim))
    assert res.rejected_by == "rpm" and res.rate.remaining_requests == 0
    clock.advance(MINUTE_MS)
    res = await backend.admit(admission("r3", 0, limits=lim))
    assert res.ok and res.rate.remaining_requests == 1


async def test_tpm_rejects_and_resets_with_the_minute(
    backend: StateBackend, clock: ManualClock
) -> None:
    lim = RateLimits(tpm=1_000)
    assert (await backend.admit(admission("r1", 0, tokens=700, limits=lim))).ok
    res = await backend.admit(admission("r2", 0, tokens=301, limits=lim))
    assert (res.rejected_by, res.rate.remaining_tokens) == ("tpm", 300)
    assert (await backend.admit(admission("r2", 0, tokens=300, limits=lim))).ok
    clock.advance(MINUTE_MS)
    res = await backend.admit(admission("r3", 0, tokens=1_000, limits=lim))
    assert res.ok and res.rate.remaining_tokens == 0


async def test_concurrency_counts_live_leases(backend: StateBackend) -> None:
    lim = RateLimits(concurrent=2)
    assert (await backend.admit(admission("r1", 10, limits=lim))).ok
    assert (await backend.admit(admission("r2", 10, limits=lim))).ok
    assert (await backend.admit(admission("r3", 10, limits=lim))).rejected_by == "concurrent"
    await settle(backend, "r1", 5)
    assert (await backend.admit(admission("r3", 10, limits=lim))).ok


async def test_clamp_mode_reserves_what_fits_in_the_tightest_window(
    backend: StateBackend,
) -> None:
    b = BudgetLimits(daily=1_000, monthly=900)
    assert (await backend.admit(admission("r1", 700, budgets=b))).granted == 700
    # daily room 300, monthly room 200: the smaller one is granted.
    res = await backend.admit(admission("r2", 500, budgets=b, min_amount=150))
    assert (res.ok, res.granted) == (True, 200)
    assert window(res, "monthly").remaining == 0
    # daily would clamp to 100, but monthly has nothing left at all.
    res = await backend.admit(admission("r3", 500, budgets=b, min_amount=1))
    assert (res.ok, res.rejected_by, res.window) == (False, "budget", "monthly")


async def test_clamp_refuses_less_than_the_minimum(backend: StateBackend) -> None:
    b = BudgetLimits(total=1_000)
    await backend.admit(admission("r1", 700, budgets=b))
    res = await backend.admit(admission("r2", 500, budgets=b, min_amount=301))
    assert (res.ok, res.granted, res.rejected_by, res.window) == (False, 0, "budget", "total")
    res = await backend.admit(admission("r2", 500, budgets=b, min_amount=300))
    assert (res.ok, res.granted) == (True, 300)


async def test_a_rejected_admission_changes_nothing(backend: StateBackend) -> None:
    b = BudgetLimits(daily=1_000)
    lim = RateLimits(rpm=5, tpm=1_000, concurrent=5)
    assert (await backend.admit(admission("r1", 600, tokens=100, budgets=b, limits=lim))).ok
    before = await backend.usage(TENANT, b)
    for rid, amount, tokens in (("over-budget", 600, 100), ("over-tpm", 10, 901)):
        res = await backend.admit(admission(rid, amount, tokens=tokens, budgets=b, limits=lim))
        assert not res.ok
        assert await backend.usage(TENANT, b) == before
    res = await backend.admit(admission("r2", 400, tokens=100, budgets=b, limits=lim))
    assert res.ok
    # Only r1 and r2 were counted: the rejected admissions took no request or token.
    assert (res.rate.remaining_requests, res.rate.remaining_tokens) == (3, 800)
    assert window(res, "daily").reserved == 1_000


# -- leases --------------------------------------------------------------------------
async def test_an_expired_lease_frees_budget_and_concurrency(
    backend: StateBackend, clock: ManualClock
) -> None:
    b = BudgetLimits(daily=1_000)
    lim = RateLimits(concurrent=1)
    assert (await backend.admit(admission("r1", 1_000, budgets=b, limits=lim))).ok
    clock.advance(LEASE - 1)
    res = await backend.admit(admission("r2", 1, budgets=b, limits=lim))
    assert res.rejected_by == "concurrent"
    assert window(await backend.usage(TENANT, b), "daily").reserved == 1_000
    clock.advance(1)  # a lease ends at its expiry
    assert window(await backend.usage(TENANT, b), "daily").reserved == 0
    res = await backend.admit(admission("r2", 1_000, budgets=b, limits=lim))
    assert res.ok and window(res, "daily").reserved == 1_000


async def test_extend_keeps_a_lease_alive(backend: StateBackend, clock: ManualClock) -> None:
    b = BudgetLimits(daily=1_000)
    await backend.admit(admission("r1", 600, budgets=b))
    await backend.admit(admission("r2", 300, budgets=b))
    clock.advance(20_000)
    await backend.extend(TENANT, ["r1", "unknown"], LEASE)
    await backend.extend(TENANT, [], LEASE)
    clock.advance(20_000)  # r2 lapsed, r1 was renewed
    assert window(await backend.usage(TENANT, b), "daily").reserved == 600
    await backend.extend(TENANT, ["r2"], LEASE)  # a lapsed lease stays lapsed
    assert window(await backend.usage(TENANT, b), "daily").reserved == 600
    clock.advance(10_000)
    assert window(await backend.usage(TENANT, b), "daily").reserved == 0
    s, _ = await settle(backend, "r1", 100, b)
    assert s.charged == 100  # lapsed but it fits: still charged


async def test_settling_an_expired_lease_charges_only_what_still_fits(
    backend: StateBackend, clock: ManualClock
) -> None:
    b = BudgetLimits(daily=1_000)
    assert (await backend.admit(admission("r1", 600, budgets=b))).ok
    clock.advance(LEASE)
    assert (await backend.admit(admission("r2", 700, budgets=b))).ok
    s, row = await settle(backend, "r1", 500, b)
    assert (s.charged, row.cost, row.overrun) == (300, 300, 200)
    s, _ = await settle(backend, "r2", 700, b)
    assert s.charged == 700
    assert spent_reserved(s.windows)[0] == ("daily", 1_000, 0)
    s, row = await settle(backend, "never-admitted", 50, b)
    assert (s.charged, row.overrun) == (0, 50)


async def test_settling_an_unknown_lease_without_limits_charges_it_all(
    backend: StateBackend,
) -> None:
    s, row = await settle(backend, "ghost", 1_234)
    assert (s.charged, row.cost, row.overrun) == (1_234, 1_234, 0)


async def test_tpm_is_corrected_at_settle_within_the_same_minute(
    backend: StateBackend, clock: ManualClock
) -> None:
    lim = RateLimits(tpm=1_000)
    assert (await backend.admit(admission("r1", 0, tokens=800, limits=lim))).ok
    await settle(backend, "r1", 0, tokens_delta=-600)  # 200 tokens were used
    res = await backend.admit(admission("r2", 0, tokens=800, limits=lim))
    assert res.ok and res.rate.remaining_tokens == 0
    await settle(backend, "r2", 0, tokens_delta=-2_000)  # never below zero
    res = await backend.admit(admission("r3", 0, tokens=1_000, limits=lim))
    assert res.ok and res.rate.remaining_tokens == 0
    await settle(backend, "r3", 0, tokens_delta=+50)
    assert (await backend.admit(admission("r4", 0, tokens=1, limits=lim))).rejected_by == "tpm"
    # A lease admitted in an earlier minute does not correct the new minute's count.
    clock.advance(MINUTE_MS)
    long_lease = 10 * MINUTE_MS
    assert (await backend.admit(admission("r5", 0, tokens=900, limits=lim, lease_ms=long_lease))).ok
    clock.advance(MINUTE_MS)
    assert (await backend.admit(admission("r6", 0, tokens=900, limits=lim))).ok
    await settle(backend, "r5", 0, tokens_delta=-900)
    assert (await backend.admit(admission("r7", 0, tokens=101, limits=lim))).rejected_by == "tpm"


# -- calendar windows ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("before", "daily_resets", "monthly_resets"),
    [
        (utc_ms(2026, 11, 26, 12, 0, 0), False, False),  # no boundary
        (utc_ms(2026, 11, 26, 23, 59, 59, 999), True, False),  # a day
        (utc_ms(2026, 11, 30, 23, 59, 59, 999), True, True),  # a month
        (utc_ms(2026, 12, 31, 23, 59, 59, 999), True, True),  # a year
        (utc_ms(2028, 2, 28, 23, 59, 59, 999), True, False),  # into Feb 29th
        (utc_ms(2028, 2, 29, 23, 59, 59, 999), True, True),  # out of Feb 29th
    ],
)
async def test_windows_roll_over_at_utc_midnight_and_on_the_first(
    backend: StateBackend,
    clock: ManualClock,
    before: int,
    daily_resets: bool,
    monthly_resets: bool,
) -> None:
    clock.ms = before - 5 * MINUTE_MS
    b = BudgetLimits(daily=100, monthly=150, total=1_000)
    assert (await backend.admit(admission("r1", 100, budgets=b))).ok
    clock.ms = before
    s, _ = await settle(backend, "r1", 100, b)
    assert spent_reserved(s.windows) == [("daily", 100, 0), ("monthly", 100, 0), ("total", 100, 0)]
    assert (await backend.admit(admission("r2", 1, budgets=b))).window == "daily"
    assert [w.resets_at_ms for w in s.windows] == [
        resets_at("daily", before),
        resets_at("monthly", before),
        None,
    ]

    clock.advance(1)
    after = clock.now_ms()
    usage = await backend.usage(TENANT, b)
    assert [w.spent for w in usage] == [
        0 if daily_resets else 100,
        0 if monthly_resets else 100,
        100,
    ]
    assert window(usage, "daily").resets_at_ms == (
        after + DAY_MS if daily_resets else resets_at("daily", before)
    )
    assert window(usage, "monthly").resets_at_ms == resets_at("monthly", after)
    res = await backend.admit(admission("r2", 50, budgets=b))
    assert res.ok == daily_resets
    if res.ok:
        s, _ = await settle(backend, "r2", 50, b)
        assert [w.spent for w in s.windows] == [50, 50 if monthly_resets else 150, 150]


async def test_usage_reports_every_window(backend: StateBackend, clock: ManualClock) -> None:
    b = BudgetLimits(monthly=5_000)
    assert await backend.usage("nobody", b) == [
        WindowState("daily", None, 0, 0, utc_ms(2026, 11, 27)),
        WindowState("monthly", 5_000, 0, 0, utc_ms(2026, 12, 1)),
        WindowState("total", None, 0, 0, None),
    ]
    await backend.admit(admission("r1", 700, budgets=b))
    await backend.admit(admission("r2", 100, budgets=b, tenant="other"))
    await settle(backend, "r1", 300, b)
    await backend.admit(admission("r3", 1_000, budgets=b))
    usage = await backend.usage(TENANT, b)
    assert spent_reserved(usage) == [("daily", 300, 1_000), ("monthly", 300, 1_000),
                                     ("total", 300, 1_000)]  # fmt: skip
    assert window(usage, "monthly").remaining == 3_700


# -- the ledger ----------------------------------------------------------------------
def full_row(rid: str, ts_ms: int, tenant: str = TENANT) -> LedgerRow:
    return LedgerRow(
        id=rid,
        ts_ms=ts_ms,
        tenant=tenant,
        key_fp="sha256:4f2a",
        endpoint="chat",
        requested_model="auto",
        model="gpt-4o-mini",
        provider="openai",
        route="rule:cheap;fallback:1;clamp:max_tokens=12",
        end_user='user ünïcode 🚀 "quoted" a:b',
        stream=True,
        status=502,
        error_code="upstream_unavailable",
        prompt_tokens=1_234,
        cached_tokens=1_024,
        completion_tokens=56,
        reasoning_tokens=7,
        cost=123_456_789,
        reserved=999_999_999_999,
        overrun=42,
        cache="miss",
        replay=True,
        usage_source="counted",
        attempts=[
            {"model": "gpt-4o", "status": 429, "ms": 12.5, "retry_after": None},
            {"model": "gpt-4o-mini", "status": 502, "nested": {"a": [1, 2, "3"]}},
        ],
        latency_ms=2_345,
        ttft_ms=0,
        upstream_ms=2_001,
    )


async def test_ledger_rows_round_trip_with_every_field(
    backend: StateBackend, clock: ManualClock
) -> None:
    full = full_row("r-full", clock.now_ms())
    await backend.record(full)
    clock.advance(1)
    plain = ledger_row("r-plain", clock.now_ms(), ttft_ms=None)
    await backend.record(plain)
    page = await backend.ledger(LedgerQuery(tenant=TENANT))
    assert page.rows == [plain, full]
    assert page.next_cursor is None


async def test_settle_writes_the_row_with_what_was_charged(
    backend: StateBackend, clock: ManualClock
) -> None:
    await backend.admit(admission("r1", 1_000))
    row = replace(full_row("r1", clock.now_ms()), cost=0, overrun=0)
    s = await backend.settle(Settlement(TENANT, "r1", 1_500, 0, BudgetLimits(), row))
    assert (s.charged, row.cost, row.overrun) == (1_000, 1_000, 500)
    [stored] = (await backend.ledger(LedgerQuery())).rows
    assert stored == row


async def test_ledger_pages_newest_first_with_filters(
    backend: StateBackend, clock: ManualClock
) -> None:
    rng = random.Random(7)
    tenants, models, statuses = ["acme", "beta", "zeta:eu"], ["cheap", "premium"], [200, 429, 502]
    written: list[LedgerRow] = []
    for i in range(36):
        clock.advance(1_000)
        t = tenants[i % 3]
        row = ledger_row(
            f"r{i:03d}", clock.now_ms(), t, model=rng.choice(models), status=rng.choice(statuses)
        )
        if i % 2:
            await backend.admit(admission(row.id, 100, tenant=t))
            await backend.settle(Settlement(t, row.id, rng.randint(0, 150), 0, BudgetLimits(), row))
        else:
            await backend.record(row)
        written.append(row)
    newest_first = written[::-1]
    mid = written[10].ts_ms
    queries = [
        LedgerQuery(),
        LedgerQuery(tenant="beta"),
        LedgerQuery(tenant="zeta:eu", model="premium"),
        LedgerQuery(status=429),
        LedgerQuery(model="cheap", status=200),
        LedgerQuery(since_ms=mid),
        LedgerQuery(until_ms=mid),
        LedgerQuery(tenant="acme", since_ms=mid, until_ms=written[30].ts_ms),
        LedgerQuery(tenant="nobody"),
    ]
    for q in queries:
        expected = [
            r
            for r in newest_first
            if (q.tenant is None or r.tenant == q.tenant)
            and (q.model is None or r.model == q.model)
            and (q.status is None or r.status == q.status)
            and (q.since_ms is None or r.ts_ms >= q.since_ms)
            and (q.until_ms is None or r.ts_ms < q.until_ms)
        ]
        whole = await backend.ledger(replace(q, limit=1_000))
        assert whole.rows == expected and whole.next_cursor is None, q
        for limit in (1, 4, 7):
            got: list[LedgerRow] = []
            cursor: str | None = None
            while True:
                page = await backend.ledger(replace(q, limit=limit, cursor=cursor))
                assert len(page.rows) <= limit
                got += page.rows
                cursor = page.next_cursor
                if cursor is None:
                    break
                assert len(page.rows) == limit
            assert [r.id for r in got] == [r.id for r in expected], (q, limit)
    # A page that is exactly full has no next page.
    exact = await backend.ledger(LedgerQuery(tenant="beta", limit=12))
    assert len(exact.rows) == 12 and exact.next_cursor is None


async def test_a_bad_ledger_cursor_is_refused(backend: StateBackend) -> None:
    with pytest.raises(ValueError):
        await backend.ledger(LedgerQuery(cursor="garbage"))


# -- idempotency ----------------------------------------------------------------------
async def test_idempotency_new_inflight_mismatch_done(backend: StateBackend) -> None:
    assert (await backend.idem_begin(TENANT, "k1", "fp-a", 10_000)).state == "new"
    assert (await backend.idem_begin(TENANT, "k1", "fp-a", 10_000)).state == "inflight"
    assert (await backend.idem_begin(TENANT, "k1", "fp-b", 10_000)).state == "mismatch"
    assert (await backend.idem_begin("other", "k1", "fp-b", 10_000)).state == "new"
    record = b'{"id":"chatcmpl-1"}\x00\xff binary'
    await backend.idem_finish(TENANT, "k1", "fp-a", record, 60_000)
    done = await backend.idem_begin(TENANT, "k1", "fp-a", 10_000)
    assert (done.state, done.record) == ("done", record)
    assert (await backend.idem_begin(TENANT, "k1", "fp-b", 10_000)).state == "mismatch"


async def test_idempotency_abandon_releases_only_an_inflight_claim(
    backend: StateBackend,
) -> None:
    assert (await backend.idem_begin(TENANT, "k1", "fp", 10_000)).state == "new"
    await backend.idem_abandon(TENANT, "k1")
    assert (await backend.idem_begin(TENANT, "k1", "fp", 10_000)).state == "new"
    await backend.idem_finish(TENANT, "k1", "fp", b"resp", 60_000)
    await backend.idem_abandon(TENANT, "k1")
    assert (await backend.idem_begin(TENANT, "k1", "fp", 10_000)).state == "done"
    await backend.idem_abandon(TENANT, "never-claimed")


async def test_idempotency_claims_and_records_expire(
    backend: StateBackend, clock: ManualClock
) -> None:
    assert (await backend.idem_begin(TENANT, "k1", "fp-a", 5_000)).state == "new"
    clock.advance(4_999)
    assert (await backend.idem_begin(TENANT, "k1", "fp-b", 5_000)).state == "mismatch"
    clock.advance(1)  # the claim lapsed (its process died): anyone may claim it again
    assert (await backend.idem_begin(TENANT, "k1", "fp-b", 5_000)).state == "new"
    await backend.idem_finish(TENANT, "k1", "fp-b", b"resp", 60_000)
    clock.advance(59_999)
    assert (await backend.idem_begin(TENANT, "k1", "fp-b", 5_000)).state == "done"
    clock.advance(1)
    assert (await backend.idem_begin(TENANT, "k1", "fp-b", 5_000)).state == "new"


async def test_finishing_after_the_claim_lapsed_still_stores(
    backend: StateBackend, clock: ManualClock
) -> None:
    # a request that ran longer than its claim's lease: its response must still replay
    assert (await backend.idem_begin(TENANT, "k1", "fp", 5_000)).state == "new"
    clock.advance(6_000)
    await backend.idem_finish(TENANT, "k1", "fp", b"resp", 60_000)
    done = await backend.idem_begin(TENANT, "k1", "fp", 5_000)
    assert (done.state, done.record) == ("done", b"resp")
    assert (await backend.idem_begin(TENANT, "k1", "other", 5_000)).state == "mismatch"


# -- cache and single flight --------------------------------------------------------------
async def test_cache_get_put_and_ttl(backend: StateBackend, clock: ManualClock) -> None:
    key = f"{TENANT}:{'ab' * 32}"
    assert await backend.cache_get(key) is None
    value = b'{"choices":[]}\x00:\xff'
    await backend.cache_put(key, value, 10_000)
    assert await backend.cache_get(key) == value
    assert await backend.cache_get(f"zeta:eu:{'ab' * 32}") is None  # another scope
    assert await backend.cache_get(f"*shared:{'ab' * 32}") is None
    await backend.cache_put(key, b"newer", 10_000)
    assert await backend.cache_get(key) == b"newer"
    clock.advance(9_999)
    assert await backend.cache_get(key) == b"newer"
    clock.advance(1)
    assert await backend.cache_get(key) is None
    await backend.cache_put(f"*shared:{'cd' * 32}", b"", 10_000)
    assert await backend.cache_get(f"*shared:{'cd' * 32}") == b""


async def test_single_flight(backend: StateBackend, clock: ManualClock) -> None:
    key, other = f"{TENANT}:{'ab' * 32}", f"*shared:{'ab' * 32}"
    assert await backend.flight_begin(key, 5_000) is True
    assert await backend.flight_begin(key, 5_000) is False
    assert await backend.flight_begin(other, 5_000) is True
    await backend.flight_end(key)
    assert await backend.flight_begin(key, 5_000) is True
    clock.advance(4_999)
    assert await backend.flight_begin(key, 5_000) is False
    clock.advance(1)  # the leader's lease lapsed: someone else leads
    assert await backend.flight_begin(key, 5_000) is True
    await backend.flight_end("never:begun")


async def test_cache_lookup_and_store_combine_cache_and_flight(
    backend: StateBackend, clock: ManualClock
) -> None:
    key = f"{TENANT}:{'cd' * 32}"
    assert await backend.cache_lookup(key, 5_000) == (None, True)  # a miss: lead
    assert await backend.cache_lookup(key, 5_000) == (None, False)  # someone leads: wait
    await backend.cache_store(key, b"answer:\x00:\xff", 10_000, end_flight=True)
    assert await backend.cache_lookup(key, 5_000) == (b"answer:\x00:\xff", False)
    assert await backend.cache_get(key) == b"answer:\x00:\xff"
    clock.advance(10_000)  # the entry expired: the next caller leads again
    assert await backend.cache_lookup(key, 5_000) == (None, True)
    await backend.cache_store(key, None, 10_000, end_flight=True)  # the leader failed
    assert await backend.cache_lookup(key, 5_000) == (None, True), "a follower takes over"
    await backend.cache_store(key, None, 0, end_flight=False)  # nothing to do
    clock.advance(5_000)  # the new leader's lease lapsed too
    assert await backend.cache_lookup(key, 5_000) == (None, True)


async def lookup_admit(
    backend: StateBackend, key: str, rid: str, amount: int, budgets: BudgetLimits
) -> tuple[bytes | None, bool, AdmitResult | None]:
    return await backend.cache_lookup_admit(key, 5_000, admission(rid, amount, budgets=budgets))


async def test_cache_lookup_admit_admits_only_the_caller_that_computes(
    backend: StateBackend, clock: ManualClock
) -> None:
    key = f"{TENANT}:{'ef' * 32}"
    b = BudgetLimits(daily=1_000)
    # A miss: the caller leads the single flight and is admitted in the same call.
    value, leads, res = await lookup_admit(backend, key, "r1", 300, b)
    assert (value, leads) == (None, True)
    assert res is not None and res.ok and res.granted == 300
    assert window(await backend.usage(TENANT, b), "daily").reserved == 300
    # Another caller while it computes: waits, and holds nothing (it may be served a hit).
    assert await lookup_admit(backend, key, "r2", 300, b) == (None, False, None)
    assert window(await backend.usage(TENANT, b), "daily").reserved == 300
    await settle(backend, "r1", 200, budgets=b)
    await backend.cache_store(key, b"answer", 10_000, end_flight=True)
    # A hit: nothing admitted (the pipeline admits it at what a hit is charged).
    assert await lookup_admit(backend, key, "r3", 300, b) == (b"answer", False, None)
    daily = window(await backend.usage(TENANT, b), "daily")
    assert (daily.spent, daily.reserved) == (200, 0)


async def test_cache_lookup_admit_refused_keeps_the_flight_for_the_caller_to_end(
    backend: StateBackend, clock: ManualClock
) -> None:
    key = f"{TENANT}:{'fe' * 32}"
    b = BudgetLimits(daily=1_000)
    value, leads, res = await lookup_admit(backend, key, "r1", 5_000, b)
    assert (value, leads) == (None, True)
    assert res is not None and not res.ok and res.rejected_by == "budget"
    assert window(await backend.usage(TENANT, b), "daily").reserved == 0  # changed nothing
    assert await backend.cache_lookup(key, 5_000) == (None, False)  # the lease is held...
    await backend.cache_store(key, None, 10_000, end_flight=True)  # ...until it is ended
    value, leads, res = await lookup_admit(backend, key, "r2", 500, b)
    assert (value, leads) == (None, True) and res is not None and res.ok


async def test_cache_lookup_admit_of_a_shared_entry(backend: StateBackend) -> None:
    # Shared entries live outside the tenant's Redis slot: two calls, the same answers.
    key = f"*shared:{'ef' * 32}"
    value, leads, res = await backend.cache_lookup_admit(key, 5_000, admission("r1", 10))
    assert (value, leads) == (None, True) and res is not None and res.ok
    assert await backend.cache_lookup_admit(key, 5_000, admission("r2", 10)) == (None, False, None)


# -- Redis only -------------------------------------------------------------------------
def _calendar_samples() -> list[int]:
    stamps = [0, 1, DAY_MS - 1, DAY_MS, 951_782_400_000]  # 2000-02-29
    for year in [1970, 1999, 2000, 2001, 2024, 2025, 2026, 2027, 2028, 2099, 2100, 2400]:
        for month in range(1, 13):
            first = utc_ms(year, month, 1)
            stamps += [first - 1, first, first + 1, first + DAY_MS - 1]
    rng = random.Random(2026)
    stamps += [rng.randrange(0, utc_ms(2200, 1, 1)) for _ in range(3_000)]
    stamps += [START_MS + rng.randrange(0, 400 * DAY_MS) for _ in range(1_000)]
    return stamps


def test_periods_of_a_moment_are_its_period_per_window() -> None:
    for ms in _calendar_samples():
        assert periods(ms) == {w: period(w, ms) for w in ("daily", "monthly", "total")}, ms


@pytest.mark.redis
async def test_lua_calendar_agrees_with_windows_py(redis_backend: RedisState) -> None:
    body = """-- requires: lib_windows
local out = {}
for i = 1, #ARGV do
  local ids = period_ids(tonumber(ARGV[i]))
  local m = int(minute_of(tonumber(ARGV[i])))
  out[#out + 1] = ids[1] .. ' ' .. ids[2] .. ' ' .. ids[3] .. ' ' .. m
end
return out
"""
    stamps = _calendar_samples()
    client = redis.asyncio.Redis.from_url(REDIS_URL)
    try:
        got = await client.eval(compose_lua(body), 0, *stamps)
    finally:
        await client.aclose()
    expected = [
        f"{period('daily', ms)} {period('monthly', ms)} {period('total', ms)} {minute(ms)}"
        for ms in stamps
    ]
    mismatches = [(ms, g.decode(), e) for ms, g, e in zip(stamps, got, expected, strict=True)
                  if g.decode() != e]  # fmt: skip
    assert not mismatches, mismatches[:5]


async def _keys(state: RedisState) -> dict[str, tuple[str, int]]:
    client = redis.asyncio.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        return {
            k: (await client.type(k), await client.pttl(k))
            async for k in client.scan_iter(match=f"{state.prefix}:*")
        }
    finally:
        await client.aclose()


@pytest.mark.redis
async def test_money_keys_never_expire_and_share_the_tenant_slot(
    redis_backend: RedisState,
) -> None:
    s, p, t = redis_backend, redis_backend.prefix, "acme:eu"
    b = BudgetLimits(daily=10_000)
    await s.admit(admission("r1", 100, tenant=t, tokens=5, budgets=b, limits=RateLimits(rpm=9)))
    await s.admit(admission("r2", 100, tenant=t, budgets=b, end_user=EndUserTerms("u{1}")))
    await s.settle(Settlement(t, "r1", 50, 0, b, ledger_row("r1", 0, t)))
    await s.record(ledger_row("r3", 0, t))
    await s.top_up(t, "top-up-1", ledger_row("r4", 0, t, end_user="u{1}", credit=5))
    await s.idem_begin(t, "user-key-{1}", "fp", 5_000)
    await s.cache_put(f"{t}:{'ab' * 32}", b"v", 5_000)
    await s.flight_begin(f"{t}:{'ab' * 32}", 5_000)
    await s.cache_put(f"*shared:{'cd' * 32}", b"v", 5_000)
    keys = await _keys(s)
    tag = f"{p}:v1:{{{t}}}"
    cache = f"{tag}:cache:{'ab' * 32}"
    flight = f"{tag}:flight:{'ab' * 32}"
    shared = f"{p}:v1:{{*shared:{'cd' * 32}}}:cache"
    assert keys == {
        f"{tag}:budget": ("hash", -1),
        f"{tag}:leases": ("zset", -1),
        f"{tag}:lease": ("hash", -1),
        f"{tag}:rl": ("hash", -1),
        f"{tag}:ledger": ("stream", -1),
        f"{tag}:eu:u{{1}}": ("hash", -1),
        f"{tag}:eu-ledger:u{{1}}": ("list", -1),
        f"{tag}:top-ups": ("hash", -1),
        f"{tag}:idem:user-key-{{1}}": ("hash", keys[f"{tag}:idem:user-key-{{1}}"][1]),
        cache: ("string", keys[cache][1]),
        flight: ("string", keys[flight][1]),
        shared: ("string", keys[shared][1]),
        redis_key(p, "tenants"): ("set", -1),
    }
    for key in (f"{tag}:idem:user-key-{{1}}", cache, flight, shared):
        assert 0 < keys[key][1] <= 5_000
    # money, limits, ledger, idempotency and the tenant's own cache entries share its
    # slot (one script each, cache_admit_v1 across the cache and the money)
    slots = {key_slot(k.encode()) for k in keys if k.startswith(tag)}
    assert slots == {key_slot(t.encode())}
    # an entry tenants share belongs to none: its whole key is its tag, so they spread
    assert key_slot(shared.encode()) == key_slot(f"*shared:{'cd' * 32}".encode())


@pytest.mark.redis
async def test_past_periods_and_leases_are_deleted_not_left_to_ttls(
    redis_backend: RedisState, clock: ManualClock
) -> None:
    b = BudgetLimits(daily=10_000)
    for day in range(70):  # across three months
        await redis_backend.admit(admission(f"r{day}", 10, budgets=b))
        await redis_backend.admit(admission(f"lapsed{day}", 10, budgets=b, lease_ms=1_000))
        await redis_backend.settle(Settlement(TENANT, f"r{day}", 10, 0, b, ledger_row("x", 0)))
        clock.advance(DAY_MS)
    await redis_backend.usage(TENANT, b)
    client = redis.asyncio.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        tag = f"{redis_backend.prefix}:v1:{{{TENANT}}}"
        budget = await client.hgetall(f"{tag}:budget")
        assert set(budget) == {"reserved", period("daily", clock.ms - DAY_MS),
                               period("monthly", clock.ms - DAY_MS), "t"}  # fmt: skip
        assert budget["reserved"] == "0" and budget["t"] == "700"
        assert not await client.exists(f"{tag}:leases", f"{tag}:lease")
        assert await client.hlen(f"{tag}:rl") == 3
    finally:
        await client.aclose()


@pytest.mark.redis
async def test_admit_settle_and_lookup_with_admit_are_one_round_trip_each(
    redis_backend: RedisState, monkeypatch: pytest.MonkeyPatch
) -> None:
    commands: list[str] = []
    client = redis_backend._redis
    execute = client.execute_command

    async def counting(*args: object, **kwargs: object) -> object:
        commands.append(str(args[0]))
        return await execute(*args, **kwargs)

    monkeypatch.setattr(client, "execute_command", counting)
    # The pipelining client the scripts go through: every command it writes, by name.
    send = resp._Connection.send

    def counting_send(conn: resp._Connection, packed: bytes) -> object:
        commands.append(packed.split(b"\r\n")[2].decode())
        return send(conn, packed)

    monkeypatch.setattr(resp._Connection, "send", counting_send)
    b = BudgetLimits(daily=10_000)
    for i in range(3):
        await redis_backend.admit(admission(f"r{i}", 10, budgets=b))
        await redis_backend.settle(Settlement(TENANT, f"r{i}", 5, 0, b, ledger_row(f"r{i}", 0)))
    # The tenant is added to the tenants set once per process, before its first row.
    assert commands == ["EVALSHA", "SADD", "EVALSHA"] + ["EVALSHA"] * 4
    # A cache miss's lookup and its admission: one round trip too.
    commands.clear()
    _, leads, res = await redis_backend.cache_lookup_admit(
        f"{TENANT}:{'aa' * 32}", 5_000, admission("r9", 10, budgets=b)
    )
    assert leads and res is not None and res.ok
    assert commands == ["EVALSHA"]


def test_tenant_keys_are_made_once_and_their_map_stays_bounded() -> None:
    state = RedisState("redis://127.0.0.1:1/0", prefix="gwtest:keys")  # never connects
    first = state._keys_of("acme")
    assert first is state._keys_of("acme")
    assert first == tuple(redis_key("gwtest:keys", k, "acme")
                          for k in ("budget", "leases", "lease", "rl", "ledger"))  # fmt: skip
    for i in range(25_000):  # an operator's queries naming tenants that do not exist
        state._keys_of(f"t{i}")
    assert len(state._tenant_keys) <= 10_000
    assert state._keys_of("acme") == first


@pytest.mark.redis
async def test_ledger_entries_are_four_fields_and_old_column_entries_still_read(
    redis_backend: RedisState, clock: ManualClock
) -> None:
    full = full_row("r-new", clock.now_ms())
    await redis_backend.record(full)
    stream = redis_key(redis_backend.prefix, "ledger", TENANT)
    old = full_row("r-old", clock.now_ms() - 5)
    # As gateways before the packed 'row' field wrote it: one field per column, in order.
    columns = {
        "cost": "123456789", "overrun": "42", "credit": "0", "id": "r-old",
        "ts_ms": str(old.ts_ms), "tenant": TENANT, "key_fp": old.key_fp,
        "endpoint": old.endpoint, "requested_model": old.requested_model, "model": old.model,
        "provider": old.provider, "route": old.route, "end_user": old.end_user, "stream": "1",
        "status": "502", "error_code": old.error_code, "prompt_tokens": "1234",
        "cached_tokens": "1024", "completion_tokens": "56", "reasoning_tokens": "7",
        "reserved": "999999999999", "cache": "miss", "replay": "1", "usage_source": "counted",
        "attempts": orjson.dumps(old.attempts).decode(), "latency_ms": "2345", "ttft_ms": "0",
        "upstream_ms": "2001", "field_of_a_newer_version": "x",
    }  # fmt: skip
    client = redis.asyncio.Redis.from_url(REDIS_URL)
    try:
        [(_, fields)] = await client.xrange(stream)
        assert list(fields) == [b"cost", b"overrun", b"credit", b"row"]
        await client.xadd(stream, columns, id=f"{clock.now_ms() + 1}-0")
    finally:
        await client.aclose()
    page = await redis_backend.ledger(LedgerQuery(tenant=TENANT))
    assert page.rows == [old, full]


@pytest.mark.redis
async def test_ledger_entry_ids_keep_increasing_when_the_clock_steps_back(
    redis_backend: RedisState, clock: ManualClock
) -> None:
    await redis_backend.record(ledger_row("r1", clock.now_ms()))
    clock.advance(-60_000)  # the clock passed in ARGV steps back a minute
    await redis_backend.admit(admission("r2", 100))
    await redis_backend.settle(Settlement(TENANT, "r2", 50, 0, BudgetLimits(),
                                          ledger_row("r2", clock.now_ms())))  # fmt: skip
    await redis_backend.record(ledger_row("r3", clock.now_ms()))
    client = redis.asyncio.Redis.from_url(REDIS_URL)
    try:
        entries = await client.xrange(redis_key(redis_backend.prefix, "ledger", TENANT))
    finally:
        await client.aclose()
    ids = [tuple(map(int, e.split(b"-"))) for e, _ in entries]
    assert len(ids) == 3 and ids == sorted(ids) and len(set(ids)) == 3
    assert ids[1][0] == ids[2][0] == START_MS  # written at the latest time seen, not earlier
    page = await redis_backend.ledger(LedgerQuery(tenant=TENANT))
    assert [r.id for r in page.rows] == ["r3", "r2", "r1"] and page.rows[1].cost == 50


@pytest.mark.redis
async def test_a_failing_script_becomes_state_unavailable(redis_backend: RedisState) -> None:
    client = redis.asyncio.Redis.from_url(REDIS_URL)
    try:
        await client.set(redis_key(redis_backend.prefix, "budget", TENANT), "not a hash")
    finally:
        await client.aclose()
    with pytest.raises(StateUnavailable, match=r"refused running admit_v1: .*WRONGTYPE") as e:
        await redis_backend.admit(admission("r1", 10))
    assert isinstance(e.value.__cause__, ResponseError)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_an_unreachable_redis_is_state_unavailable() -> None:
    port = _free_port()
    state = RedisState(f"redis://:secret@127.0.0.1:{port}/3", prefix="gwtest:none")
    try:
        with pytest.raises(StateUnavailable, match=rf"127\.0\.0\.1:{port}/3 did not answer") as e:
            await state.ping()
        assert "secret" not in str(e.value)
        with pytest.raises(StateUnavailable, match="check that it is running"):
            await state.start()
        with pytest.raises(StateUnavailable):
            await state.admit(admission("r1", 10))
        with pytest.raises(StateUnavailable):
            await state.ledger(LedgerQuery())
        with pytest.raises(StateUnavailable):
            await state.cache_get("acme:ab")
    finally:
        await state.close()


async def test_a_silent_redis_fails_calls_within_the_urls_socket_timeout() -> None:
    """The state URL's ``socket_timeout`` bounds every call, the hot path's scripts (on the
    pipelining client) as well as redis-py's: a Redis that accepts connections and never
    answers (a hung server, a dead network path) costs a request 0.3 s here, not 5."""
    handlers: list[asyncio.Task[None]] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.append(task)
        try:
            while await reader.read(65536):
                pass  # takes every command, answers none
        finally:
            writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    state = RedisState(f"redis://127.0.0.1:{port}/0?socket_timeout=0.3", prefix="gwtest:silent")
    loop = asyncio.get_running_loop()
    try:
        for call in (state.admit(admission("r1", 10)), state.ledger(LedgerQuery())):
            t0 = loop.time()
            with pytest.raises(StateUnavailable, match="did not answer"):
                await call
            assert 0.25 < loop.time() - t0 < 2.0
    finally:
        await state.close()
        server.close()
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await server.wait_closed()


@pytest.mark.redis
async def test_an_allkeys_eviction_policy_is_warned_about(
    redis_backend: RedisState, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def allkeys(*_: object) -> dict[bytes, bytes]:
        return {b"maxmemory-policy": b"allkeys-lru"}

    async def disabled(*_: object) -> dict[bytes, bytes]:
        raise ResponseError("ERR unknown command 'CONFIG'")

    monkeypatch.setattr(redis_backend._redis, "config_get", allkeys)
    await redis_backend.start()
    assert "maxmemory-policy allkeys-lru" in caplog.text
    assert "volatile-lru" in caplog.text
    caplog.clear()
    monkeypatch.setattr(redis_backend._redis, "config_get", disabled)
    await redis_backend.start()  # tolerated: managed Redis often disables CONFIG
    assert "allkeys" not in caplog.text
