"""Shared fixtures: the offline tiktoken files, the fake upstream, the gateway."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

_TIKTOKEN = Path(__file__).resolve().parents[2] / "shared" / "tiktoken"
if "TIKTOKEN_CACHE_DIR" not in os.environ and _TIKTOKEN.is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(_TIKTOKEN)

from fake_upstream import FakeUpstream  # noqa: E402
from servers.configs import PROVIDER_KEY, gateway_config, policy, tenant  # noqa: E402
from servers.gateway import Gateway, start_in_thread, write_config  # noqa: E402

REDIS_URL = os.environ.get("GATEWAY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture(scope="session")
def fake_server() -> Iterator[FakeUpstream]:
    with FakeUpstream.in_thread(api_key=PROVIDER_KEY) as fake:
        yield fake


@pytest.fixture
def fake(fake_server: FakeUpstream) -> FakeUpstream:
    """The fake upstream, reset for this test."""
    fake_server.reset()
    return fake_server


@pytest.fixture
def make_gateway(tmp_path: Path) -> Iterator[Callable[..., Gateway]]:
    """Start gateways with a given config and policy; all stopped at the end."""
    started: list[Gateway] = []

    def make(
        config: dict[str, Any] | None = None,
        policies: dict[str, dict[str, Any]] | None = None,
        **kw: Any,
    ) -> Gateway:
        directory = tmp_path / f"gw{len(started)}"
        path = write_config(
            directory,
            config or gateway_config(),
            policies or {"tenants": policy({"t1": tenant("key-1")})},
        )
        gw = start_in_thread(path, **kw)
        started.append(gw)
        return gw

    yield make
    for gw in started:
        gw.stop()


def _redis_reachable() -> bool:
    import redis

    try:
        client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
        client.ping()
        client.close()
    except redis.RedisError:
        return False
    return True


@pytest.fixture
def redis_state() -> Iterator[dict[str, Any]]:
    """Config for state in Redis under a key prefix of this test's own, deleted after."""
    import redis

    if not _redis_reachable():
        pytest.skip(f"Redis is not reachable at {REDIS_URL} (set GATEWAY_TEST_REDIS_URL)")
    prefix = f"gwtest-{uuid.uuid4().hex[:12]}"
    yield {"state": REDIS_URL, "redis_key_prefix": prefix}
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture(params=["embedded", "redis"])
def state(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Run the test on each state backend: the same suite for both."""
    if request.param == "embedded":
        return {"state": "memory://"}
    cfg: dict[str, Any] = request.getfixturevalue("redis_state")
    return cfg
