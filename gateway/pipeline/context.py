"""What one request carries through the pipeline, and where its response goes."""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from ..config.catalog import Model
from ..config.policy import Limits
from ..config.snapshot import Policy, Tenant
from ..errors import GatewayError
from ..state.base import AdmitResult, EndUserState, EndUserTerms, LedgerRow, WindowState
from ..tokens import PromptInfo
from .streamed import Streamed

if TYPE_CHECKING:
    from ..runtime import Runtime

Header = tuple[bytes, bytes]
T = TypeVar("T")


_PROCESS = os.urandom(4).hex()  # new in every process (workers are spawned, not forked)
_SEQUENCE = itertools.count()


def new_request_id(now_ms: int) -> str:
    """Time-ordered and unique: 12 hex digits of milliseconds, 8 random per process, then
    a per-process sequence number (no system call per request, unlike os.urandom)."""
    return f"req_{now_ms:012x}{_PROCESS}{next(_SEQUENCE) & 0xFFFFFF:06x}"


class Responder(Protocol):
    """Where a response is written: the HTTP connection (or a recorder for replays)."""

    disconnected: bool  # the client went away
    finished: bool  # the response's last byte has been handed to the server
    # True only while the request merely waits (on the upstream, a queue, a timer): the
    # one time a client's disconnect cancels it. See ``interruptible``.
    interruptible: bool

    async def send_json(self, status: int, headers: list[Header], body: bytes) -> None: ...

    async def start_stream(self, status: int, headers: list[Header]) -> None: ...

    async def send_chunk(self, data: bytes) -> None: ...

    def can_write_now(self) -> bool:
        """Whether ``write_now`` works: a started stream whose client takes more."""

    def write_now(self, data: bytes) -> bool:
        """``send_chunk`` without awaiting, for a synchronous callback (only after
        ``can_write_now``; dropped if the client went away meanwhile). True while the
        client takes more; after False, write with ``send_chunk`` again."""

    async def end_stream(self, last: bytes = b"") -> None:
        """Send ``last`` (if any) and end the stream, in one write."""


async def interruptible(out: Responder, aw: Awaitable[T]) -> T:
    """Await something that only waits (the upstream, a capacity queue, a back-off): if
    the client disconnects meanwhile, the request is cancelled, and with it the upstream
    call. State calls (admit, settle, ...) are never awaited this way, so a disconnect can
    never cut one in half and leave a reservation or a ledger row unaccounted for."""
    if out.disconnected:
        raise asyncio.CancelledError("the client disconnected")
    out.interruptible = True
    try:
        return await aw
    finally:
        out.interruptible = False


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    source: str = "upstream"  # "upstream" | "counted"


@dataclass(slots=True)
class RouteDecision:
    model: Model
    chain: tuple[Model, ...]
    reason: str
    label: str  # bounded value for metric labels (route name/rule, "direct", ...)


@dataclass(slots=True)
class Attempt:
    model: str
    provider: str
    outcome: str  # "ok" or an error code
    status: int
    ms: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "provider": self.provider,
            "outcome": self.outcome,
            "status": self.status,
            "ms": self.ms,
        }


@dataclass(slots=True)
class RequestContext:
    runtime: Runtime
    endpoint: str  # "chat" | "embeddings"
    upstream_path: str  # "/chat/completions" | "/embeddings"
    request_id: str
    started: float  # perf_counter at arrival
    started_ms: int  # wall clock at arrival
    policy: Policy
    headers: dict[bytes, bytes]
    read_body: Callable[[], Awaitable[bytes]] | None = None
    out: Responder | None = None  # where the response goes (set by the pipeline)
    raw: bytes = b""
    body: dict[str, Any] = field(default_factory=dict)

    tenant: Tenant | None = None
    key_fp: str = ""
    key_limits: Limits | None = None  # the key's own rate limits, if it has any
    requested_model: str = ""
    stream: bool = False
    include_usage: bool = False
    requested_max: int | None = None  # max output tokens the client asked for, per choice
    end_user: str = ""
    end_user_terms: EndUserTerms | None = None  # set at admission when end_user is
    end_user_state: EndUserState | None = None  # after admission, then after settlement
    task: str | None = None

    prompt: PromptInfo | None = None
    route: RouteDecision | None = None
    model: Model | None = None  # the model of the current attempt

    reservation_id: str = ""
    worst_case: int = 0
    admission: AdmitResult | None = None
    admitted_tokens: int = 0
    clamped_to: int | None = None
    # The budget window that rejected the request ('daily'..., 'end_user_daily'...,
    # 'end_user_balance'), or the rate limit ('rpm', 'key_tpm', 'end_user_concurrent'...).
    reject_window: str | None = None
    reject_limit: str | None = None

    cache_key: str | None = None
    cache_status: str = "off"
    flight_leader: bool = False
    idem_key: str | None = None
    idem_fingerprint: str = ""
    idem_claimed: bool = False
    idem_tee: Any = None  # the Tee recording the response for replay
    cache_store: bool = True  # False with Cache-Control: no-store
    replayed: bool = False

    attempts: list[Attempt] = field(default_factory=list)
    usage: Usage | None = None
    usage_raw: dict[str, Any] | None = None  # the upstream's usage object, as sent
    # the relayed stream, for counting (no usage from upstream) and for the cache
    streamed: Streamed = field(default_factory=Streamed)
    first_byte_sent: bool = False
    completed: bool = False  # the full response reached the responder
    client_gone: bool = False
    upstream_seconds: float = 0.0
    ttft: float | None = None

    hit_charge: int | None = None  # set when served from the cache
    saved: int = 0  # what a cache hit would have cost upstream
    charged: int = 0
    settled: bool = False
    finished: bool = False
    row: LedgerRow | None = None
    windows: list[WindowState] = field(default_factory=list)
    status: int = 200
    error: GatewayError | None = None
    response_body: bytes = b""  # non-stream body kept for idempotency and the cache

    def note_attempt(self, model: Model, outcome: str, status: int, t0: float) -> None:
        ms = int((time.perf_counter() - t0) * 1000)
        self.attempts.append(Attempt(model.name, model.provider, outcome, status, ms))

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    @property
    def tenant_name(self) -> str:
        return self.tenant.name if self.tenant else ""
