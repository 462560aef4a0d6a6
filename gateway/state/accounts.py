"""Budget and rate-limit bookkeeping in plain Python, for the embedded backend.

This is the same algorithm as the Redis Lua scripts (``lua/admit_v1.lua``,
``lua/settle_v1.lua``), step for step; one test suite runs against both. Every method
runs to completion without awaiting, so on one event loop each call is atomic."""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from ..config.snapshot import BudgetLimits
from .base import Admission, AdmitResult, RateState, WindowState
from .windows import MINUTE_MS, minute, period, resets_at


@dataclass(slots=True)
class Lease:
    amount: int
    tokens: int
    minute: int
    expires_ms: int


@dataclass(slots=True)
class Book:
    """One tenant's state."""

    spent: dict[str, int] = field(default_factory=dict)  # period id -> nanos
    reserved: int = 0
    leases: dict[str, Lease] = field(default_factory=dict)
    expiry: list[tuple[int, str]] = field(default_factory=list)  # heap, lazily cleaned
    rl_minute: int = -1
    rl_requests: int = 0
    rl_tokens: int = 0


def _limits(b: BudgetLimits) -> tuple[tuple[str, int | None], ...]:
    return (("daily", b.daily), ("monthly", b.monthly), ("total", b.total))


class Accounts:
    def __init__(self) -> None:
        self.books: dict[str, Book] = {}

    def book(self, tenant: str) -> Book:
        b = self.books.get(tenant)
        if b is None:
            b = self.books[tenant] = Book()
        return b

    def load_spent(self, tenant: str, period_id: str, nanos: int) -> None:
        """Rebuild from durable storage at start."""
        self.book(tenant).spent[period_id] = nanos

    # -- leases ------------------------------------------------------------------------
    @staticmethod
    def _expire(b: Book, now: int) -> None:
        heap = b.expiry
        while heap and heap[0][0] <= now:
            exp, rid = heapq.heappop(heap)
            lease = b.leases.get(rid)
            if lease is not None and lease.expires_ms == exp:
                del b.leases[rid]
                b.reserved -= lease.amount

    def extend(self, tenant: str, ids: list[str], lease_ms: int, now: int) -> None:
        b = self.book(tenant)
        self._expire(b, now)
        for rid in ids:
            lease = b.leases.get(rid)
            if lease is not None:
                lease.expires_ms = now + lease_ms
                heapq.heappush(b.expiry, (lease.expires_ms, rid))

    # -- windows -----------------------------------------------------------------------
    def windows(self, b: Book, budgets: BudgetLimits, now: int) -> list[WindowState]:
        return [
            WindowState(
                window=w,
                limit=limit,
                spent=b.spent.get(period(w, now), 0),
                reserved=b.reserved,
                resets_at_ms=resets_at(w, now),
            )
            for w, limit in _limits(budgets)
        ]

    def usage(self, tenant: str, budgets: BudgetLimits, now: int) -> list[WindowState]:
        b = self.book(tenant)
        self._expire(b, now)
        return self.windows(b, budgets, now)

    def _rate(self, b: Book, a: Admission, now: int) -> RateState:
        reset = (b.rl_minute + 1) * MINUTE_MS - now
        lim = a.limits
        return RateState(
            limit_requests=lim.rpm,
            remaining_requests=None if lim.rpm is None else max(lim.rpm - b.rl_requests, 0),
            reset_requests_ms=reset,
            limit_tokens=lim.tpm,
            remaining_tokens=None if lim.tpm is None else max(lim.tpm - b.rl_tokens, 0),
            reset_tokens_ms=reset,
        )

    # -- admit / settle ----------------------------------------------------------------
    def admit(self, a: Admission, now: int) -> AdmitResult:
        b = self.book(a.tenant)
        self._expire(b, now)
        m = minute(now)
        if b.rl_minute != m:
            b.rl_minute, b.rl_requests, b.rl_tokens = m, 0, 0
        lim = a.limits
        until_next_minute = (m + 1) * MINUTE_MS - now

        def reject(by: str, retry_ms: int, window: str | None = None) -> AdmitResult:
            return AdmitResult(
                ok=False,
                granted=0,
                windows=self.windows(b, a.budgets, now),
                rate=self._rate(b, a, now),
                now_ms=now,
                rejected_by=by,  # type: ignore[arg-type]
                window=window,
                retry_after_ms=retry_ms,
            )

        if a.count_request and lim.rpm is not None and b.rl_requests + 1 > lim.rpm:
            return reject("rpm", until_next_minute)
        if lim.tpm is not None and b.rl_tokens + a.tokens > lim.tpm:
            return reject("tpm", until_next_minute)
        if lim.concurrent is not None and len(b.leases) + 1 > lim.concurrent:
            return reject("concurrent", 1000)

        granted = a.amount
        for w, limit in _limits(a.budgets):
            if limit is None:
                continue
            room = limit - b.spent.get(period(w, now), 0) - b.reserved
            if granted > room:
                if a.min_amount is not None and room >= a.min_amount:
                    granted = room
                else:
                    return reject("budget", 0, w)

        if a.count_request:
            b.rl_requests += 1
        b.rl_tokens += a.tokens
        old = b.leases.get(a.reservation_id)
        if old is not None:  # the same id again replaces its lease (as admit_v1.lua does)
            b.reserved -= old.amount
        lease = Lease(granted, a.tokens, m, now + a.lease_ms)
        b.leases[a.reservation_id] = lease
        heapq.heappush(b.expiry, (lease.expires_ms, a.reservation_id))
        b.reserved += granted
        return AdmitResult(
            ok=True,
            granted=granted,
            windows=self.windows(b, a.budgets, now),
            rate=self._rate(b, a, now),
            now_ms=now,
        )

    def settle(
        self, tenant: str, rid: str, charge: int, tokens_delta: int, budgets: BudgetLimits, now: int
    ) -> tuple[int, list[str]]:
        """Apply a settlement; return what was charged and the periods it was added to."""
        b = self.book(tenant)
        self._expire(b, now)
        charge = max(charge, 0)
        lease = b.leases.pop(rid, None)
        if lease is not None:
            b.reserved -= lease.amount
            charged = min(charge, lease.amount)
            if lease.minute == minute(now) == b.rl_minute:
                b.rl_tokens = max(b.rl_tokens + tokens_delta, 0)
        else:
            # The lease lapsed: charge only what still fits, never overspend.
            charged = charge
            for w, limit in _limits(budgets):
                if limit is not None:
                    room = limit - b.spent.get(period(w, now), 0) - b.reserved
                    charged = min(charged, max(room, 0))
        periods = [period(w, now) for w in ("daily", "monthly", "total")]
        if charged:
            for p in periods:
                b.spent[p] = b.spent.get(p, 0) + charged
            self._forget_old(b, periods)
        return charged, periods

    def refund(self, tenant: str, periods: list[str], amount: int) -> None:
        """Undo a settlement whose ledger write failed (the caller gets an error)."""
        b = self.book(tenant)
        for p in periods:
            if p in b.spent:
                b.spent[p] -= amount

    @staticmethod
    def _forget_old(b: Book, current: list[str]) -> None:
        if len(b.spent) > 3:
            keep = set(current)
            for p in [p for p in b.spent if p not in keep]:
                del b.spent[p]
