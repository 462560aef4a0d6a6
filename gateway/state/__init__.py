"""Shared state behind one interface; the backend is chosen by the ``state`` URL:
``sqlite:///path`` (embedded, durable), ``memory://`` (embedded, nothing on disk) or
``redis://host:port/db`` (several gateway processes)."""

from __future__ import annotations

from ..clock import SYSTEM_CLOCK, Clock
from ..config.deployment import GatewayConfig
from .base import (
    Admission,
    AdmitResult,
    IdemBegin,
    LedgerPage,
    LedgerQuery,
    LedgerRow,
    RateLimits,
    RateState,
    Settlement,
    SettleResult,
    StateBackend,
    StateUnavailable,
    WindowState,
)


def open_state(url: str, cfg: GatewayConfig, clock: Clock = SYSTEM_CLOCK) -> StateBackend:
    if url.startswith("sqlite://"):
        from .embedded import EmbeddedState

        # sqlite:///rel/path -> "rel/path" (from the working directory);
        # sqlite:////abs/path -> "/abs/path"
        path = url.removeprefix("sqlite://").removeprefix("/")
        return EmbeddedState(
            path, sync=cfg.ledger.sync, cache_bytes=cfg.cache.max_bytes, clock=clock
        )
    if url.startswith("memory://"):
        from .embedded import EmbeddedState

        return EmbeddedState(":memory:", cache_bytes=cfg.cache.max_bytes, clock=clock)
    if url.startswith(("redis://", "rediss://")):
        from .redis import RedisState

        redis_clock = None if clock is SYSTEM_CLOCK else clock
        return RedisState(url, clock=redis_clock, prefix=cfg.redis_key_prefix)
    raise ValueError(f"unsupported state URL {url!r}")


__all__ = [
    "Admission",
    "AdmitResult",
    "IdemBegin",
    "LedgerPage",
    "LedgerQuery",
    "LedgerRow",
    "RateLimits",
    "RateState",
    "SettleResult",
    "Settlement",
    "StateBackend",
    "StateUnavailable",
    "WindowState",
    "open_state",
]
