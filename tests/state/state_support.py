"""What the state tests share: both backends on a manual clock, Redis keys cleaned up."""

from __future__ import annotations

import functools
import os
import uuid
from datetime import UTC, datetime

import pytest
import redis
import redis.asyncio

from gateway.clock import ManualClock
from gateway.state.base import StateBackend
from gateway.state.embedded import EmbeddedState
from gateway.state.redis import RedisState

REDIS_URL = os.environ.get("GATEWAY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
BACKENDS = ("embedded", "redis")


def utc_ms(y: int, mo: int, d: int, h: int = 0, mi: int = 0, s: int = 0, ms: int = 0) -> int:
    return int(datetime(y, mo, d, h, mi, s, tzinfo=UTC).timestamp()) * 1000 + ms


START_MS = utc_ms(2026, 11, 26, 10, 0, 0)


@functools.cache
def redis_unreachable() -> str | None:
    """Why the test Redis cannot be used, or None if it can."""
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1, socket_timeout=1)
    try:
        client.ping()
    except redis.RedisError as exc:
        return f"Redis at {REDIS_URL} is not reachable ({exc}); set GATEWAY_TEST_REDIS_URL"
    finally:
        client.close()
    return None


needs_redis = [
    pytest.mark.redis,
    pytest.mark.skipif(redis_unreachable() is not None, reason=str(redis_unreachable())),
]


def new_prefix() -> str:
    return f"gwtest:{uuid.uuid4().hex}"


async def open_backend(kind: str, clock: ManualClock | None, prefix: str = "") -> StateBackend:
    backend: StateBackend
    if kind == "embedded":
        assert clock is not None
        backend = EmbeddedState(":memory:", clock=clock)
    else:
        backend = RedisState(REDIS_URL, clock=clock, prefix=prefix or new_prefix())
    await backend.start()
    return backend


async def delete_prefix(prefix: str) -> int:
    """Delete every key under ``prefix`` (never anything else on the shared server)."""
    assert prefix.startswith("gwtest:")
    client = redis.asyncio.Redis.from_url(REDIS_URL)
    try:
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*", count=1000)]
        if keys:
            await client.unlink(*keys)
        return len(keys)
    finally:
        await client.aclose()


async def close_backend(backend: StateBackend) -> None:
    await backend.close()
    if isinstance(backend, RedisState):
        await delete_prefix(backend.prefix)
