"""The Redis backend: several gateway processes share budgets, rate limits, the ledger,
idempotency, the cache and single-flight leases.

Every check-and-update is one Lua script from ``lua/`` (the same algorithm as
:mod:`.accounts`), registered once with ``register_script``. Every key of a tenant carries
the hash tag ``{<tenant>}``, so each script touches one Redis Cluster slot:

    <prefix>:v1:{<tenant>}:budget        hash    spend per period id ('d20261126',
                                                 'm202611', 't') and 'reserved'
    <prefix>:v1:{<tenant>}:leases        zset    reservation id -> lease expiry (ms)
    <prefix>:v1:{<tenant>}:lease         hash    reservation id -> 'amount tokens minute'
    <prefix>:v1:{<tenant>}:rl            hash    'minute', 'requests', 'tokens'
    <prefix>:v1:{<tenant>}:ledger        stream  one entry per ledger row: 'cost',
                                                 'overrun', 'credit', 'row' (JSON)
    <prefix>:v1:{<tenant>}:eu:<id>       hash    an end user's spend per period id,
                                                 'reserved', 'live', 'balance', 'rl'
    <prefix>:v1:{<tenant>}:eu-ledger:<id> list  ids of the end user's ledger entries
    <prefix>:v1:{<tenant>}:top-ups       hash    top-up idempotency key -> 'end_user
                                                 nanos row_id'
    <prefix>:v1:{<tenant>}:idem:<key>    hash    idempotency claim or stored response  TTL
    <prefix>:v1:{<tenant>}:cache:<hash>  string  b'<expiry ms>:' + cached response     TTL
    <prefix>:v1:{<tenant>}:flight:<hash> string  single-flight lease expiry (ms)       TTL
    <prefix>:v1:{*shared:<hash>}:cache   string  the same, for entries tenants share   TTL
    <prefix>:v1:{*shared:<hash>}:flight  string                                        TTL
    <prefix>:v1:tenants                  set     tenants that have a ledger stream

A tenant's own cache entries are in its slot, so one script can look an entry up and
admit the request that will compute it (cache_admit_v1); shared entries, which no tenant
owns, each carry their whole name as the tag and spread over the slots.

Keys that hold money or limits never carry a TTL, so under a ``volatile-*`` eviction
policy only cache, flight and idempotency entries can be evicted; the scripts keep them
bounded instead (expired leases and past spend periods are deleted as they go by).

Time comes from Redis ``TIME`` inside the scripts, one clock for every gateway process;
an injected clock (tests) is passed in ARGV instead. Amounts travel as integer strings
and are added with HINCRBY, so Redis keeps them as exact 64-bit integers.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import heapq
import importlib.resources
import logging
import re
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Sequence
from functools import cache
from typing import Any, TypeVar

import orjson
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import SSLConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import (
    AuthenticationError,
    BusyLoadingError,
    ConnectionError,
    RedisError,
    ResponseError,
    TimeoutError,
)

from ..clock import Clock
from ..config.snapshot import BudgetLimits
from .accounts import KeyCounts, rate_state
from .base import (
    WINDOWS,
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
from .resp import RespClient
from .windows import resets_at

log = logging.getLogger("gateway.state")

T = TypeVar("T")

SCRIPTS = (
    "admit_v1",
    "settle_v1",
    "extend_v1",
    "usage_v1",
    "end_user_usage_v1",
    "top_up_v1",
    "record_v1",
    "idem_begin_v1",
    "idem_finish_v1",
    "idem_abandon_v1",
    "flight_begin_v1",
    "cache_lookup_v1",
    "cache_admit_v1",
    "cache_store_v1",
)
DEFAULT_MAX_CONNECTIONS = 100  # per process
MIN_VERSION = (7, 0)  # XADD with '<ms>-*' ids
# A ledger row is written after its request started (``ts_ms``), so its entry id is never
# earlier than ``ts_ms`` -- up to the skew between the gateway's clock and Redis's.
LEDGER_SKEW_MS = 5 * 60_000
_LEDGER_BATCH_MAX = 1000
_TENANT_KEYS_MAX = 10_000


def redis_key(prefix: str, kind: str, scope: str | None = None, suffix: str | None = None) -> str:
    """Every key this backend uses: ``<prefix>:v1:{<scope>}:<kind>[:<suffix>]``.

    ``scope`` (a tenant, or a cache key's scope) is the Cluster hash tag; the one global
    key has none."""
    if scope is None:
        return f"{prefix}:v1:{kind}"
    key = f"{prefix}:v1:{{{scope}}}:{kind}"
    return key if suffix is None else f"{key}:{suffix}"


# -- Lua ----------------------------------------------------------------------------------
_LUA = importlib.resources.files(__package__).joinpath("lua")
_REQUIRES = re.compile(r"^-- requires: (.+)$", re.MULTILINE)


@cache
def _lua_file(name: str) -> str:
    return _LUA.joinpath(f"{name}.lua").read_text(encoding="utf-8")


def compose_lua(text: str) -> str:
    """``text`` preceded by the libraries its ``-- requires: lib_a, lib_b`` line names."""
    m = _REQUIRES.search(text)
    libs = [n.strip() for n in m.group(1).split(",")] if m else []
    return "\n".join([*(_lua_file(lib) for lib in libs), text])


def lua_source(name: str) -> str:
    """The complete source of script ``name`` (``admit_v1``...), libraries included."""
    return compose_lua(_lua_file(name))


# -- ledger rows as stream entries ---------------------------------------------------------
# An entry holds 'cost', 'overrun' and 'credit' (settle_v1 sets them to what it charged),
# then 'row': the row's other fields as one JSON array, in _PACKED_FIELDS order. One
# field instead of one per column: each argument and each field costs Redis ~1,000
# instructions, and a settlement's 25 columns made up a quarter of its script's work.
# A field added to LedgerRow goes at the end of the array, so a gateway reads rows of a
# newer one (extra values are ignored) and of an older one (missing values take their
# defaults). Entries written before 'row' existed hold one field per column; they are
# still read (but gateways of that time cannot read 'row' entries).
_MONEY_FIELDS = ("cost", "overrun", "credit")
_ROW_TYPES = {f.name: str(f.type) for f in dataclasses.fields(LedgerRow)}
_PACKED_FIELDS = tuple(n for n in _ROW_TYPES if n not in _MONEY_FIELDS)
_PACKED = b"row"


def encode_row(row: LedgerRow, *, money: bool = True) -> list[Any]:
    """``row`` as stream fields: name, value, ...; without the money fields if not
    ``money`` (settle_v1 adds them)."""
    packed = orjson.dumps([getattr(row, name) for name in _PACKED_FIELDS])
    if not money:
        return [_PACKED, packed]
    return ["cost", row.cost, "overrun", row.overrun, "credit", row.credit, _PACKED, packed]


def decode_row(fields: dict[bytes, bytes]) -> LedgerRow:
    packed = fields.get(_PACKED)
    if packed is None:
        return _decode_columns(fields)
    values: dict[str, Any] = dict(zip(_PACKED_FIELDS, orjson.loads(packed), strict=False))
    for name in _MONEY_FIELDS:
        raw = fields.get(name.encode())
        if raw is not None:
            values[name] = int(raw)
    return LedgerRow(**values)


def _decode_columns(fields: dict[bytes, bytes]) -> LedgerRow:
    """An entry written with one field per column (before 'row')."""
    values: dict[str, Any] = {}
    for raw_name, raw in fields.items():
        name = raw_name.decode()
        kind = _ROW_TYPES.get(name)
        if kind is None:
            continue  # written by a newer gateway version
        text = raw.decode()
        if kind == "int":
            values[name] = int(text)
        elif kind == "bool":
            values[name] = text == "1"
        elif kind == "int | None":
            values[name] = int(text) if text else None
        elif kind == "str":
            values[name] = text
        else:
            values[name] = orjson.loads(raw)
    return LedgerRow(**values)


def _entry_pos(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq)


def _encode_cursor(entry_id: str, tenant: str) -> str:
    return base64.urlsafe_b64encode(f"{entry_id} {tenant}".encode()).decode()


def _decode_cursor(cursor: str) -> tuple[str, str]:
    try:
        entry_id, _, tenant = base64.urlsafe_b64decode(cursor.encode()).decode().partition(" ")
        ms, _, seq = entry_id.partition("-")
        int(ms), int(seq)
    except (ValueError, binascii.Error, UnicodeError):
        raise ValueError("invalid ledger cursor") from None
    return entry_id, tenant


@dataclasses.dataclass(slots=True)
class _Reader:
    """One tenant's ledger stream, read newest first in batches."""

    tenant: str
    key: str
    end: str  # XREVRANGE upper bound: '+', an entry id, or '(' + id (exclusive)
    batch: int  # entries to ask for next; doubles while filters skip rows
    rows: deque[tuple[tuple[int, int], str, LedgerRow]] = dataclasses.field(default_factory=deque)
    done: bool = False


def _matches(row: LedgerRow, q: LedgerQuery) -> bool:
    return (
        (q.model is None or row.model == q.model)
        and (q.status is None or row.status == q.status)
        and (q.since_ms is None or row.ts_ms >= q.since_ms)
        and (q.until_ms is None or row.ts_ms < q.until_ms)
    )


# -- small conversions ---------------------------------------------------------------------
def _opt(value: int | None) -> str:
    """An optional limit as a script argument: '' means none."""
    return "" if value is None else str(value)


def _budget_args(b: BudgetLimits) -> list[str]:
    return [_opt(b.daily), _opt(b.monthly), _opt(b.total)]


def _windows(b: BudgetLimits, now: int, spent: Sequence[Any], reserved: int) -> list[WindowState]:
    limits = (b.daily, b.monthly, b.total)
    return [
        WindowState(w, limit, int(s), reserved, resets_at(w, now))
        for w, limit, s in zip(WINDOWS, limits, spent, strict=True)
    ]


def _end_user_args(eu: EndUserTerms | None) -> list[Any]:
    """admit_v1's ARGV[18..25]: nothing but '' when there is no end user."""
    if eu is None:
        return [""]
    lim = eu.limits
    return [
        eu.id, _opt(lim.rpm), _opt(lim.tpm), _opt(lim.concurrent), *_budget_args(eu.budgets),
        "1" if eu.prepaid else "0",
    ]  # fmt: skip


def _end_user_state(budgets: BudgetLimits, now: int, r: Sequence[Any]) -> EndUserState:
    """From a script's six trailing values: spent x3, reserved, requests in flight, balance."""
    return EndUserState(_windows(budgets, now, r[0:3], int(r[3])), int(r[5]), int(r[4]))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


_TLS_FILES = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")


def _tls_context(pool: BlockingConnectionPool) -> ssl.SSLContext | None:
    """The TLS context redis-py's own connections use for this URL (``rediss://``, with
    its ``ssl_ca_certs``, ``ssl_cert_reqs``, ``ssl_certfile``... parameters), or None
    for plain TCP: the pipelined client must trust exactly what redis-py trusts.
    ValueError, naming the parameter, for a query parameter the client does not know or
    a TLS setting or file it cannot use (a connection object opens nothing until used)."""
    kw = pool.connection_kwargs
    try:
        conn = pool.connection_class(**kw)
    except TypeError as exc:  # "... got an unexpected keyword argument 'x'"
        name = str(exc).rpartition(" ")[2].strip("'")
        raise ValueError(
            f"the state URL's query has a parameter {name!r} that the Redis client does not "
            "know (ssl_* parameters need rediss://)"
        ) from None
    except RedisError as exc:  # a TLS setting it refuses, such as ssl_cert_reqs
        raise ValueError(f"the TLS settings in the state URL cannot be used: {exc}") from None
    if not isinstance(conn, SSLConnection):
        return None
    for name in _TLS_FILES:
        path = kw.get(name)
        if path is not None:
            try:
                with open(path, "rb"):
                    pass
            except OSError as exc:
                raise ValueError(
                    f"{name} in the state URL names {path}, which cannot be read "
                    f"({exc.strerror or exc})"
                ) from None
    try:
        return conn.ssl_context.get()
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(f"the TLS settings in the state URL cannot be used: {exc}") from None


def check_url(url: str) -> None:
    """ValueError, saying what is wrong, if the gateway cannot use Redis state URL ``url``
    (for the config's validation: a misspelt query parameter, or a TLS file that is
    missing, fails at load, by name, rather than at the first connection)."""
    _tls_context(BlockingConnectionPool.from_url(url))  # a pool opens nothing until used


def _tenant_of(key: str) -> str | None:
    """The tenant whose slot holds cache key ``key`` ('<scope>:<hex>'), or None for a
    scope that is no tenant ('*shared': no tenant name starts with '*')."""
    scope = key.rpartition(":")[0]
    return None if not scope or scope.startswith("*") else scope


def _admit_result(a: Admission, r: list[Any]) -> AdmitResult:
    """admit_v1's reply as an AdmitResult."""
    ok, granted, now = bool(r[0]), int(r[1]), int(r[2])
    by, window = _text(r[3]), _text(r[4])
    return AdmitResult(
        ok=ok,
        granted=granted,
        windows=_windows(a.budgets, now, r[6:9], int(r[9])),
        rate=rate_state(
            a,
            now,
            int(r[10]),
            int(r[11]),
            int(r[12]),
            KeyCounts(int(r[10]), int(r[13]), int(r[14])) if a.key_limits is not None else None,
        ),
        now_ms=now,
        rejected_by=by or None,  # type: ignore[arg-type]
        window=window or None,
        retry_after_ms=int(r[5]),
        end_user=None if a.end_user is None else _end_user_state(a.end_user.budgets, now, r[15:21]),
    )


class RedisState(StateBackend):
    """State shared by every gateway process through one Redis (7.0 or newer).

    ``clock``: None in production (the scripts read Redis ``TIME``, one clock for all
    processes); tests pass a ``ManualClock``, whose ``now_ms()`` goes to the scripts
    instead (it must not be 0, which means "use TIME"). ``prefix`` starts every key."""

    name = "redis"

    def __init__(self, url: str, *, clock: Clock | None = None, prefix: str = "gw") -> None:
        self.clock = clock
        self.prefix = prefix
        # No automatic retries: a script that timed out may still have run, and running
        # settle twice would charge twice. The caller sees StateUnavailable instead.
        # A bounded pool: a burst of requests waits for a connection rather than opening
        # thousands. Query parameters of the URL (max_connections=, socket_timeout=...)
        # override these defaults.
        pool = BlockingConnectionPool.from_url(
            url,
            decode_responses=False,
            retry=Retry(NoBackoff(), 0),
            max_connections=DEFAULT_MAX_CONNECTIONS,
            timeout=5,
            socket_connect_timeout=5,
            socket_timeout=5,
            health_check_interval=30,
        )
        self._redis: Redis = Redis.from_pool(pool)
        kw = pool.connection_kwargs
        self._where = (
            f"unix:{kw['path']}" if "path" in kw else f"{kw.get('host')}:{kw.get('port')}"
        ) + f"/{kw.get('db', 0)}"
        self._scripts: dict[str, AsyncScript] = {
            name: self._redis.register_script(lua_source(name)) for name in SCRIPTS
        }
        self._shas = {name: (str(s.sha), lua_source(name)) for name, s in self._scripts.items()}
        # The scripts every request runs go through a lean pipelining client; redis-py
        # (above) does everything else. Both wait for a reply up to the URL's
        # socket_timeout (5 s unless it says otherwise).
        idle = kw.get("health_check_interval")
        self._fast = RespClient(
            dict(kw),
            tls=_tls_context(pool),
            timeout=float(kw.get("socket_timeout") or 5.0),
            idle_limit=float(idle) if idle else None,  # 0: connections are never replaced
        )
        self._ledger_tenants: set[str] = set()  # added to the tenants set by this process
        # Per tenant: its budget, leases, lease, rl and ledger keys, made once (each request
        # needs four or five). Tenants are the policy's; operators' queries may name others,
        # so the map is emptied if it ever grows past _TENANT_KEYS_MAX.
        self._tenant_keys: dict[str, tuple[str, ...]] = {}

    # -- plumbing ----------------------------------------------------------------------
    def _key(self, kind: str, scope: str | None = None, suffix: str | None = None) -> str:
        return redis_key(self.prefix, kind, scope, suffix)

    def _keys_of(self, tenant: str) -> tuple[str, ...]:
        """The tenant's budget, leases, lease, rl and ledger keys."""
        keys = self._tenant_keys.get(tenant)
        if keys is None:
            if len(self._tenant_keys) >= _TENANT_KEYS_MAX:
                self._tenant_keys.clear()
            kinds = ("budget", "leases", "lease", "rl", "ledger")
            keys = self._tenant_keys[tenant] = tuple(self._key(k, tenant) for k in kinds)
        return keys

    def _money_keys(self, tenant: str) -> list[str]:
        return list(self._keys_of(tenant)[:4])

    def _end_user_keys(self, tenant: str, end_user: str) -> list[str]:
        """The end user's hash and ledger id list (lib_leases derives the same names)."""
        return [self._key("eu", tenant, end_user), self._key("eu-ledger", tenant, end_user)]

    def _scoped(self, kind: str, key: str) -> str:
        """A cache or flight key ('<tenant>:<hex>', or '*shared:<hex>'): a tenant's in
        the tenant's slot; another scope's with the whole key as its hash tag, spread
        over a Cluster's slots."""
        tenant = _tenant_of(key)
        if tenant is None:
            return self._key(kind, key)
        return self._key(kind, tenant, key[len(tenant) + 1 :])

    def _now_arg(self) -> str:
        return "0" if self.clock is None else str(self.clock.now_ms())

    def _local_now(self) -> int:
        return self.clock.now_ms() if self.clock is not None else time.time_ns() // 1_000_000

    def _unavailable(self, exc: RedisError, doing: str) -> StateUnavailable:
        """The one place where driver errors become StateUnavailable."""
        where = self._where
        if isinstance(exc, AuthenticationError):
            msg = (
                f"Redis at {where} refused the credentials while {doing} ({exc}): check the "
                "user name and password in the state URL"
            )
        elif isinstance(exc, BusyLoadingError):
            msg = f"Redis at {where} is still loading its data set; retry in a moment"
        elif "CERTIFICATE_VERIFY_FAILED" in str(exc):
            msg = (
                f"Redis at {where} presented a TLS certificate this host does not trust while "
                f"{doing} ({exc}): name its CA in the state URL, rediss://…?ssl_ca_certs=<file>"
            )
        elif isinstance(exc, ConnectionError | TimeoutError):
            msg = (
                f"Redis at {where} did not answer while {doing} ({type(exc).__name__}: {exc}): "
                "check that it is running and reachable from this host, and the state URL"
            )
        elif isinstance(exc, ResponseError) and str(exc).startswith("OOM"):
            msg = (
                f"Redis at {where} is out of memory while {doing}: raise maxmemory, or set "
                "maxmemory-policy volatile-lru so cache entries can be evicted"
            )
        elif isinstance(exc, ResponseError) and str(exc).startswith("READONLY"):
            msg = f"Redis at {where} is a read-only replica: point the state URL at the primary"
        elif isinstance(exc, ResponseError) and str(exc).startswith("NOPERM"):
            msg = (
                f"the Redis user may not do this at {where} while {doing} ({exc}): it needs "
                f"scripting, stream, hash, zset and string commands on keys {self.prefix}:*"
            )
        elif isinstance(exc, ResponseError):
            msg = (
                f"Redis at {where} refused {doing}: {exc}. The gateway needs Redis "
                f"{'.'.join(map(str, MIN_VERSION))} or newer"
            )
        else:
            msg = f"Redis at {where} failed while {doing}: {type(exc).__name__}: {exc}"
        return StateUnavailable(msg)

    async def _run(self, doing: str, call: Awaitable[T]) -> T:
        try:
            return await call
        except RedisError as exc:
            raise self._unavailable(exc, doing) from exc

    async def _script(self, name: str, keys: list[str], args: list[Any]) -> Any:
        # _run() written out: every request runs two or four of these.
        sha, source = self._shas[name]
        try:
            return await self._fast.evalsha(sha, source, keys, args)
        except RedisError as exc:
            raise self._unavailable(exc, f"running {name}") from exc

    async def _note_ledger(self, tenant: str) -> None:
        """Add ``tenant`` to the tenants set (once per process) before its first row, so
        ``ledger()`` across tenants finds its stream. Not done by the scripts: under Redis
        Cluster a script may only touch its own tenant's slot."""
        if tenant not in self._ledger_tenants:
            await self._run("noting a tenant", self._redis.sadd(self._key("tenants"), tenant))
            self._ledger_tenants.add(tenant)

    # -- life cycle ----------------------------------------------------------------------
    async def start(self) -> None:
        """Check the server, load every script (a broken one fails here, not on the first
        request) and warn if the eviction policy could evict money."""
        await self.ping()
        try:
            info: dict[str, Any] = await self._redis.info("server")
        except ResponseError:
            info = {}  # INFO disabled or not allowed: the first script will tell
        except RedisError as exc:
            raise self._unavailable(exc, "reading INFO") from exc
        version = _text(info.get("redis_version", ""))
        parts = tuple(int(p) for p in re.findall(r"\d+", version)[:2])
        if parts and parts < MIN_VERSION:
            raise StateUnavailable(
                f"Redis at {self._where} is version {version}; the gateway needs "
                f"{'.'.join(map(str, MIN_VERSION))} or newer"
            )
        for name, script in self._scripts.items():
            await self._run(f"loading {name}", self._redis.script_load(script.script))
        await self._check_eviction()

    async def _check_eviction(self) -> None:
        try:
            cfg: dict[Any, Any] = await self._redis.config_get("maxmemory-policy")
        except ResponseError:
            log.info("CONFIG GET is not allowed on Redis at %s: maxmemory-policy not checked",
                     self._where)  # fmt: skip
            return
        except RedisError as exc:
            raise self._unavailable(exc, "reading maxmemory-policy") from exc
        policy = next((_text(v) for v in cfg.values()), "")
        if policy.startswith("allkeys-"):
            log.warning(
                "Redis at %s has maxmemory-policy %s: under memory pressure it may evict "
                "budget, spend, rate-limit and ledger keys. Use volatile-lru, volatile-ttl or "
                "noeviction (only cache and idempotency keys carry a TTL).",
                self._where,
                policy,
            )

    async def close(self) -> None:
        self._fast.close()
        await self._redis.aclose()

    async def ping(self) -> None:
        await self._run("answering PING", self._redis.ping())

    # -- money and limits ------------------------------------------------------------------
    async def admit(self, a: Admission) -> AdmitResult:
        keys, args = self._admit_call(a)
        return _admit_result(a, await self._script("admit_v1", keys, args))

    def _admit_call(self, a: Admission) -> tuple[list[str], list[Any]]:
        """admit_v1's keys and arguments for ``a``."""
        lim, klim = a.limits, a.key_limits
        key = a.key if klim is not None else ""
        keys = self._money_keys(a.tenant)
        if a.end_user is not None:
            keys.append(self._end_user_keys(a.tenant, a.end_user.id)[0])
        args = [
            self._now_arg(), a.reservation_id, a.amount, a.tokens, a.lease_ms,
            _opt(a.min_amount), "1" if a.count_request else "0",
            _opt(lim.rpm), _opt(lim.tpm), _opt(lim.concurrent), *_budget_args(a.budgets),
            key, *((_opt(klim.rpm), _opt(klim.tpm), _opt(klim.concurrent)) if klim else
                   ("", "", "")),
            *_end_user_args(a.end_user),
        ]  # fmt: skip
        return keys, args

    async def settle(self, s: Settlement) -> SettleResult:
        if s.tenant not in self._ledger_tenants:
            await self._note_ledger(s.tenant)
        keys = list(self._keys_of(s.tenant))
        eu = s.end_user
        if eu is not None:
            keys += self._end_user_keys(s.tenant, eu.id)
            eu_args = [eu.id, *_budget_args(eu.budgets), "1" if eu.prepaid else "0"]
        else:
            eu_args = ["", "", "", "", "0"]
        r = await self._script(
            "settle_v1",
            keys,
            [
                self._now_arg(), s.reservation_id, s.charge, s.tokens_delta,
                *_budget_args(s.budgets), *eu_args, *encode_row(s.row, money=False),
            ],
        )  # fmt: skip
        charged, now = int(r[0]), int(r[2])
        s.row.cost, s.row.overrun, s.row.credit = charged, int(r[1]), int(r[8])
        return SettleResult(
            charged,
            _windows(s.budgets, now, r[3:6], int(r[6])),
            None if eu is None else _end_user_state(eu.budgets, now, r[9:15]),
        )

    async def record(self, row: LedgerRow) -> None:
        await self._note_ledger(row.tenant)
        keys = [self._keys_of(row.tenant)[4]]
        if row.end_user:
            keys.append(self._end_user_keys(row.tenant, row.end_user)[1])
        await self._script("record_v1", keys, [self._now_arg(), *encode_row(row)])

    async def extend(self, tenant: str, reservation_ids: list[str], lease_ms: int) -> None:
        if reservation_ids:
            keys = self._money_keys(tenant)
            await self._script("extend_v1", keys, [self._now_arg(), lease_ms, *reservation_ids])

    async def usage(self, tenant: str, budgets: BudgetLimits) -> list[WindowState]:
        r = await self._script("usage_v1", self._money_keys(tenant), [self._now_arg()])
        return _windows(budgets, int(r[0]), r[1:4], int(r[4]))

    # -- end users ---------------------------------------------------------------------
    async def end_user_usage(self, tenant: str, terms: EndUserTerms) -> EndUserState:
        r = await self._script(
            "end_user_usage_v1",
            [*self._money_keys(tenant), self._end_user_keys(tenant, terms.id)[0]],
            [self._now_arg()],
        )
        return _end_user_state(terms.budgets, int(r[0]), r[1:7])

    async def top_up(self, tenant: str, key: str, row: LedgerRow) -> TopUp:
        if row.credit <= 0 or not row.end_user:
            raise ValueError("a top-up needs an end user and a positive amount")
        await self._note_ledger(tenant)
        eu, eu_ledger = self._end_user_keys(tenant, row.end_user)
        r = await self._script(
            "top_up_v1",
            [eu, self._key("top-ups", tenant), self._key("ledger", tenant), eu_ledger],
            [self._now_arg(), key, row.end_user, row.credit, row.id, *encode_row(row)],
        )
        return TopUp(_text(r[0]), _text(r[1]), int(r[2]))  # type: ignore[arg-type]

    # -- the ledger ----------------------------------------------------------------------
    async def ledger(self, q: LedgerQuery) -> LedgerPage:
        """Newest first in the order rows were written; each tenant's rows live in its own
        stream, merged here. The cursor is a stream position, so pages stay consistent
        while rows are added."""
        if q.end_user is not None:
            return await self._end_user_ledger(q)
        if q.limit <= 0:
            return LedgerPage([], None)
        after = _decode_cursor(q.cursor) if q.cursor else None
        if q.tenant is not None:
            tenants = [q.tenant]
        else:
            members = await self._run("listing tenants", self._redis.smembers(self._key("tenants")))
            tenants = sorted(_text(m) for m in members)
        readers = []
        for t in tenants:
            end = "+"
            if after is not None:
                # Order is (entry id, tenant) descending: a tenant sorting before the
                # cursor's still owes its rows at the cursor's own entry id.
                end = after[0] if t < after[1] else "(" + after[0]
            batch = min(q.limit + 1, _LEDGER_BATCH_MAX)
            readers.append(_Reader(t, self._key("ledger", t), end, batch))
        # Rows at or after since_ms were written at or after since_ms (less clock skew).
        floor = "-" if q.since_ms is None else str(max(q.since_ms - LEDGER_SKEW_MS, 0))

        async def first_batches() -> list[Any]:
            async with self._redis.pipeline(transaction=False) as p:
                for r in readers:
                    p.xrevrange(r.key, r.end, floor, count=r.batch)
                return await p.execute()

        async def refill(r: _Reader) -> None:
            while not r.rows and not r.done:
                entries: Any = await self._run(
                    "reading the ledger", self._redis.xrevrange(r.key, r.end, floor, count=r.batch)
                )
                take(r, entries)

        def take(r: _Reader, entries: list[Any]) -> None:
            for entry_id, fields in entries:
                r.end = "(" + entry_id.decode()
                row = decode_row(fields)
                if _matches(row, q):
                    r.rows.append((_entry_pos(entry_id), entry_id.decode(), row))
            r.done = len(entries) < r.batch
            r.batch = min(r.batch * 2, _LEDGER_BATCH_MAX)

        for r, entries in zip(readers, await self._run("reading the ledger", first_batches()),
                              strict=True):  # fmt: skip
            take(r, entries)
        heap: list[tuple[int, int, int]] = []

        def push(i: int) -> None:
            (ms, seq), _, _ = readers[i].rows[0]
            heapq.heappush(heap, (-ms, -seq, -i))  # newest first, then tenant descending

        for i, r in enumerate(readers):
            await refill(r)
            if r.rows:
                push(i)
        out: list[tuple[str, str, LedgerRow]] = []
        while heap and len(out) <= q.limit:
            i = -heapq.heappop(heap)[2]
            r = readers[i]
            _, entry_id, row = r.rows.popleft()
            out.append((entry_id, r.tenant, row))
            await refill(r)
            if r.rows:
                push(i)
        more = len(out) > q.limit
        out = out[: q.limit]
        cursor = _encode_cursor(out[-1][0], out[-1][1]) if more else None
        return LedgerPage([row for _, _, row in out], cursor)

    async def _end_user_ledger(self, q: LedgerQuery) -> LedgerPage:
        """An end user's rows, newest first: its list holds the ids of its entries in the
        tenant's stream, oldest first and only appended to, so a position in it is a
        stable cursor. Only ``limit`` and ``cursor`` apply (no other filter)."""
        if q.tenant is None or q.end_user is None:
            raise ValueError("an end user's ledger needs its tenant")
        ids_key = self._end_user_keys(q.tenant, q.end_user)[1]
        if q.cursor:
            try:
                top = int(base64.urlsafe_b64decode(q.cursor.encode()).decode().removeprefix("eu "))
            except (ValueError, binascii.Error, UnicodeError):
                raise ValueError("invalid ledger cursor") from None
        else:
            top = int(await self._run("reading the ledger", self._redis.llen(ids_key))) - 1
        if top < 0 or q.limit <= 0:
            return LedgerPage([], None)
        low = max(top - q.limit + 1, 0)
        ids: list[Any] = await self._run(
            "reading the ledger", self._redis.lrange(ids_key, low, top)
        )
        stream = self._key("ledger", q.tenant)
        async with self._redis.pipeline(transaction=False) as p:
            for entry_id in reversed(ids):
                p.xrange(stream, entry_id, entry_id, count=1)
            found = await self._run("reading the ledger", p.execute())
        rows = [decode_row(entries[0][1]) for entries in found if entries]
        cursor = None
        if low > 0:
            cursor = base64.urlsafe_b64encode(f"eu {low - 1}".encode()).decode()
        return LedgerPage(rows, cursor)

    # -- idempotency -------------------------------------------------------------------
    async def idem_begin(self, tenant: str, key: str, fingerprint: str, lease_ms: int) -> IdemBegin:
        r = await self._script(
            "idem_begin_v1",
            [self._key("idem", tenant, key)],
            [self._now_arg(), fingerprint, lease_ms],
        )
        state = _text(r[0])
        if state == "done":
            return IdemBegin("done", bytes(r[1]))
        if state in ("new", "inflight", "mismatch"):
            return IdemBegin(state)  # type: ignore[arg-type]
        raise StateUnavailable(f"idem_begin_v1 answered {state!r}: the scripts are broken")

    async def idem_finish(
        self, tenant: str, key: str, fingerprint: str, record: bytes, ttl_ms: int
    ) -> None:
        await self._script(
            "idem_finish_v1",
            [self._key("idem", tenant, key)],
            [self._now_arg(), record, ttl_ms, fingerprint],
        )

    async def idem_abandon(self, tenant: str, key: str) -> None:
        await self._script("idem_abandon_v1", [self._key("idem", tenant, key)], [])

    # -- cache -------------------------------------------------------------------------
    # Entries carry their expiry in front of the value: the TTL removes them, and an
    # injected clock is obeyed too.
    async def cache_get(self, key: str) -> bytes | None:
        raw = await self._run("reading the cache", self._redis.get(self._scoped("cache", key)))
        if not isinstance(raw, bytes):
            return None
        expires, _, value = raw.partition(b":")
        if self.clock is not None and int(expires) <= self.clock.now_ms():
            return None
        return value

    async def cache_put(self, key: str, value: bytes, ttl_ms: int) -> None:
        if ttl_ms <= 0:
            return
        expires = self._local_now() + ttl_ms
        await self._run(
            "writing the cache",
            self._redis.set(self._scoped("cache", key), b"%d:%b" % (expires, value), px=ttl_ms),
        )

    async def flight_begin(self, key: str, lease_ms: int) -> bool:
        r = await self._script(
            "flight_begin_v1", [self._scoped("flight", key)], [self._now_arg(), lease_ms]
        )
        return bool(r)

    async def cache_lookup(self, key: str, lease_ms: int) -> tuple[bytes | None, bool]:
        r = await self._script(
            "cache_lookup_v1",
            [self._scoped("cache", key), self._scoped("flight", key)],
            [self._now_arg(), lease_ms],
        )
        if int(r[0]):
            return bytes(r[1]), False
        return None, bool(int(r[1]))

    async def cache_lookup_admit(
        self, key: str, lease_ms: int, a: Admission
    ) -> tuple[bytes | None, bool, AdmitResult | None]:
        if _tenant_of(key) != a.tenant:  # another slot: two round trips
            return await super().cache_lookup_admit(key, lease_ms, a)
        keys, args = self._admit_call(a)
        r = await self._script(
            "cache_admit_v1",
            [self._scoped("cache", key), self._scoped("flight", key), *keys],
            [lease_ms, *args],
        )
        if int(r[0]):
            return bytes(r[1]), False, None
        if not int(r[1]):
            return None, False, None
        return None, True, _admit_result(a, r[2])

    async def cache_store(
        self, key: str, value: bytes | None, ttl_ms: int, end_flight: bool
    ) -> None:
        if value is None and not end_flight:
            return
        await self._script(
            "cache_store_v1",
            [self._scoped("cache", key), self._scoped("flight", key)],
            [
                self._now_arg(),
                max(ttl_ms, 0) if value is not None else 0,
                value if value is not None else b"",
                "1" if end_flight else "0",
            ],
        )

    async def flight_end(self, key: str) -> None:
        await self._run("ending a single flight", self._redis.delete(self._scoped("flight", key)))
