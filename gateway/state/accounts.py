"""Budget and rate-limit bookkeeping in plain Python, for the embedded backend.

This is the same algorithm as the Redis Lua scripts (``lua/admit_v1.lua``,
``lua/settle_v1.lua``), step for step; one test suite runs against both. Every method
runs to completion without awaiting, so on one event loop each call is atomic."""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from ..config.snapshot import BudgetLimits
from .base import (
    Admission,
    AdmitResult,
    EndUserState,
    EndUserTerms,
    RateLimits,
    RateState,
    WindowState,
)
from .windows import MINUTE_MS, minute, periods, resets_at


@dataclass(slots=True)
class Charge:
    """What a settlement charged, to which periods, and the end user's balance change."""

    charged: int
    periods: list[str]
    end_user: str = ""
    credit: int = 0  # -charged when paid from prepaid credits


@dataclass(slots=True)
class Lease:
    amount: int
    tokens: int
    minute: int
    expires_ms: int
    key: str = ""  # the key's fingerprint when the key has limits of its own
    end_user: str = ""  # the end user it was admitted for, if any
    prepaid: bool = False  # paid from the end user's balance


@dataclass(slots=True)
class KeyCounts:
    """Rate-limit counts of a scope inside a tenant (a key with limits of its own, or an
    end user): requests and tokens of its current minute, and requests in flight."""

    minute: int = -1
    requests: int = 0
    tokens: int = 0
    live: int = 0


@dataclass(slots=True)
class EndUserBook:
    """One end user's state inside its tenant's book."""

    spent: dict[str, int] = field(default_factory=dict)  # period id -> nanos
    reserved: int = 0
    balance: int = 0  # prepaid credits: top-ups minus prepaid charges
    counts: KeyCounts = field(default_factory=KeyCounts)


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
    keys: dict[str, KeyCounts] = field(default_factory=dict)
    end_users: dict[str, EndUserBook] = field(default_factory=dict)


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

    def end_user_book(self, tenant: str, end_user: str) -> EndUserBook:
        b = self.book(tenant)
        e = b.end_users.get(end_user)
        if e is None:
            e = b.end_users[end_user] = EndUserBook()
        return e

    def load_end_user(
        self, tenant: str, end_user: str, spent: dict[str, int], balance: int
    ) -> None:
        """Rebuild from durable storage at start: spend per period id, and the balance."""
        e = self.end_user_book(tenant, end_user)
        e.spent = {p: n for p, n in spent.items() if p}
        e.balance = balance

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
                Accounts._lease_done(b, lease)

    def extend(self, tenant: str, ids: list[str], lease_ms: int, now: int) -> None:
        b = self.book(tenant)
        self._expire(b, now)
        for rid in ids:
            lease = b.leases.get(rid)
            if lease is not None:
                lease.expires_ms = now + lease_ms
                heapq.heappush(b.expiry, (lease.expires_ms, rid))

    @staticmethod
    def _lease_done(b: Book, lease: Lease) -> None:
        """A lease ended (settled or lapsed): its key and end user hold it no more."""
        kc = b.keys.get(lease.key) if lease.key else None
        if kc is not None:
            kc.live -= 1
            if kc.live <= 0 and kc.minute < b.rl_minute:
                del b.keys[lease.key]  # nothing in flight, nothing counted this minute
        e = b.end_users.get(lease.end_user) if lease.end_user else None
        if e is not None:
            e.counts.live -= 1
            e.reserved -= lease.amount

    # -- windows -----------------------------------------------------------------------
    def windows(self, b: Book, budgets: BudgetLimits, now: int) -> list[WindowState]:
        ids = periods(now)
        return [
            WindowState(
                window=w,
                limit=limit,
                spent=b.spent.get(ids[w], 0),
                reserved=b.reserved,
                resets_at_ms=resets_at(w, now),
            )
            for w, limit in _limits(budgets)
        ]

    def usage(self, tenant: str, budgets: BudgetLimits, now: int) -> list[WindowState]:
        b = self.book(tenant)
        self._expire(b, now)
        return self.windows(b, budgets, now)

    @staticmethod
    def end_user_state(e: EndUserBook, budgets: BudgetLimits, now: int) -> EndUserState:
        ids = periods(now)
        windows = [
            WindowState(w, limit, e.spent.get(ids[w], 0), e.reserved, resets_at(w, now))
            for w, limit in _limits(budgets)
        ]
        return EndUserState(windows, e.balance, e.counts.live)

    def end_user_usage(self, tenant: str, terms: EndUserTerms, now: int) -> EndUserState:
        b = self.book(tenant)
        self._expire(b, now)
        e = b.end_users.get(terms.id) or EndUserBook()
        return self.end_user_state(e, terms.budgets, now)

    def top_up(self, tenant: str, end_user: str, amount: int) -> int:
        """Add credits; return the new balance."""
        e = self.end_user_book(tenant, end_user)
        e.balance += amount
        return e.balance

    def _rate(self, b: Book, a: Admission, now: int) -> RateState:
        return rate_state(
            a, now, b.rl_minute, b.rl_requests, b.rl_tokens, self._key_counts(b, a, minute(now))
        )

    @staticmethod
    def _key_counts(b: Book, a: Admission, m: int) -> KeyCounts | None:
        if not a.key or a.key_limits is None:
            return None
        kc = b.keys.get(a.key)
        if kc is None:
            kc = b.keys[a.key] = KeyCounts()
        if kc.minute != m:
            kc.minute, kc.requests, kc.tokens = m, 0, 0
        return kc

    # -- admit / settle ----------------------------------------------------------------
    def admit(self, a: Admission, now: int) -> AdmitResult:
        b = self.book(a.tenant)
        self._expire(b, now)
        m = minute(now)
        if b.rl_minute != m:
            b.rl_minute, b.rl_requests, b.rl_tokens = m, 0, 0
        lim = a.limits
        until_next_minute = (m + 1) * MINUTE_MS - now
        eu = a.end_user
        e = self.end_user_book(a.tenant, eu.id) if eu is not None else None
        ec = e.counts if e is not None else None
        if ec is not None and ec.minute != m:
            ec.minute, ec.requests, ec.tokens = m, 0, 0

        def result(ok: bool, granted: int = 0, by: str | None = None, window: str | None = None,
                   retry_ms: int = 0) -> AdmitResult:  # fmt: skip
            return AdmitResult(
                ok=ok,
                granted=granted,
                windows=self.windows(b, a.budgets, now),
                rate=self._rate(b, a, now),
                now_ms=now,
                rejected_by=by,  # type: ignore[arg-type]
                window=window,
                retry_after_ms=retry_ms,
                end_user=None
                if e is None or eu is None
                else self.end_user_state(e, eu.budgets, now),
            )

        # Rate limits: the tenant's, then the key's own, then the end user's.
        kc = self._key_counts(b, a, m)
        scopes: list[tuple[str, RateLimits, int, int, int]] = [
            ("", lim, b.rl_requests, b.rl_tokens, len(b.leases))
        ]
        own: list[KeyCounts] = []  # the key's and the end user's counts, if any
        if kc is not None:
            assert a.key_limits is not None
            scopes.append(("key_", a.key_limits, kc.requests, kc.tokens, kc.live))
            own.append(kc)
        if ec is not None and eu is not None:
            scopes.append(("end_user_", eu.limits, ec.requests, ec.tokens, ec.live))
            own.append(ec)
        for scope, sl, requests, tokens, live in scopes:
            if a.count_request and sl.rpm is not None and requests + 1 > sl.rpm:
                return result(False, by=scope + "rpm", retry_ms=until_next_minute)
            if sl.tpm is not None and tokens + a.tokens > sl.tpm:
                return result(False, by=scope + "tpm", retry_ms=until_next_minute)
            if sl.concurrent is not None and live + 1 > sl.concurrent:
                return result(False, by=scope + "concurrent", retry_ms=1000)

        # Every window that applies, the tenant's first: what fits all of them is granted.
        ids = periods(now)
        rooms: list[tuple[str, str, int]] = [
            ("budget", w, limit - b.spent.get(ids[w], 0) - b.reserved)
            for w, limit in _limits(a.budgets)
            if limit is not None
        ]
        if e is not None and eu is not None:
            rooms += [
                ("end_user_budget", w, limit - e.spent.get(ids[w], 0) - e.reserved)
                for w, limit in _limits(eu.budgets)
                if limit is not None
            ]
            if eu.prepaid:
                rooms.append(("credits", "balance", e.balance - e.reserved))
        granted = a.amount
        for by, w, room in rooms:
            if granted > room:
                if a.min_amount is not None and room >= a.min_amount:
                    granted = room
                else:
                    return result(False, by=by, window=w)

        if a.count_request:
            b.rl_requests += 1
        b.rl_tokens += a.tokens
        old = b.leases.get(a.reservation_id)
        if old is not None:  # the same id again replaces its lease (as admit_v1.lua does)
            b.reserved -= old.amount
            self._lease_done(b, old)
        for c in own:
            if a.count_request:
                c.requests += 1
            c.tokens += a.tokens
            c.live += 1
        if e is not None:
            e.reserved += granted
        lease = Lease(
            granted,
            a.tokens,
            m,
            now + a.lease_ms,
            a.key if kc is not None else "",
            eu.id if eu is not None else "",
            eu is not None and eu.prepaid,
        )
        b.leases[a.reservation_id] = lease
        heapq.heappush(b.expiry, (lease.expires_ms, a.reservation_id))
        b.reserved += granted
        return result(True, granted)

    def settle(
        self,
        tenant: str,
        rid: str,
        charge: int,
        tokens_delta: int,
        budgets: BudgetLimits,
        now: int,
        end_user: EndUserTerms | None = None,
    ) -> Charge:
        """Apply a settlement: release the lease and charge."""
        b = self.book(tenant)
        self._expire(b, now)
        ids = periods(now)
        charge = max(charge, 0)
        lease = b.leases.pop(rid, None)
        if lease is not None:
            b.reserved -= lease.amount
            if len(b.expiry) > 2 * len(b.leases) + 64:
                # Settled leases stay in the heap until they would have expired (the
                # lease, 5 min): at 2,000 requests/s that is 600k entries, ~100 MB.
                # Rebuilding from the live leases keeps it at O(requests in flight).
                b.expiry = [(x.expires_ms, r) for r, x in b.leases.items()]
                heapq.heapify(b.expiry)
            charged = min(charge, lease.amount)
            m = minute(now)
            if lease.minute == m == b.rl_minute:
                b.rl_tokens = max(b.rl_tokens + tokens_delta, 0)
            kc = b.keys.get(lease.key) if lease.key else None
            eb = b.end_users.get(lease.end_user) if lease.end_user else None
            for c in (kc, eb.counts if eb is not None else None):
                if c is not None and lease.minute == m == c.minute:
                    c.tokens = max(c.tokens + tokens_delta, 0)
            self._lease_done(b, lease)
            eu_id, prepaid = lease.end_user, lease.prepaid
        else:
            # The lease lapsed: charge only what still fits, never overspend.
            charged = charge
            for w, limit in _limits(budgets):
                if limit is not None:
                    room = limit - b.spent.get(ids[w], 0) - b.reserved
                    charged = min(charged, max(room, 0))
            eu_id = end_user.id if end_user is not None else ""
            prepaid = end_user is not None and end_user.prepaid
            if end_user is not None:
                eb = self.end_user_book(tenant, eu_id)
                for w, limit in _limits(end_user.budgets):
                    if limit is not None:
                        room = limit - eb.spent.get(ids[w], 0) - eb.reserved
                        charged = min(charged, max(room, 0))
                if prepaid:
                    charged = min(charged, max(eb.balance - eb.reserved, 0))
        spent_in = [ids["daily"], ids["monthly"], ids["total"]]
        out = Charge(charged, spent_in, eu_id, -charged if prepaid else 0)
        if charged:
            for p in spent_in:
                b.spent[p] = b.spent.get(p, 0) + charged
            self._forget_old(b.spent, spent_in)
            if eu_id:
                e = self.end_user_book(tenant, eu_id)
                for p in spent_in:
                    e.spent[p] = e.spent.get(p, 0) + charged
                self._forget_old(e.spent, spent_in)
                e.balance += out.credit
        return out

    def refund(self, tenant: str, c: Charge) -> None:
        """Undo a settlement whose ledger write failed (the caller gets an error)."""
        b = self.book(tenant)
        e = b.end_users.get(c.end_user) if c.end_user else None
        for p in c.periods:
            if p in b.spent:
                b.spent[p] -= c.charged
            if e is not None and p in e.spent:
                e.spent[p] -= c.charged
        if e is not None:
            e.balance -= c.credit

    @staticmethod
    def _forget_old(spent: dict[str, int], current: list[str]) -> None:
        if len(spent) > 3:
            keep = set(current)
            for p in [p for p in spent if p not in keep]:
                del spent[p]


def rate_state(
    a: Admission, now: int, m: int, requests: int, tokens: int, key: KeyCounts | None
) -> RateState:
    """The x-ratelimit-* view: per dimension, the key's own limit if set, else the tenant's.
    Shared with the Redis backend, so both report alike."""
    reset = (m + 1) * MINUTE_MS - now
    lim, klim = a.limits, a.key_limits
    rpm, req_used = lim.rpm, requests
    tpm, tok_used = lim.tpm, tokens
    if key is not None and klim is not None:
        if klim.rpm is not None:
            rpm, req_used = klim.rpm, key.requests
        if klim.tpm is not None:
            tpm, tok_used = klim.tpm, key.tokens
    return RateState(
        limit_requests=rpm,
        remaining_requests=None if rpm is None else max(rpm - req_used, 0),
        reset_requests_ms=reset,
        limit_tokens=tpm,
        remaining_tokens=None if tpm is None else max(tpm - tok_used, 0),
        reset_tokens_ms=reset,
    )
