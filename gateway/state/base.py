"""The state interface: budgets, rate limits, the ledger, idempotency and the cache.

Two backends implement it and pass one test suite: ``embedded`` (one process; counters
in memory, SQLite for what must survive) and ``redis`` (several processes; every
check-and-update is one Lua script). The cost flow of one request:

    admit(amount = worst case)   rate limits checked and counted, amount reserved
      ... upstream call ...
    settle(charge = actual)      reservation released, min(charge, reserved) spent,
                                 tpm corrected, ledger row appended, all at once

A reservation holds a lease; a request that runs long renews it (``extend``); a lease
that lapses (the process died) stops counting, so a crash cannot block a tenant.
Amounts are integer nano-dollars; times are integer milliseconds since the epoch.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Literal

from ..config.snapshot import BudgetLimits

WINDOWS = ("daily", "monthly", "total")


class StateUnavailable(Exception):
    """The backend cannot be reached; the gateway must not fail open on money."""


@dataclass(frozen=True, slots=True)
class RateLimits:
    rpm: int | None = None
    tpm: int | None = None
    concurrent: int | None = None


@dataclass(frozen=True, slots=True)
class EndUserTerms:
    """A tenant's own customer (an end user) on a request, and what applies to it on top
    of the tenant's own budgets and limits. ``prepaid``: calls are also paid from the end
    user's balance of prepaid credits, which can never go below zero."""

    id: str
    budgets: BudgetLimits = field(default_factory=BudgetLimits)
    limits: RateLimits = field(default_factory=RateLimits)
    prepaid: bool = False


@dataclass(slots=True)
class Admission:
    tenant: str
    reservation_id: str
    amount: int  # worst-case cost, nano-dollars
    tokens: int  # estimated prompt + max output tokens, for tpm
    budgets: BudgetLimits
    limits: RateLimits
    lease_ms: int
    # Clamp mode: when ``amount`` does not fit, reserve whatever fits if that is at least
    # ``min_amount`` (the caller then lowers max_tokens to match). None: all or nothing.
    min_amount: int | None = None
    count_request: bool = True  # False for retried attempts of one request
    # Limits of the key itself (on top of the tenant's), counted per key fingerprint.
    key: str = ""
    key_limits: RateLimits | None = None
    end_user: EndUserTerms | None = None


@dataclass(slots=True)
class WindowState:
    window: str  # "daily" | "monthly" | "total"
    limit: int | None  # None: no limit, reported for its spend
    spent: int
    reserved: int
    resets_at_ms: int | None  # None for "total"

    @property
    def remaining(self) -> int | None:
        if self.limit is None:
            return None
        return max(self.limit - self.spent - self.reserved, 0)


@dataclass(slots=True)
class RateState:
    """What OpenAI's ``x-ratelimit-*`` headers report, after this admission: for each of
    requests and tokens, the key's own limit if it has one, else the tenant's."""

    limit_requests: int | None = None
    remaining_requests: int | None = None
    reset_requests_ms: int = 0
    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    reset_tokens_ms: int = 0


Rejection = Literal[
    "rpm",
    "tpm",
    "concurrent",
    "key_rpm",
    "key_tpm",
    "key_concurrent",
    "end_user_rpm",
    "end_user_tpm",
    "end_user_concurrent",
    "budget",
    "end_user_budget",
    "credits",
]


@dataclass(slots=True)
class EndUserState:
    """An end user's spend per window (against its own budgets), what its requests in
    flight hold, and its balance of prepaid credits (top-ups minus prepaid charges)."""

    windows: list[WindowState]
    balance: int
    in_flight: int = 0


@dataclass(slots=True)
class AdmitResult:
    ok: bool
    granted: int  # nano-dollars reserved (== amount unless clamped; 0 when rejected)
    windows: list[WindowState]
    rate: RateState
    now_ms: int
    rejected_by: Rejection | None = None
    window: str | None = None  # the budget window that did not fit
    retry_after_ms: int = 0
    end_user: EndUserState | None = None  # after this admission, when there is one


@dataclass(slots=True)
class LedgerRow:
    """One row per request that reached a tenant. ``cost`` is filled in by ``settle``."""

    id: str
    ts_ms: int
    tenant: str
    key_fp: str
    endpoint: str
    requested_model: str
    model: str = ""
    provider: str = ""
    route: str = ""
    end_user: str = ""
    stream: bool = False
    status: int = 200
    error_code: str = ""
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    cost: int = 0
    reserved: int = 0
    overrun: int = 0  # actual cost the tenant was not charged (beyond the reservation)
    # Change of the end user's prepaid balance: + a top-up, - a call paid from credits.
    credit: int = 0
    cache: str = "off"
    replay: bool = False
    usage_source: str = "none"  # "upstream" | "counted" | "none"
    attempts: list[dict[str, Any]] = field(default_factory=list)
    latency_ms: int = 0
    ttft_ms: int | None = None
    upstream_ms: int = 0


@dataclass(slots=True)
class Settlement:
    tenant: str
    reservation_id: str
    charge: int  # actual cost; the backend charges at most what was reserved
    tokens_delta: int  # actual tokens minus the admitted estimate (tpm correction)
    budgets: BudgetLimits
    row: LedgerRow
    end_user: EndUserTerms | None = None


@dataclass(slots=True)
class SettleResult:
    charged: int
    windows: list[WindowState]
    end_user: EndUserState | None = None


@dataclass(slots=True)
class LedgerQuery:
    tenant: str | None = None
    model: str | None = None
    since_ms: int | None = None
    until_ms: int | None = None
    status: int | None = None
    end_user: str | None = None  # only with ``tenant``
    limit: int = 100
    cursor: str | None = None  # opaque; from the previous page


@dataclass(slots=True)
class LedgerPage:
    rows: list[LedgerRow]
    next_cursor: str | None


IdemState = Literal["new", "done", "inflight", "mismatch"]


@dataclass(slots=True)
class TopUp:
    """The outcome of a credit top-up: ``applied`` now, ``replayed`` (this idempotency key
    was applied before, with the same end user and amount: nothing changed) or
    ``mismatch`` (the key was used for another end user or amount: nothing changed)."""

    state: Literal["applied", "replayed", "mismatch"]
    row_id: str  # the ledger row of the top-up (the earlier one, when replayed)
    balance: int


@dataclass(slots=True)
class IdemBegin:
    state: IdemState
    record: bytes | None = None  # the stored response when state == "done"


class StateBackend(abc.ABC):
    """What the pipeline needs from shared state. Every method is atomic."""

    name: str

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Connect, load scripts, rebuild counters."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Flush and disconnect."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise StateUnavailable when the backend cannot serve requests."""

    # -- money and limits ------------------------------------------------------------------
    @abc.abstractmethod
    async def admit(self, a: Admission) -> AdmitResult:
        """Check rate limits and every budget window, then count and reserve, atomically.
        A rejected admission changes nothing."""

    @abc.abstractmethod
    async def settle(self, s: Settlement) -> SettleResult:
        """Release the reservation, charge ``min(charge, reserved)`` (an expired
        reservation: at most what still fits), correct tpm, append the ledger row
        (its ``cost`` set to what was charged); durable before it returns."""

    @abc.abstractmethod
    async def record(self, row: LedgerRow) -> None:
        """Append a ledger row for a request that reserved nothing (rejected, replayed)."""

    @abc.abstractmethod
    async def extend(self, tenant: str, reservation_ids: list[str], lease_ms: int) -> None:
        """Renew the leases of reservations still in flight."""

    @abc.abstractmethod
    async def usage(self, tenant: str, budgets: BudgetLimits) -> list[WindowState]:
        """All three windows now: limit (None if unlimited), spent, reserved."""

    @abc.abstractmethod
    async def ledger(self, q: LedgerQuery) -> LedgerPage:
        """Ledger rows, newest first, filtered and paginated."""

    # -- end users ---------------------------------------------------------------------
    @abc.abstractmethod
    async def end_user_usage(self, tenant: str, terms: EndUserTerms) -> EndUserState:
        """The end user's windows (against ``terms.budgets``) and balance now."""

    @abc.abstractmethod
    async def top_up(self, tenant: str, key: str, row: LedgerRow) -> TopUp:
        """Add ``row.credit`` (> 0) to the balance of end user ``row.end_user`` and append
        ``row`` to the ledger, at once, unless idempotency ``key`` was used before."""

    # -- idempotency -------------------------------------------------------------------
    @abc.abstractmethod
    async def idem_begin(self, tenant: str, key: str, fingerprint: str, lease_ms: int) -> IdemBegin:
        """Claim ``key`` for a request whose body hashes to ``fingerprint``."""

    @abc.abstractmethod
    async def idem_finish(
        self, tenant: str, key: str, fingerprint: str, record: bytes, ttl_ms: int
    ) -> None:
        """Store the completed response for replay (even if the claim's lease lapsed
        while the request ran)."""

    @abc.abstractmethod
    async def idem_abandon(self, tenant: str, key: str) -> None:
        """Release a claim whose request failed, so a retry really retries."""

    # -- cache -------------------------------------------------------------------------
    # Keys are '<scope>:<hex digest>': the scope is the tenant, or '*shared' for entries
    # tenants share (no tenant name starts with '*').
    @abc.abstractmethod
    async def cache_get(self, key: str) -> bytes | None: ...

    @abc.abstractmethod
    async def cache_put(self, key: str, value: bytes, ttl_ms: int) -> None: ...

    @abc.abstractmethod
    async def flight_begin(self, key: str, lease_ms: int) -> bool:
        """Become the one request computing ``key`` (True) or learn someone already is."""

    @abc.abstractmethod
    async def flight_end(self, key: str) -> None: ...

    async def cache_lookup(self, key: str, lease_ms: int) -> tuple[bytes | None, bool]:
        """The cached value; or None and whether the caller now leads the single flight
        (a backend may do both in one round trip)."""
        value = await self.cache_get(key)
        if value is not None:
            return value, False
        return None, await self.flight_begin(key, lease_ms)

    async def cache_lookup_admit(
        self, key: str, lease_ms: int, a: Admission
    ) -> tuple[bytes | None, bool, AdmitResult | None]:
        """``cache_lookup``, then ``admit(a)`` if the caller now leads the single flight
        (it will call upstream): (value, leads, the admission's result or None). A hit
        and a caller that waits for another's answer are not admitted (None). A refused
        admission leaves the lease taken: the caller ends the flight as after any
        failure. A backend may do all of it in one round trip."""
        value, leads = await self.cache_lookup(key, lease_ms)
        if not leads:
            return value, False, None
        return None, True, await self.admit(a)

    async def cache_store(
        self, key: str, value: bytes | None, ttl_ms: int, end_flight: bool
    ) -> None:
        """Store ``value`` (unless None) and end the caller's single flight (if it led)."""
        if value is not None:
            await self.cache_put(key, value, ttl_ms)
        if end_flight:
            await self.flight_end(key)
