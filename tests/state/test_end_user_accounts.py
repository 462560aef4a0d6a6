"""End users inside a tenant, both backends: their budgets, limits and prepaid balance are
enforced together with the tenant's, in the same atomic admission; top-ups are applied
once per idempotency key; the balance always equals top-ups minus prepaid charges."""

from __future__ import annotations

import asyncio
import random

import pytest
from state_support import START_MS, close_backend, open_backend
from test_backends import LEASE, TENANT, admission, ledger_row

from gateway.clock import ManualClock
from gateway.config.snapshot import BudgetLimits
from gateway.state.base import (
    EndUserTerms,
    LedgerQuery,
    LedgerRow,
    RateLimits,
    Settlement,
    StateBackend,
)
from gateway.state.embedded import EmbeddedState

USD = 1_000_000_000


def prepaid(eu: str = "cust-1", **kw: object) -> EndUserTerms:
    return EndUserTerms(eu, prepaid=True, **kw)  # type: ignore[arg-type]


def top_up_row(rid: str, end_user: str, nanos: int, tenant: str = TENANT) -> LedgerRow:
    return ledger_row(rid, START_MS, tenant, endpoint="credits", end_user=end_user, credit=nanos)


async def settle_eu(
    backend: StateBackend, rid: str, charge: int, eu: EndUserTerms, tenant: str = TENANT
) -> LedgerRow:
    row = ledger_row(rid, START_MS, tenant, end_user=eu.id)
    await backend.settle(Settlement(tenant, rid, charge, 0, BudgetLimits(), row, eu))
    return row


async def ledger_of(backend: StateBackend, end_user: str, tenant: str = TENANT) -> list[LedgerRow]:
    rows: list[LedgerRow] = []
    cursor = None
    while True:
        page = await backend.ledger(
            LedgerQuery(tenant=tenant, end_user=end_user, limit=7, cursor=cursor)
        )
        rows += page.rows
        if page.next_cursor is None:
            return rows
        cursor = page.next_cursor


async def test_a_top_up_is_applied_once_per_key(backend: StateBackend) -> None:
    first = await backend.top_up(TENANT, "k1", top_up_row("t1", "cust-1", 5 * USD))
    assert (first.state, first.row_id, first.balance) == ("applied", "t1", 5 * USD)
    again = await backend.top_up(TENANT, "k1", top_up_row("t2", "cust-1", 5 * USD))
    assert (again.state, again.row_id, again.balance) == ("replayed", "t1", 5 * USD)
    other = await backend.top_up(TENANT, "k2", top_up_row("t3", "cust-1", 5 * USD))
    assert (other.state, other.balance) == ("applied", 10 * USD)
    # The same key for another amount or end user changes nothing.
    bad = await backend.top_up(TENANT, "k1", top_up_row("t4", "cust-1", 6 * USD))
    assert (bad.state, bad.row_id) == ("mismatch", "t1")
    bad = await backend.top_up(TENANT, "k1", top_up_row("t5", "cust-2", 5 * USD))
    assert bad.state == "mismatch"
    state = await backend.end_user_usage(TENANT, prepaid())
    assert state.balance == 10 * USD
    rows = await ledger_of(backend, "cust-1")
    assert sorted((r.id, r.credit, r.endpoint) for r in rows) == [
        ("t1", 5 * USD, "credits"),
        ("t3", 5 * USD, "credits"),
    ]
    assert await ledger_of(backend, "cust-2") == []


async def test_concurrent_top_ups_with_one_key_apply_once(backend: StateBackend) -> None:
    results = await asyncio.gather(
        *(backend.top_up(TENANT, "same", top_up_row(f"t{i}", "cust-1", USD)) for i in range(20))
    )
    assert sorted(r.state for r in results) == ["applied"] + ["replayed"] * 19
    assert (await backend.end_user_usage(TENANT, prepaid())).balance == USD


async def test_prepaid_calls_reserve_against_the_balance(backend: StateBackend) -> None:
    eu = prepaid()
    refused = await backend.admit(admission("r0", 100, end_user=eu))
    assert (refused.ok, refused.rejected_by, refused.window) == (False, "credits", "balance")
    await backend.top_up(TENANT, "k", top_up_row("t", "cust-1", 1000))
    a = await backend.admit(admission("r1", 600, end_user=eu))
    assert a.ok and a.end_user is not None
    assert (a.end_user.balance, a.end_user.windows[0].reserved, a.end_user.in_flight) == (
        1000,
        600,
        1,
    )
    # 1000 - 600 reserved: 500 does not fit, 400 does.
    b = await backend.admit(admission("r2", 500, end_user=eu))
    assert (b.ok, b.rejected_by) == (False, "credits")
    assert (await backend.admit(admission("r3", 400, end_user=eu))).ok
    await settle_eu(backend, "r1", 250, eu)  # actual cost below the reservation
    row = await settle_eu(backend, "r3", 0, eu)  # a failed call costs nothing
    assert (row.cost, row.credit) == (0, 0)
    state = await backend.end_user_usage(TENANT, eu)
    assert (state.balance, state.windows[0].spent, state.windows[0].reserved) == (750, 250, 0)
    assert state.in_flight == 0
    rows = await ledger_of(backend, "cust-1")
    assert sum(r.credit for r in rows) == state.balance
    assert sorted((r.id, r.cost, r.credit) for r in rows) == [
        ("r1", 250, -250),
        ("r3", 0, 0),
        ("t", 0, 1000),
    ]


async def test_clamp_mode_grants_what_the_balance_still_covers(backend: StateBackend) -> None:
    eu = prepaid()
    await backend.top_up(TENANT, "k", top_up_row("t", "cust-1", 1000))
    a = await backend.admit(admission("r1", 5000, min_amount=300, end_user=eu))
    assert (a.ok, a.granted) == (True, 1000)
    b = await backend.admit(admission("r2", 5000, min_amount=300, end_user=eu))
    assert (b.ok, b.rejected_by) == (False, "credits")


async def test_tenant_and_end_user_budgets_both_apply(backend: StateBackend) -> None:
    tenant_budget = BudgetLimits(daily=1000)
    eu = EndUserTerms("cust-1", budgets=BudgetLimits(monthly=300))
    a = await backend.admit(admission("r1", 200, budgets=tenant_budget, end_user=eu))
    assert a.ok
    b = await backend.admit(admission("r2", 200, budgets=tenant_budget, end_user=eu))
    assert (b.ok, b.rejected_by, b.window) == (False, "end_user_budget", "monthly")
    # Another end user of the same tenant has its own budget, but the tenant's is shared.
    other = EndUserTerms("cust-2", budgets=BudgetLimits(monthly=900))
    c = await backend.admit(admission("r3", 801, budgets=tenant_budget, end_user=other))
    assert (c.ok, c.rejected_by, c.window) == (False, "budget", "daily")
    assert (await backend.admit(admission("r4", 800, budgets=tenant_budget, end_user=other))).ok


async def test_end_user_rate_limits(backend: StateBackend, clock: ManualClock) -> None:
    eu = EndUserTerms("cust-1", limits=RateLimits(rpm=2, concurrent=1))
    assert (await backend.admit(admission("r1", 1, end_user=eu))).ok
    c = await backend.admit(admission("r2", 1, end_user=eu))
    assert (c.ok, c.rejected_by) == (False, "end_user_concurrent")
    await settle_eu(backend, "r1", 1, eu)
    assert (await backend.admit(admission("r3", 1, end_user=eu))).ok
    await settle_eu(backend, "r3", 1, eu)
    r = await backend.admit(admission("r4", 1, end_user=eu))
    assert (r.ok, r.rejected_by) == (False, "end_user_rpm")
    # The limits are per end user: another one is not affected.
    assert (await backend.admit(admission("r5", 1, end_user=EndUserTerms("cust-2")))).ok
    clock.advance(60_000)
    assert (await backend.admit(admission("r6", 1, end_user=eu))).ok


async def test_a_lapsed_lease_gives_the_balance_back_and_charges_only_what_fits(
    backend: StateBackend, clock: ManualClock
) -> None:
    eu = prepaid()
    await backend.top_up(TENANT, "k", top_up_row("t", "cust-1", 1000))
    assert (await backend.admit(admission("r1", 800, end_user=eu))).ok
    clock.advance(LEASE + 1)
    state = await backend.end_user_usage(TENANT, eu)
    assert (state.windows[0].reserved, state.in_flight) == (0, 0)
    assert (await backend.admit(admission("r2", 700, end_user=eu))).ok
    # r1 settles after its lease lapsed: only 300 still fits beside r2's 700.
    row = await settle_eu(backend, "r1", 800, eu)
    assert (row.cost, row.credit, row.overrun) == (300, -300, 500)
    assert (await backend.end_user_usage(TENANT, eu)).balance == 700


async def test_end_users_are_separate_per_tenant(backend: StateBackend) -> None:
    await backend.top_up("acme", "k", top_up_row("t1", "shared-id", 1000, "acme"))
    await backend.top_up("globex", "k", top_up_row("t2", "shared-id", 50, "globex"))
    eu = prepaid("shared-id")
    assert (await backend.end_user_usage("acme", eu)).balance == 1000
    assert (await backend.end_user_usage("globex", eu)).balance == 50
    assert (await backend.admit(admission("r1", 500, tenant="acme", end_user=eu))).ok
    g = await backend.admit(admission("r2", 500, tenant="globex", end_user=eu))
    assert (g.ok, g.rejected_by) == (False, "credits")
    assert [r.id for r in await ledger_of(backend, "shared-id", "globex")] == ["t2"]


async def test_100_concurrent_calls_never_take_the_balance_below_zero(
    backend: StateBackend,
) -> None:
    """One end user, a balance for 10 worst cases, 100 calls at once: each settles for a
    random cost up to its reservation, or fails (0). Then the balance must equal top-ups
    minus charges, in the state and in the ledger, to the nano-dollar."""
    worst = 1_000_003
    eu = prepaid()
    await backend.top_up(TENANT, "k", top_up_row("t", "cust-1", 10 * worst + worst // 3))
    rng = random.Random(7)
    low = 10 * worst

    async def call(i: int) -> tuple[bool, int]:
        nonlocal low
        a = await backend.admit(admission(f"r{i}", worst, end_user=eu))
        if not a.ok:
            return False, 0
        assert a.end_user is not None
        low = min(low, a.end_user.balance - a.end_user.windows[0].reserved)
        await asyncio.sleep(rng.random() / 100)
        charge = rng.choice([0, rng.randint(0, worst)])
        row = await settle_eu(backend, f"r{i}", charge, eu)
        return True, row.cost

    results = await asyncio.gather(*(call(i) for i in range(100)))
    admitted = sum(ok for ok, _ in results)
    charged = sum(c for _, c in results)
    assert admitted >= 10 and low >= 0
    state = await backend.end_user_usage(TENANT, eu)
    assert state.balance == 10 * worst + worst // 3 - charged >= 0
    rows = await ledger_of(backend, "cust-1")
    assert len(rows) == admitted + 1
    assert sum(r.credit for r in rows) == state.balance
    assert sum(r.cost for r in rows) == charged == state.windows[2].spent


async def test_embedded_rebuilds_balances_and_spend_at_start(tmp_path: object) -> None:
    path = f"{tmp_path}/ledger.db"
    clock = ManualClock(START_MS)
    eu = prepaid()
    state = EmbeddedState(path, clock=clock)
    await state.start()
    await state.top_up(TENANT, "k", top_up_row("t", "cust-1", 1000))
    assert (await state.admit(admission("r1", 400, end_user=eu))).ok
    await settle_eu(state, "r1", 123, eu)
    await state.close()
    again = EmbeddedState(path, clock=clock)
    await again.start()
    try:
        st = await again.end_user_usage(TENANT, eu)
        assert (st.balance, st.windows[0].spent, st.windows[1].spent) == (877, 123, 123)
        replay = await again.top_up(TENANT, "k", top_up_row("t9", "cust-1", 1000))
        assert (replay.state, replay.row_id, replay.balance) == ("replayed", "t", 877)
    finally:
        await again.close()


@pytest.mark.parametrize("kind", ["embedded"])
async def test_state_is_kept_for_many_end_users(kind: str) -> None:
    """Thousands of end users: each keeps its own balance (a smoke test of the layout;
    loadtests/end_users.py measures 100,000)."""
    clock = ManualClock(START_MS)
    backend = await open_backend(kind, clock)
    try:
        for i in range(2000):
            await backend.top_up(TENANT, f"k{i}", top_up_row(f"t{i}", f"u{i}", i + 1))
        for i in (0, 999, 1999):
            assert (await backend.end_user_usage(TENANT, prepaid(f"u{i}"))).balance == i + 1
    finally:
        await close_backend(backend)
