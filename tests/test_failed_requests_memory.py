"""A failed request leaves no reference cycle behind.

The gateway raises CPython's collection thresholds (``gateway/gctune.py``) because a
request's objects are freed by reference counting the moment it ends. An error kept on
the request's context with its traceback would make a cycle per failed request (the
traceback's frames hold the context), which only the collector frees: a storm of
refused requests, or an upstream outage, would then grow RSS until a full collection
stops the event loop. Here every kind of failure runs with the collector saving what it
finds, and no request context, nor any gateway error, may be among it."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterator

import httpx
import openai
import pytest
from fake_upstream import FakeUpstream
from servers.configs import directive, gateway_config, policy, tenant
from servers.gateway import Gateway

from gateway.errors import GatewayError
from gateway.pipeline.context import RequestContext

MSG = [{"role": "user", "content": "Write a short poem"}]


@pytest.fixture
def gw(make_gateway: Callable[..., Gateway], fake: FakeUpstream) -> Gateway:
    cfg = gateway_config(fake.base_url)
    cfg["models"]["premium"]["fallbacks"] = ["cheap"]
    cfg["providers"]["fake"]["retries"] = {
        "max_attempts": 2,
        "backoff_base": 0.01,
        "backoff_max": 0.02,
    }
    limited = tenant("key-2", limits={"rpm": 1})
    return make_gateway(cfg, {"p": policy({"t1": tenant("key-1"), "t2": limited})})


@pytest.fixture
def saved_garbage() -> Iterator[list[object]]:
    """What the collector finds unreachable from here on, kept instead of freed."""
    gc.collect()
    gc.garbage.clear()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        yield gc.garbage
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.collect()


def _contexts_of(gw: Gateway, garbage: list[object]) -> list[RequestContext]:
    """The request contexts of ``gw`` in ``garbage`` (not those of an earlier test's
    gateway, which may become garbage late)."""
    return [o for o in garbage if isinstance(o, RequestContext) and o.runtime is gw.runtime]


def _failures(gw: Gateway, fake: FakeUpstream) -> list[int]:
    """One request of each kind of failure; their statuses."""
    statuses: list[int] = []
    with httpx.Client(base_url=gw.url, timeout=30) as http:

        def post(key: str, **body: object) -> None:
            r = http.post(
                "/v1/chat/completions",
                json={"model": "premium", "messages": MSG, **body},
                headers={"Authorization": f"Bearer {key}"},
            )
            statuses.append(r.status_code)

        post("key-unknown")  # 401
        post("key-2")
        post("key-2")  # 429: over the tenant's rpm
        post("key-1", max_tokens=-1)  # 400 from the gateway
        fake.script("fake-premium", [{"status": 400, "error": {"message": "bad schema"}}])
        post("key-1")  # 400 from the upstream
        fake.script("fake-premium", [{"status": 500}] * 2)
        fake.script("fake-cheap", [{"status": 503}] * 2)
        post("key-1")  # 5xx after retries and the fallback
    client = gw.client("key-1")
    fake.script("fake-premium", [{"disconnect_after": 4, "tokens": 20}])
    with pytest.raises(openai.APIError):  # cut after the first byte: an error event
        list(client.chat.completions.create(model="premium", messages=MSG, stream=True))
    return statuses


def test_failed_requests_are_freed_without_the_collector(
    gw: Gateway, fake: FakeUpstream, saved_garbage: list[object]
) -> None:
    statuses = _failures(gw, fake)
    assert statuses[0] == 401 and statuses[2] == 429
    assert statuses[3] == 400 and statuses[4] == 400 and statuses[5] >= 500
    time.sleep(0.3)  # each request settles and logs after its response
    gc.collect()
    contexts = _contexts_of(gw, saved_garbage)
    errors = [o for o in saved_garbage if isinstance(o, GatewayError)]
    assert not contexts, f"{len(contexts)} request contexts were left in reference cycles"
    assert not errors, f"{len(errors)} errors in reference cycles: {errors[:3]}"


def test_completed_requests_are_freed_without_the_collector(
    gw: Gateway, fake: FakeUpstream, saved_garbage: list[object]
) -> None:
    client = gw.client("key-1")
    for _ in range(2):  # the second pair is answered from the cache
        client.chat.completions.create(model="cheap", messages=MSG, temperature=0)
        stream = client.chat.completions.create(
            model="cheap", messages=MSG, temperature=0, stream=True, max_tokens=50
        )
        assert list(stream)
    assert fake.calls() == 2
    time.sleep(0.3)
    gc.collect()
    contexts = _contexts_of(gw, saved_garbage)
    assert not contexts, f"{len(contexts)} request contexts were left in reference cycles"


def test_requests_whose_client_left_are_freed_without_the_collector(
    gw: Gateway, fake: FakeUpstream, saved_garbage: list[object]
) -> None:
    auth = {"Authorization": "Bearer key-1"}
    with httpx.Client(base_url=gw.url, timeout=0.6) as http:
        with pytest.raises(httpx.ReadTimeout):  # gone while the upstream thinks
            http.post(
                "/v1/chat/completions",
                json={"model": "cheap", "messages": MSG, **directive(delay=3)},
                headers=auth,
            )
        body = {"model": "cheap", "messages": MSG, "stream": True}
        body |= directive(tokens=30, chunk_delay=0.2)
        with http.stream("POST", "/v1/chat/completions", json=body, headers=auth) as r:
            assert next(r.iter_bytes())  # gone after the first chunk
    deadline = time.monotonic() + 10
    rows: list[object] = []
    while len(rows) < 2 and time.monotonic() < deadline:  # both settled
        time.sleep(0.1)
        rows = httpx.get(
            gw.url + "/admin/ledger", headers={"Authorization": "Bearer admin-key"}
        ).json()["data"]
    assert len(rows) == 2
    time.sleep(0.3)
    gc.collect()
    contexts = _contexts_of(gw, saved_garbage)
    assert not contexts, f"{len(contexts)} request contexts were left in reference cycles"
