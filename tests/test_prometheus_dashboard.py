"""The shipped Grafana dashboard and alert rules against a real Prometheus.

A gateway (fake upstream behind it) serves a short mixed load in two phases while a real
Prometheus scrapes it every second. Then every query of every dashboard panel is run
through Prometheus' HTTP API, with the template variables filled in as Grafana would:
each must return data, and the spend panel must equal the ledger to the nano-dollar."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from fake_upstream import FakeUpstream
from servers.configs import gateway_config, policy, tenant
from servers.gateway import Gateway, start_in_thread, write_config
from servers.prometheus import PROMETHEUS, Prometheus, finite, running_prometheus

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "config" / "grafana" / "gateway-dashboard.json"
ALERTS = ROOT / "config" / "prometheus" / "alerts.yml"
ADMIN = {"Authorization": "Bearer admin-key"}
TENANTS = {
    "t1": tenant("key-1", budgets={"daily_usd": 50, "monthly_usd": 500}),
    "t2": tenant("key-2", budgets={"total_usd": "0.000001"}),  # too small for any request
    "t3": tenant("key-3", limits={"rpm": 1}),
}
# What Grafana substitutes: "All" of a multi-value variable is its allValue (.*).
GRAFANA_VARS = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "5m",
    "${datasource}": "prometheus",
}


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for p in board["panels"]:
        yield p
        yield from p.get("panels", [])


def exprs(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title + refId, expr) of every query in the dashboard."""
    return [
        (f"{p['title']} [{t['refId']}]", t["expr"])
        for p in panels(board)
        for t in p.get("targets", [])
    ]


def substitute(expr: str, tenant_value: str = ".*", model_value: str = ".*") -> str:
    for k, v in GRAFANA_VARS.items():
        expr = expr.replace(k, v)
    return expr.replace("$tenant", tenant_value).replace("$model", model_value)


# -- the dashboard file, without Prometheus ----------------------------------------------
def test_dashboard_is_importable_and_templated() -> None:
    board = dashboard()
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 30
    assert board["id"] is None  # Grafana assigns it on import
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name, source in (("tenant", "gateway_requests_total"), ("model", "gateway_model_info")):
        v = variables[name]
        assert v["type"] == "query" and v["multi"] and v["includeAll"]
        assert v["allValue"] == ".*"
        assert v["definition"] == f"label_values({source}, {name})"
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids))
    for p in panels(board):
        pos = p["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24 and pos["h"] > 0, p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"] == p["datasource"]
            assert "gateway_" in t["expr"]
    # every panel the issue asks for is there
    titles = " | ".join(p["title"].lower() for p in panels(board))
    for words in (
        "spend rate by tenant",
        "spend rate by model",
        "spend by tenant",
        "spend by model",
        "total spend",
        "tokens",
        "share of spend by tier",
        "premium share",
        "cache hit ratio",
        "saved by the cache",
        "budget remaining",
        "budget used",
        "requests per second",
        "error ratio",
        "request latency (p50, p95, p99)",
        "gateway overhead",
        "fallbacks",
    ):
        assert words in titles, words


def test_dashboard_filters_by_tenant_and_model() -> None:
    """Every query on a metric with tenant / model labels honours the variables."""
    for title, expr in exprs(dashboard()):
        for metric in re.findall(r"(gateway_[a-z_]+)\{([^}]*)\}", expr):
            name, selector = metric
            if name in ("gateway_cost_usd_total", "gateway_requests_total", "gateway_tokens_total"):
                assert 'tenant=~"$tenant"' in selector, title
                assert 'model=~"$model"' in selector, title


# -- against a real Prometheus -------------------------------------------------------------
def _config(fake: FakeUpstream) -> dict[str, Any]:
    cfg = gateway_config(fake.base_url, logging={"level": "warning", "access_log": False})
    cfg["providers"]["fake"]["retries"] = {
        "max_attempts": 2,
        "backoff_base": 0.01,
        "backoff_max": 0.02,
    }
    cfg["models"]["premium"]["fallbacks"] = ["cheap"]
    return cfg


def _chat(http: httpx.Client, key: str, body: dict[str, Any], **headers: str) -> httpx.Response:
    h = {"Authorization": f"Bearer {key}", **headers}
    if body.get("stream"):
        with http.stream("POST", "/v1/chat/completions", json=body, headers=h) as r:
            r.read()
            return r
    return http.post("/v1/chat/completions", json=body, headers=h)


def _msg(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _phase(gw: Gateway, fake: FakeUpstream, n: int) -> int:
    """Every kind of request once or more; returns how many requests were sent."""
    sent = 0

    def expect(r: httpx.Response, status: int) -> None:
        nonlocal sent
        sent += 1
        assert r.status_code == status, r.text

    with gw.http() as http:
        for i in range(3):
            expect(_chat(http, "key-1", {"model": "cheap", "messages": _msg(f"post {n} {i}")}), 200)
            body = {
                "model": "cheap",
                "messages": _msg(f"story {n} {i}"),
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            expect(_chat(http, "key-1", body), 200)
        for i in range(2):
            expect(_chat(http, "key-1", {"model": "premium", "messages": _msg(f"ad {n} {i}")}), 200)
        expect(
            _chat(
                http, "key-1", {"model": "premium", "messages": _msg(f"blog {n}"), "stream": True}
            ),
            200,
        )
        for i in range(2):
            r = http.post(
                "/v1/embeddings",
                json={"model": "embed", "input": [f"doc {n} {i}", "more"]},
                headers={"Authorization": "Bearer key-1"},
            )
            expect(r, 200)
        # the same deterministic prompt twice: a cache hit (phase 2: two hits)
        cached = {"model": "cheap", "messages": _msg("cached slogan"), "temperature": 0}
        for _ in range(2):
            expect(_chat(http, "key-1", cached), 200)
        # a double submit: one call, one replay
        for _ in range(2):
            expect(
                _chat(
                    http,
                    "key-1",
                    {"model": "cheap", "messages": _msg("idempotent")},
                    **{"Idempotency-Key": "double-submit"},
                ),
                200,
            )
        # a retry that succeeds, a fallback that succeeds, an error after both attempts
        fake.script("fake-cheap", [{"status": 500}])
        expect(_chat(http, "key-1", {"model": "cheap", "messages": _msg(f"retry {n}")}), 200)
        fake.script("fake-premium", [{"status": 503}, {"status": 503}])
        expect(_chat(http, "key-1", {"model": "premium", "messages": _msg(f"fb {n}")}), 200)
        fake.script("fake-cheap", [{"status": 500}, {"status": 500}])
        expect(_chat(http, "key-1", {"model": "cheap", "messages": _msg(f"fail {n}")}), 502)
        # a budget rejection and rate-limit rejections
        expect(_chat(http, "key-2", {"model": "cheap", "messages": _msg("too expensive")}), 402)
        # key-3 may send one request a minute: its first in a minute passes (phase 1, or
        # phase 2 when a new minute began in between), the next one is refused
        r = _chat(http, "key-3", {"model": "cheap", "messages": _msg(f"first {n}")})
        if r.status_code == 200:
            expect(r, 200)
            r = _chat(http, "key-3", {"model": "cheap", "messages": _msg(f"too fast {n}")})
        expect(r, 429)
    assert fake.pending() == {}
    return sent


def _ledger_usd(gw: Gateway, **query: str) -> Decimal:
    nanos = 0
    cursor: str | None = None
    with gw.http() as http:
        while True:
            params = {"limit": "1000", **query, **({"cursor": cursor} if cursor else {})}
            page = http.get("/admin/ledger", params=params, headers=ADMIN).json()
            nanos += sum(int(row["cost"]) for row in page["data"])
            cursor = page["next_cursor"]
            if not cursor:
                return Decimal(nanos) / Decimal(10**9)


@pytest.fixture(scope="module")
def scraped(
    fake_server: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Prometheus, Gateway]]:
    if PROMETHEUS is None:
        pytest.skip("the prometheus binary is not installed (Debian package: prometheus)")
    fake = fake_server
    fake.reset()
    directory = tmp_path_factory.mktemp("dashboard")
    path = write_config(directory / "gw", _config(fake), {"p": policy(TENANTS)})
    gw = start_in_thread(path)
    try:
        target = gw.url.removeprefix("http://")
        with running_prometheus(directory / "prom", [target]) as prom:
            prom.wait_for(lambda: prom.value('up{job="gateway"}') == 1, "the first scrape")
            sent = _phase(gw, fake, 1)
            # an edit of the policy file (reloaded within a second by the watcher)
            pfile = directory / "gw" / "policies" / "p.yaml"
            pfile.write_text(pfile.read_text() + "\n# edited\n")
            prom.wait_for(
                lambda: (
                    prom.value("sum(gateway_requests_total)") == sent
                    and prom.value("sum(gateway_config_reloads_total)") == 1
                ),
                "phase 1 and the reload to be scraped",
            )
            sent += _phase(gw, fake, 2)  # counters now increase between scrapes
            ledger = _ledger_usd(gw)
            prom.wait_for(
                lambda: (
                    prom.value("sum(gateway_requests_total)") == sent
                    and prom.value("sum(gateway_cost_usd_total)") is not None
                    and abs(Decimal(str(prom.value("sum(gateway_cost_usd_total)"))) - ledger)
                    <= Decimal("1e-9")
                ),
                "phase 2 to be scraped",
            )
            time.sleep(1.5)  # one more scrape, so every series has a sample after the load
            yield prom, gw
    finally:
        gw.stop()
        fake.reset()


@pytest.mark.prometheus
def test_every_panel_query_returns_data(scraped: tuple[Prometheus, Gateway]) -> None:
    prom, _ = scraped
    empty = []
    for title, expr in exprs(dashboard()):
        result = prom.query(substitute(expr))
        if not result or not finite(result):
            empty.append(f"{title}: {substitute(expr)} -> {result}")
    assert not empty, "panels without data:\n" + "\n".join(empty)


@pytest.mark.prometheus
def test_spend_panel_equals_the_ledger(scraped: tuple[Prometheus, Gateway]) -> None:
    prom, gw = scraped
    (spend,) = [
        t["expr"]
        for p in panels(dashboard())
        if p["title"] == "Total spend (USD)"
        for t in p["targets"]
    ]
    ledger = _ledger_usd(gw)
    assert ledger > 0
    got = prom.value(substitute(spend))
    assert got is not None
    assert abs(Decimal(str(got)) - ledger) <= Decimal("1e-9"), (got, ledger)
    # one tenant selected in Grafana
    got_t1 = prom.value(substitute(spend, tenant_value="t1"))
    assert got_t1 is not None
    assert abs(Decimal(str(got_t1)) - _ledger_usd(gw, tenant="t1")) <= Decimal("1e-9")
    assert prom.query(substitute(spend, tenant_value="t2")) == []  # rejected: never charged
    # one model selected
    got_premium = prom.value(substitute(spend, model_value="premium"))
    assert got_premium is not None
    assert abs(Decimal(str(got_premium)) - _ledger_usd(gw, model="premium")) <= Decimal("1e-9")


@pytest.mark.prometheus
def test_template_variables_list_tenants_and_models(scraped: tuple[Prometheus, Gateway]) -> None:
    prom, _ = scraped
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    for name, want in (("tenant", set(TENANTS)), ("model", {"cheap", "premium", "embed"})):
        source = re.fullmatch(r"label_values\((\w+), (\w+)\)", variables[name]["definition"])
        assert source is not None
        values = set(prom.get(f"/api/v1/label/{name}/values", **{"match[]": source[1]}))
        assert want <= values, (name, values)


@pytest.mark.prometheus
def test_alert_rules_use_metrics_the_gateway_exports(scraped: tuple[Prometheus, Gateway]) -> None:
    """Every metric name in the alert rules and the dashboard exists, and every alert
    expression evaluates in this Prometheus (data or not)."""
    prom, _ = scraped
    exported = set(prom.get("/api/v1/label/__name__/values"))
    rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    texts = [r["expr"] for r in rules] + [e for _, e in exprs(dashboard())]
    used = {m for text in texts for m in re.findall(r"\bgateway_[a-z_]+\b", text)}
    # _bucket/_count series of histograms are exported under those names too
    assert used - exported == set(), sorted(used - exported)
    for rule in rules:
        prom.query(rule["expr"])  # raises with Prometheus' message if it does not parse
