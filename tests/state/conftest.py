from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from state_support import START_MS, close_backend, needs_redis, open_backend, redis_unreachable

from gateway.clock import ManualClock
from gateway.state.base import StateBackend
from gateway.state.redis import RedisState


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START_MS)


@pytest.fixture(params=["embedded", pytest.param("redis", marks=needs_redis)])
async def backend(
    request: pytest.FixtureRequest, clock: ManualClock
) -> AsyncIterator[StateBackend]:
    """A started backend of each kind on ``clock``; Redis keys are deleted afterwards."""
    b = await open_backend(request.param, clock)
    try:
        yield b
    finally:
        await close_backend(b)


@pytest.fixture
async def redis_backend(clock: ManualClock) -> AsyncIterator[RedisState]:
    """For tests of what only the Redis backend has (keys, TTLs, Lua)."""
    reason = redis_unreachable()
    if reason is not None:
        pytest.skip(reason)
    b = await open_backend("redis", clock)
    assert isinstance(b, RedisState)
    try:
        yield b
    finally:
        await close_backend(b)
