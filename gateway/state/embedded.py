"""The embedded backend (default): one gateway process, no other service.

Counters live in memory (:mod:`.accounts`); the ledger, spend per window period and
completed idempotency keys are durable in SQLite (:mod:`.sqlite_store`) and rebuilt at
start. The prompt cache is an in-memory LRU bounded in bytes."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass

from ..clock import SYSTEM_CLOCK, Clock
from ..config.snapshot import BudgetLimits
from .accounts import Accounts
from .base import (
    Admission,
    AdmitResult,
    EndUserState,
    EndUserTerms,
    IdemBegin,
    LedgerPage,
    LedgerQuery,
    LedgerRow,
    Settlement,
    SettleResult,
    StateBackend,
    StateUnavailable,
    TopUp,
    WindowState,
)
from .sqlite_store import INSERT_TOP_UP, SqliteStore, ledger_write

_IDEM_UPSERT = (
    "INSERT OR REPLACE INTO idempotency (tenant, key, fingerprint, record, expires_ms) "
    "VALUES (?, ?, ?, ?, ?)"
)


@dataclass(slots=True)
class _Idem:
    fingerprint: str
    done: bool
    record: bytes | None
    expires_ms: int


class ByteLRU:
    """An LRU map bounded by the memory its entries take, with per-entry expiry.

    An entry counts its value and key bytes plus ``ENTRY_OVERHEAD`` for the objects that
    hold them and its share of the ordered dict's tables (the bytes and str headers, the
    tuple, the expiry, the dict's entry and index, the order node), so ``max_bytes``
    bounds memory, not only the values' sizes. Measured in a fresh interpreter
    (tests/state/test_byte_lru.py): 1 MB of 50-, 300- and 2,000-byte values take 0.88,
    0.99 and 0.98 MB with 280 bytes; 200 let 50-byte values take 1.23 MB."""

    ENTRY_OVERHEAD = 280

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self._d: OrderedDict[str, tuple[bytes, int]] = OrderedDict()

    @classmethod
    def _cost(cls, key: str, value: bytes) -> int:
        return len(value) + len(key) + cls.ENTRY_OVERHEAD

    def get(self, key: str, now: int) -> bytes | None:
        item = self._d.get(key)
        if item is None:
            return None
        value, expires = item
        if expires <= now:
            self._pop(key)
            return None
        self._d.move_to_end(key)
        return value

    def put(self, key: str, value: bytes, expires: int) -> None:
        cost = self._cost(key, value)
        if cost > self.max_bytes:
            return
        if key in self._d:
            self._pop(key)
        self._d[key] = (value, expires)
        self.size += cost
        while self.size > self.max_bytes:
            old, _ = next(iter(self._d.items()))
            self._pop(old)

    def _pop(self, key: str) -> None:
        value, _ = self._d.pop(key)
        self.size -= self._cost(key, value)

    def __len__(self) -> int:
        return len(self._d)


class EmbeddedState(StateBackend):
    name = "embedded"

    def __init__(
        self,
        path: str,
        *,
        sync: str = "normal",
        cache_bytes: int = 256 * 1024 * 1024,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.clock = clock
        self.accounts = Accounts()
        self.store = SqliteStore(path, sync)
        self.cache = ByteLRU(cache_bytes)
        self._idem: dict[tuple[str, str], _Idem] = {}
        self._flights: dict[str, int] = {}
        self._started = False
        self._idem_calls = 0
        # Top-ups seen by this process, (tenant, key) -> (end user, nanos, row id); older
        # ones are looked up in SQLite.
        self._top_ups: OrderedDict[tuple[str, str], tuple[str, int, str]] = OrderedDict()

    async def start(self) -> None:
        conn = await asyncio.to_thread(self.store.open)
        now = self.clock.now_ms()
        rows = await asyncio.to_thread(
            lambda: conn.execute("SELECT tenant, period, nanos FROM spend").fetchall()
        )
        now = self.clock.now_ms()
        for tenant, p, nanos in rows:
            self.accounts.load_spent(tenant, p, nanos)
        eu_rows = await asyncio.to_thread(
            lambda: conn.execute(
                "SELECT tenant, end_user, day, day_nanos, month, month_nanos, total_nanos, "
                "balance FROM end_users"
            ).fetchall()
        )
        for tenant, end_user, day, day_n, month, month_n, total, balance in eu_rows:
            self.accounts.load_end_user(
                tenant, end_user, {day: day_n, month: month_n, "t": total}, balance
            )
        idem = await asyncio.to_thread(
            lambda: conn.execute(
                "SELECT tenant, key, fingerprint, record, expires_ms FROM idempotency "
                "WHERE expires_ms > ?",
                (now,),
            ).fetchall()
        )
        for tenant, key, fp, record, exp in idem:
            self._idem[(tenant, key)] = _Idem(fp, True, bytes(record), exp)
        await asyncio.to_thread(
            lambda: conn.execute("DELETE FROM idempotency WHERE expires_ms <= ?", (now,))
        )
        self.store.start(asyncio.get_running_loop())
        self._started = True

    async def close(self) -> None:
        await self.store.close()

    async def ping(self) -> None:
        if not self._started:
            raise StateUnavailable("embedded state is not started")
        if self.store.broken:
            raise StateUnavailable(f"the ledger database fails to commit ({self.store.broken})")

    # -- money and limits ------------------------------------------------------------------
    async def admit(self, a: Admission) -> AdmitResult:
        return self.accounts.admit(a, self.clock.now_ms())

    async def settle(self, s: Settlement) -> SettleResult:
        now = self.clock.now_ms()
        c = self.accounts.settle(
            s.tenant, s.reservation_id, s.charge, s.tokens_delta, s.budgets, now, s.end_user
        )
        s.row.cost = c.charged
        s.row.overrun = max(s.charge - c.charged, 0)
        s.row.credit = c.credit
        try:
            await self.store.write(
                ledger_write(s.row, [(p, c.charged) for p in c.periods], c.end_user)
            )
        except BaseException:
            self.accounts.refund(s.tenant, c)
            s.row.cost = s.row.credit = 0
            raise
        eu = None
        if s.end_user is not None:  # (the settlement just expired the lapsed leases)
            book = self.accounts.end_user_book(s.tenant, s.end_user.id)
            eu = self.accounts.end_user_state(book, s.end_user.budgets, now)
        return SettleResult(c.charged, self.accounts.usage(s.tenant, s.budgets, now), eu)

    async def record(self, row: LedgerRow) -> None:
        await self.store.write(ledger_write(row, []))

    async def extend(self, tenant: str, reservation_ids: list[str], lease_ms: int) -> None:
        self.accounts.extend(tenant, reservation_ids, lease_ms, self.clock.now_ms())

    async def usage(self, tenant: str, budgets: BudgetLimits) -> list[WindowState]:
        return self.accounts.usage(tenant, budgets, self.clock.now_ms())

    async def ledger(self, q: LedgerQuery) -> LedgerPage:
        return await self.store.ledger(q)

    # -- end users ---------------------------------------------------------------------
    async def end_user_usage(self, tenant: str, terms: EndUserTerms) -> EndUserState:
        return self.accounts.end_user_usage(tenant, terms, self.clock.now_ms())

    async def top_up(self, tenant: str, key: str, row: LedgerRow) -> TopUp:
        if row.credit <= 0 or not row.end_user:
            raise ValueError("a top-up needs an end user and a positive amount")
        ik = (tenant, key)
        if ik not in self._top_ups:
            found = await self.store.query(
                "SELECT end_user, nanos, row_id FROM top_ups WHERE tenant = ? AND key = ?", ik
            )
            if found and ik not in self._top_ups:
                self._remember_top_up(ik, (found[0][0], found[0][1], found[0][2]))
        earlier = self._top_ups.get(ik)
        if earlier is not None:  # nothing was awaited since this check: atomic
            eu, nanos, row_id = earlier
            balance = self.accounts.end_user_book(tenant, eu).balance
            same = eu == row.end_user and nanos == row.credit
            return TopUp("replayed" if same else "mismatch", row_id, balance)
        # The key is claimed now; the credits count once they are on disk (a failed
        # write leaves no money that calls could already have spent).
        # A caller cancelled meanwhile does not stop it half-way (shielded).
        self._remember_top_up(ik, (row.end_user, row.credit, row.id))
        return await asyncio.shield(asyncio.ensure_future(self._apply_top_up(tenant, key, row)))

    async def _apply_top_up(self, tenant: str, key: str, row: LedgerRow) -> TopUp:
        try:
            await self.store.write(
                [
                    (INSERT_TOP_UP, (tenant, key, row.end_user, row.credit, row.id)),
                    *ledger_write(row, [], row.end_user),
                ]
            )
        except BaseException:
            self._top_ups.pop((tenant, key), None)
            raise
        return TopUp("applied", row.id, self.accounts.top_up(tenant, row.end_user, row.credit))

    def _remember_top_up(self, ik: tuple[str, str], value: tuple[str, int, str]) -> None:
        self._top_ups[ik] = value
        if len(self._top_ups) > 100_000:
            self._top_ups.popitem(last=False)

    # -- idempotency -------------------------------------------------------------------
    async def idem_begin(self, tenant: str, key: str, fingerprint: str, lease_ms: int) -> IdemBegin:
        now = self.clock.now_ms()
        self._idem_calls += 1
        if self._idem_calls % 1024 == 0:
            self._purge_expired(now)
        item = self._idem.get((tenant, key))
        if item is not None and item.expires_ms <= now:
            item = None
        if item is None:
            self._idem[(tenant, key)] = _Idem(fingerprint, False, None, now + lease_ms)
            return IdemBegin("new")
        if item.fingerprint != fingerprint:
            return IdemBegin("mismatch")
        if item.done:
            return IdemBegin("done", item.record)
        return IdemBegin("inflight")

    def _purge_expired(self, now: int) -> None:
        """Forget expired keys, in memory and on disk (a bounded amount of work)."""
        for ik in [ik for ik, v in self._idem.items() if v.expires_ms <= now]:
            del self._idem[ik]
        for fk in [fk for fk, exp in self._flights.items() if exp <= now]:
            del self._flights[fk]
        self.store.write_nowait([("DELETE FROM idempotency WHERE expires_ms <= ?", (now,))])

    async def idem_finish(
        self, tenant: str, key: str, fingerprint: str, record: bytes, ttl_ms: int
    ) -> None:
        expires = self.clock.now_ms() + ttl_ms
        item = self._idem[(tenant, key)] = _Idem(fingerprint, True, record, expires)
        await self.store.write(
            [(_IDEM_UPSERT, (tenant, key, item.fingerprint, record, item.expires_ms))]
        )

    async def idem_abandon(self, tenant: str, key: str) -> None:
        item = self._idem.get((tenant, key))
        if item is not None and not item.done:
            del self._idem[(tenant, key)]

    # -- cache -------------------------------------------------------------------------
    async def cache_get(self, key: str) -> bytes | None:
        return self.cache.get(key, self.clock.now_ms())

    async def cache_put(self, key: str, value: bytes, ttl_ms: int) -> None:
        self.cache.put(key, value, self.clock.now_ms() + ttl_ms)

    async def flight_begin(self, key: str, lease_ms: int) -> bool:
        now = self.clock.now_ms()
        exp = self._flights.get(key)
        if exp is not None and exp > now:
            return False
        self._flights[key] = now + lease_ms
        return True

    async def flight_end(self, key: str) -> None:
        self._flights.pop(key, None)
