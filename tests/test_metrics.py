"""What /metrics says about requests: bounded labels without ids, cache hits only when
served, upstream attempts and errors, overhead without the upstream's time, the catalog;
and every exported metric is documented in the README."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fake_upstream import FakeUpstream
from hypothesis import given, settings
from hypothesis import strategies as st
from servers.configs import gateway_config, policy, tenant
from servers.gateway import Gateway
from servers.prometheus import samples, total

from gateway.clock import ManualClock

README = Path(__file__).resolve().parents[1] / "README.md"
MSG = [{"role": "user", "content": "hello there"}]
# Every label the gateway uses, each bounded by configuration (see README, "Metrics").
LABELS = {
    "tenant",
    "model",
    "provider",
    "route",
    "status_class",
    "cache",
    "kind",
    "window",
    "limit",
    "code",
    "from_model",
    "to_model",
    "result",
    "endpoint",
    "stream",
    "tier",
    "le",
    "generation",  # python_gc_*: 0, 1, 2
}


def metrics(gw: Gateway) -> str:
    with httpx.Client(base_url=gw.url, timeout=10) as http:
        return http.get("/metrics").text


def post(gw: Gateway, body: dict[str, Any], key: str = "key-1", **headers: str) -> httpx.Response:
    with httpx.Client(base_url=gw.url, timeout=30) as http:
        return http.post(
            "/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {key}", **headers},
        )


def config(fake: FakeUpstream, **retries: Any) -> dict[str, Any]:
    cfg = gateway_config(fake.base_url)
    cfg["providers"]["fake"]["retries"] = {"max_attempts": 2, **retries}
    cfg["models"]["premium"]["fallbacks"] = ["cheap"]
    return cfg


def test_labels_are_bounded_and_carry_no_ids(
    make_gateway: Callable[..., Gateway], fake: FakeUpstream
) -> None:
    gw = make_gateway(config(fake), {"p": policy({"t1": tenant("key-1", limits={"rpm": 5})})})
    ids: set[str] = {"key-1"}
    for i in range(7):
        r = post(
            gw,
            {"model": "cheap", "messages": MSG, "user": f"user-field-{i}", "temperature": 0},
            **{"x-gateway-end-user": f"end-user-{i}", "Idempotency-Key": f"idem-{i}"},
        )
        ids |= {r.headers["x-gateway-request-id"], f"end-user-{i}", f"user-field-{i}", f"idem-{i}"}
    post(gw, {"model": "cheap", "messages": MSG}, key="not-a-key")
    text = metrics(gw)
    values = {v for (_, labels) in samples(text) for (_, v) in labels}
    names = {k for (_, labels) in samples(text) for (k, _) in labels}
    assert names <= LABELS, names - LABELS
    assert not values & ids
    assert not [v for v in values if re.search(r"req_[0-9a-f]{6}|key|idem|user", v)]


def test_cache_hits_count_only_when_served(
    make_gateway: Callable[..., Gateway], fake: FakeUpstream
) -> None:
    # a fixed clock: the three requests must fall in one rate-limit minute
    gw = make_gateway(
        config(fake),
        {"p": policy({"t1": tenant("key-1", limits={"rpm": 2})})},
        clock=ManualClock(1_773_144_005_000),
    )
    body = {"model": "cheap", "messages": MSG, "temperature": 0}
    assert [post(gw, body).headers["x-gateway-cache"] for _ in range(2)] == ["miss", "hit"]
    assert post(gw, body).status_code == 429  # found in the cache, refused by the rate limit
    text = metrics(gw)
    assert total(text, "gateway_cache_hits_total") == 1
    first = total(text, "gateway_cost_usd_total")
    assert total(text, "gateway_cache_saved_usd_total") == first  # one hit saved one call
    assert total(text, "gateway_rate_limit_rejections_total", limit="rpm") == 1


def test_attempts_retries_fallbacks_and_overhead(
    make_gateway: Callable[..., Gateway], fake: FakeUpstream
) -> None:
    gw = make_gateway(config(fake), {"p": policy({"t1": tenant("key-1")})})
    # cheap: rate limited once (Retry-After: 1), then answers
    fake.script("fake-cheap", [{"status": 429, "retry_after": 1}])
    r = post(gw, {"model": "cheap", "messages": MSG})
    assert r.status_code == 200
    text = metrics(gw)
    assert total(text, "gateway_upstream_attempts_total", model="cheap") == 2
    assert total(text, "gateway_upstream_errors_total", code="upstream_rate_limited") == 1
    assert total(text, "gateway_retries_total", model="cheap") == 1
    # the second waiting on the upstream is not the gateway's overhead
    assert total(text, "gateway_request_duration_seconds_sum") >= 1
    assert total(text, "gateway_upstream_duration_seconds_sum") >= 1
    assert total(text, "gateway_overhead_seconds_sum") < 0.5
    # premium fails twice, falls back to cheap
    fake.script("fake-premium", [503, 503])
    assert post(gw, {"model": "premium", "messages": MSG}).status_code == 200
    text = metrics(gw)
    assert total(text, "gateway_upstream_attempts_total", model="premium") == 2
    assert total(text, "gateway_upstream_attempts_total", model="cheap") == 3
    assert total(text, "gateway_fallbacks_total", from_model="premium", to_model="cheap") == 1
    assert total(text, "gateway_upstream_errors_total", model="premium", code="upstream_error") == 2


async def test_capacity_queue_rejections_are_counted(
    make_gateway: Callable[..., Gateway], fake: FakeUpstream
) -> None:
    cfg = config(fake)
    cfg["providers"]["fake"].update({"rpm": 60, "burst_seconds": 1, "max_queue_wait": 0.3})
    gw = make_gateway(cfg, {"p": policy({"t1": tenant("key-1")})})
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
        rs = await asyncio.gather(
            *(
                http.post(
                    "/v1/chat/completions",
                    json={"model": "cheap", "messages": MSG},
                    headers={"Authorization": "Bearer key-1"},
                )
                for _ in range(3)
            )
        )
    refused = [r for r in rs if r.status_code == 429]
    assert refused and all(
        r.json()["error"]["code"] == "upstream_capacity_exhausted" for r in refused
    )
    text = metrics(gw)
    assert total(text, "gateway_upstream_queue_rejections_total", provider="fake") == len(refused)
    # refused before any call: not an upstream attempt
    assert total(text, "gateway_upstream_attempts_total") == 3 - len(refused)


def test_an_upstreams_own_error_code_does_not_become_a_label(
    make_gateway: Callable[..., Gateway], fake: FakeUpstream
) -> None:
    gw = make_gateway(config(fake), {"p": policy({"t1": tenant("key-1")})})
    for i in range(3):
        bad = {"status": 400, "error": {"message": "no", "code": f"weird_code_{i}"}}
        r = post(gw, {"model": "cheap", "messages": MSG, "metadata": {"fake": json.dumps(bad)}})
        assert r.status_code == 400 and r.json()["error"]["code"] == f"weird_code_{i}"
    text = metrics(gw)
    assert "weird_code" not in text
    assert total(text, "gateway_upstream_errors_total", code="upstream_rejected") == 3
    assert total(text, "gateway_requests_total", status_class="4xx") == 3


def test_catalog_and_reload_state_at_start(make_gateway: Callable[..., Gateway]) -> None:
    gw = make_gateway()
    found = {
        dict(labels)["model"]: dict(labels)
        for (name, labels), v in samples(metrics(gw)).items()
        if name == "gateway_model_info" and v == 1
    }
    assert found["mock-chat"] == {
        "model": "mock-chat",
        "provider": "mock",
        "tier": "cheap",
        "kind": "chat",
    }
    assert found["mock-embed"]["kind"] == "embedding"
    assert total(metrics(gw), "gateway_config_last_reload_successful") == 1


def test_every_metric_is_documented(
    make_gateway: Callable[..., Gateway], fake: FakeUpstream
) -> None:
    gw = make_gateway(config(fake))
    post(gw, {"model": "cheap", "messages": MSG})
    with httpx.Client(base_url=gw.url, timeout=10) as http:
        text = http.get("/metrics").text
    # (prometheus-client's *_created twins of counters and histograms are not separate)
    families = {
        n for n in re.findall(r"^# TYPE (gateway_\w+) ", text, re.M) if not n.endswith("_created")
    }
    readme = README.read_text()
    section = readme[readme.index("## Metrics") :]
    section = section[: section.index("\n## ", 1)]
    undocumented = []
    for name in sorted(families):
        counter = f"{name}_total"
        if f"`{name}`" not in section and f"`{counter}`" not in section:
            undocumented.append(name)
    assert not undocumented, undocumented


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a", "b"]),
            st.one_of(
                st.sampled_from([0.0, 0.005, 0.01, 0.25, 300.0, 1e9]),  # on a bound, past all
                st.floats(min_value=-1, max_value=400, allow_nan=False),
            ),
        ),
        max_size=30,
    )
)
def test_hot_path_children_count_as_the_library_does(
    observations: list[tuple[str, float]],
) -> None:
    """The wrapped children (``metrics._fast``) expose exactly what prometheus-client's
    own ``inc`` and ``observe`` give for the same observations."""
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    from gateway import metrics

    def registry(wrap: Callable[[Any], Any]) -> bytes:
        reg = CollectorRegistry()
        c = Counter("c_total", "c", ["l"], registry=reg)
        h = Histogram("h_seconds", "h", ["l"], registry=reg, buckets=metrics.LATENCY_BUCKETS)
        for label, amount in observations:
            wrap(h.labels(label)).observe(amount)
            wrap(c.labels(label)).inc(abs(amount))
            wrap(c.labels(label)).inc()
        lines = generate_latest(reg).splitlines()
        return b"\n".join(line for line in lines if b"_created" not in line)  # a timestamp

    assert registry(metrics._fast) == registry(lambda child: child)
    reg = CollectorRegistry()
    counter = metrics._fast(Counter("n_total", "n", ["l"], registry=reg).labels("a"))
    hist = metrics._fast(Histogram("m_seconds", "m", ["l"], registry=reg).labels("a"))
    assert isinstance(counter, metrics._CounterChild)  # wrapped: this prometheus-client
    assert isinstance(hist, metrics._HistogramChild)
    with pytest.raises(ValueError, match="non-negative"):
        counter.inc(-1)
