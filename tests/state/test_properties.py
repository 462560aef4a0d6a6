"""Rules that must hold across every sequence of reserve, settle, fail, expire and extend.

Two kinds of state machine, in the manner of h2's ``tests/test_state_machines.py``:

- ``BudgetMachine`` runs against one backend (embedded, then Redis) and checks, after
  every step: spend never exceeds a limit in any window; what the settled reservations
  held minus what they released is what was charged; spend equals the ledger's costs,
  window by window; and what is reserved is exactly the sum of the live leases.
- ``LockstepMachine`` drives both backends with the same calls and requires identical
  answers: the Lua scripts behave exactly like ``accounts.py``.

Each example gets its own event loop (``asyncio.Runner``), backend and Redis key prefix.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    multiple,
    precondition,
    rule,
)
from state_support import close_backend, needs_redis, new_prefix, open_backend, utc_ms

from gateway.clock import ManualClock
from gateway.config.snapshot import BudgetLimits
from gateway.state.base import (
    Admission,
    EndUserTerms,
    LedgerQuery,
    LedgerRow,
    RateLimits,
    Settlement,
    StateBackend,
    WindowState,
)
from gateway.state.windows import DAY_MS, MINUTE_MS, period

T = TypeVar("T")
TENANT = "acme"
LEASE = 10_000
# Start a few days before a year ends, so daily, monthly and yearly rollovers all happen.
START = utc_ms(2026, 12, 29, 22, 0, 0)
BUDGETS = BudgetLimits(daily=5_000, monthly=12_000, total=20_000)
# End users for the lockstep machine: one with a budget and limits, one paying from credits.
END_USERS = {
    "": None,
    "ua": EndUserTerms("ua", BudgetLimits(daily=3_000), RateLimits(rpm=4, concurrent=2)),
    "ub": EndUserTerms("ub", BudgetLimits(), RateLimits(tpm=3_000), prepaid=True),
}
ADVANCES = [1, 999, LEASE // 2, LEASE, MINUTE_MS, 6 * 3_600_000, DAY_MS]

SETTINGS = settings(
    max_examples=25,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def row_for(rid: str, now: int) -> LedgerRow:
    return LedgerRow(
        id=rid, ts_ms=now, tenant=TENANT, key_fp="k", endpoint="chat", requested_model="m"
    )


def by_name(windows: list[WindowState]) -> dict[str, WindowState]:
    return {w.window: w for w in windows}


class AsyncMachine(RuleBasedStateMachine):
    """Runs coroutines on an event loop of its own, one per example."""

    def __init__(self) -> None:
        super().__init__()
        self.runner = asyncio.Runner()
        self.clock = ManualClock(START)
        self.backends: list[StateBackend] = []

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.runner.run(coro)

    def open(self, kind: str) -> StateBackend:
        backend = self.run(open_backend(kind, self.clock, new_prefix()))
        self.backends.append(backend)
        return backend

    def teardown(self) -> None:
        try:
            for backend in self.backends:
                self.run(close_backend(backend))
        finally:
            self.runner.close()


class BudgetMachine(AsyncMachine):
    kind = "embedded"
    leases = Bundle("leases")

    def __init__(self) -> None:
        super().__init__()
        self.backend = self.open(self.kind)
        self.n = 0
        self.live: dict[str, tuple[int, int]] = {}  # id -> (granted, lease expiry)
        self.held_by_settled = 0  # what leases held when they were settled
        self.released = 0  # what those settlements gave back to the budget
        self.lapsed_charged = 0  # charged for leases that had lapsed
        self.charged = 0  # every SettleResult.charged
        self.settles = 0

    def now(self) -> int:
        return self.clock.now_ms()

    def expire_model(self) -> None:
        self.live = {k: v for k, v in self.live.items() if v[1] > self.now()}

    def usage(self) -> dict[str, WindowState]:
        return by_name(self.run(self.backend.usage(TENANT, BUDGETS)))

    @rule(
        target=leases,
        amount=st.integers(0, 7_000),
        clamp=st.booleans(),
        count=st.booleans(),
    )
    def reserve(self, amount: int, clamp: bool, count: bool) -> Any:
        self.n += 1
        rid = f"r{self.n}"
        self.expire_model()
        before = self.usage()
        min_amount = amount // 4 if clamp else None
        a = Admission(TENANT, rid, amount, 10, BUDGETS, RateLimits(concurrent=4), LEASE,
                      min_amount, count)  # fmt: skip
        res = self.run(self.backend.admit(a))
        if not res.ok:
            event(f"admit: rejected by {res.rejected_by}")
            assert res.granted == 0
            if res.rejected_by == "concurrent":
                assert len(self.live) >= 4
            else:
                assert res.rejected_by == "budget" and res.window is not None
                w = before[res.window]
                room = (w.limit or 0) - w.spent - w.reserved
                assert amount > room and (min_amount is None or room < min_amount)
            assert self.usage() == before  # a rejected admission changes nothing
            return multiple()
        assert len(self.live) < 4
        if res.granted != amount:
            event("admit: clamped")
            assert min_amount is not None and min_amount <= res.granted < amount
        self.live[rid] = (res.granted, self.now() + LEASE)
        return rid

    def _settle(self, rid: str, actual: int) -> None:
        self.expire_model()
        before = self.usage()
        row = row_for(rid, self.now())
        res = self.run(self.backend.settle(Settlement(TENANT, rid, actual, 0, BUDGETS, row)))
        after = by_name(res.windows)
        spent = after["total"].spent - before["total"].spent
        assert spent == res.charged == row.cost
        assert row.overrun == max(actual - res.charged, 0)
        held = self.live.pop(rid, None)
        event(f"settle: {'lapsed' if held is None else 'live'} lease, overrun {row.overrun > 0}")
        if held is not None:
            assert res.charged == min(max(actual, 0), held[0])
            assert before["total"].reserved - after["total"].reserved == held[0]
            self.held_by_settled += held[0]
            self.released += held[0] - spent
        else:  # the lease lapsed: only what still fits
            assert 0 <= res.charged <= max(actual, 0)
            for w in before.values():
                if w.limit is not None:
                    assert res.charged <= max(w.limit - w.spent - w.reserved, 0)
            self.lapsed_charged += res.charged
        self.charged += res.charged
        self.settles += 1

    @rule(rid=consumes(leases), actual=st.integers(-10, 12_000))
    def settle(self, rid: str, actual: int) -> None:
        self._settle(rid, actual)

    @rule(rid=consumes(leases))
    def fail(self, rid: str) -> None:
        self._settle(rid, 0)

    @rule()
    def expire(self) -> None:
        self.clock.advance(LEASE)

    @rule(ms=st.sampled_from(ADVANCES))
    def advance(self, ms: int) -> None:
        self.clock.advance(ms)

    @rule(rid=leases)
    def extend(self, rid: str) -> None:
        self.expire_model()
        self.run(self.backend.extend(TENANT, [rid], LEASE))
        if rid in self.live:
            self.live[rid] = (self.live[rid][0], self.now() + LEASE)

    @invariant()
    def money_adds_up(self) -> None:
        self.expire_model()
        usage = self.usage()
        for w in usage.values():
            if w.limit is not None:
                assert 0 <= w.spent + w.reserved <= w.limit, w
        assert usage["total"].reserved == sum(g for g, _ in self.live.values())
        assert usage["total"].spent == self.charged
        assert self.held_by_settled - self.released + self.lapsed_charged == self.charged

    @invariant()
    def spend_is_the_ledger(self) -> None:
        page = self.run(self.backend.ledger(LedgerQuery(tenant=TENANT, limit=10_000)))
        assert len(page.rows) == self.settles
        usage = self.usage()
        now = self.now()
        for w in ("daily", "monthly", "total"):
            current = period(w, now)
            in_window = sum(r.cost for r in page.rows if period(w, r.ts_ms) == current)
            assert usage[w].spent == in_window, w


class RedisBudgetMachine(BudgetMachine):
    kind = "redis"


class LockstepMachine(AsyncMachine):
    """The same calls on both backends must give the same answers."""

    leases = Bundle("leases")

    def __init__(self) -> None:
        super().__init__()
        self.embedded = self.open("embedded")
        self.redis = self.open("redis")
        self.n = 0
        self.end_user: dict[str, EndUserTerms | None] = {}

    def both(self, call: Any) -> Any:
        a = self.run(call(self.embedded))
        b = self.run(call(self.redis))
        assert a == b
        return a

    @rule(
        target=leases,
        amount=st.integers(0, 7_000),
        tokens=st.integers(0, 3_000),
        clamp=st.booleans(),
        count=st.booleans(),
        lease=st.sampled_from([1_000, LEASE, 10 * MINUTE_MS]),
        key=st.sampled_from(["", "ka", "kb"]),
        end_user=st.sampled_from(sorted(END_USERS)),
        with_lookup=st.booleans(),
    )
    def admit(
        self,
        amount: int,
        tokens: int,
        clamp: bool,
        count: bool,
        lease: int,
        key: str,
        end_user: str,
        with_lookup: bool,
    ) -> Any:
        self.n += 1
        rid = f"r{self.n}"
        eu = self.end_user[rid] = END_USERS[end_user]
        a = Admission(TENANT, rid, amount, tokens, BUDGETS, RateLimits(rpm=5, tpm=4_000,
                      concurrent=4), lease, amount // 3 if clamp else None, count, key,
                      RateLimits(rpm=3, tpm=2_500, concurrent=2) if key else None,
                      eu)  # fmt: skip
        if with_lookup:  # a cache miss admitted in the lookup's call (cache_admit_v1)
            entry = f"{TENANT}:{self.n:064x}"
            value, leads, res = self.both(lambda s: s.cache_lookup_admit(entry, lease, a))
            assert value is None and leads and res is not None
        else:
            res = self.both(lambda s: s.admit(a))
        event(f"admit: {res.rejected_by or ('clamped' if res.granted < amount else 'ok')}")
        return rid if res.ok else multiple()

    @rule(rid=consumes(leases), actual=st.integers(-10, 12_000), delta=st.integers(-3_000, 500))
    def settle(self, rid: str, actual: int, delta: int) -> None:
        eu = self.end_user.pop(rid)
        rows = [row_for(rid, self.now()) for _ in range(2)]
        for row in rows:
            row.end_user = eu.id if eu else ""
        results = [
            self.run(s.settle(Settlement(TENANT, rid, actual, delta, BUDGETS, row, eu)))
            for s, row in zip((self.embedded, self.redis), rows, strict=True)
        ]
        assert results[0] == results[1]
        assert rows[0] == rows[1]

    @rule(amount=st.integers(1, 6_000))
    def top_up(self, amount: int) -> None:
        self.n += 1
        key = f"t{self.n % 4}"  # some keys repeat: replayed or mismatched

        def row() -> LedgerRow:
            r = row_for(f"t{self.n}", self.now())
            r.end_user, r.credit, r.endpoint = "ub", amount, "credits"
            return r

        res = self.both(lambda s: s.top_up(TENANT, key, row()))
        event(f"top-up: {res.state}")

    def now(self) -> int:
        return self.clock.now_ms()

    @rule(rid=leases, lease=st.sampled_from([1_000, LEASE]))
    def extend(self, rid: str, lease: int) -> None:
        self.both(lambda s: s.extend(TENANT, [rid], lease))

    @rule(ms=st.sampled_from([*ADVANCES, 20 * DAY_MS]))
    def advance(self, ms: int) -> None:
        self.clock.advance(ms)

    @precondition(lambda self: self.n > 0)
    @invariant()
    def same_usage(self) -> None:
        self.both(lambda s: s.usage(TENANT, BUDGETS))
        for eu in END_USERS.values():
            if eu is not None:
                st_ = self.both(lambda s, eu=eu: s.end_user_usage(TENANT, eu))
                assert st_.balance >= 0 or not eu.prepaid


TestEmbeddedBudget = BudgetMachine.TestCase
TestEmbeddedBudget.settings = SETTINGS
TestRedisBudget = RedisBudgetMachine.TestCase
TestRedisBudget.settings = SETTINGS
TestLockstep = LockstepMachine.TestCase
TestLockstep.settings = SETTINGS
for _case in (TestRedisBudget, TestLockstep):
    for _mark in needs_redis:
        _mark(_case)
del _case, _mark
