"""Prometheus metrics (names are contract: prefix ``gateway_``; see DESIGN.md).

Labels are bounded by configuration: tenant and model names come from the config and
policy files, never from requests; route is the routed model's rule name (or
``direct`` / ``alias:NAME`` / ``downgrade``); status is a class (``2xx``). No request,
key or end-user id is ever a label.

With several worker processes, prometheus-client's multiprocess mode is used: each
process writes its samples to files in one directory (made fresh at start) and
``/metrics`` merges them."""

from __future__ import annotations

import os
from bisect import bisect_left
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from .money import NANOS_PER_USD, nanos_to_float_usd

if TYPE_CHECKING:
    from .config.catalog import Model
    from .pipeline.context import RequestContext
    from .state.base import WindowState
    from .upstream.errors import UpstreamError


class _CounterChild:
    """A labelled counter's child, incremented straight on its value (what
    ``Counter.inc`` does after checks that cannot fail for a child made by ``labels()``):
    a request makes some fifteen increments, and the checks were half their cost."""

    __slots__ = ("_inc",)

    def __init__(self, child: Any) -> None:
        self._inc = child._value.inc

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        self._inc(amount)


class _HistogramChild:
    """A labelled histogram's child: ``Histogram.observe`` with its bucket found by
    bisection instead of a scan of up to 21 bounds."""

    __slots__ = ("_bounds", "_buckets", "_sum")

    def __init__(self, child: Any) -> None:
        self._sum = child._sum.inc
        self._bounds = list(child._upper_bounds)
        self._buckets = [b.inc for b in child._buckets]

    def observe(self, amount: float) -> None:
        self._sum(amount)
        i = bisect_left(self._bounds, amount)  # the first bound >= amount, as observe()
        if i < len(self._buckets):
            self._buckets[i](1)


def _fast(child: Any) -> Any:
    """The child of a labelled metric, wrapped for the hot path where prometheus-client's
    internals are as expected (checked here, once per child), else as it is."""
    if isinstance(child, Counter) and hasattr(getattr(child, "_value", None), "inc"):
        return _CounterChild(child)
    if (
        isinstance(child, Histogram)
        and hasattr(getattr(child, "_sum", None), "inc")
        and isinstance(getattr(child, "_upper_bounds", None), list)
        and len(getattr(child, "_buckets", ())) == len(child._upper_bounds)
    ):
        return _HistogramChild(child)
    return child


LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
OVERHEAD_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    1,
)
CIRCUIT_STATES = {"closed": 0, "half_open": 1, "open": 2}
# The ``code`` label of gateway_upstream_errors_total: the gateway's own upstream error
# codes; an upstream's own code for a rejected request (any string) counts as
# ``upstream_rejected``, so the upstream cannot grow the label set.
UPSTREAM_ERROR_CODES = frozenset(
    {
        "upstream_unreachable",
        "upstream_timeout",
        "upstream_rate_limited",
        "upstream_error",
        "upstream_auth_failed",
        "upstream_bad_response",
        "upstream_circuit_open",
        "upstream_capacity_exhausted",
    }
)
# Attempt outcomes that never reached the upstream.
NOT_CALLED = frozenset({"upstream_circuit_open", "upstream_capacity_exhausted"})


USD_FROM_NANOS = {
    "gateway_cost_nanodollars": ("gateway_cost_usd", "What tenants were charged, in USD."),
    "gateway_cache_saved_nanodollars": (
        "gateway_cache_saved_usd",
        "Upstream cost avoided by cache hits, in USD.",
    ),
    "gateway_credits_topped_up_nanodollars": (
        "gateway_credits_topped_up_usd",
        "Prepaid credits tenants added to their end users' balances, in USD.",
    ),
}


class UsdFromNanos(Collector):
    """Passes every metric of ``source`` through and adds, for each nano-dollar
    counter, its USD twin (one exact division per sample at scrape time)."""

    def __init__(self, source: Any) -> None:
        self._source = source

    def collect(self) -> Iterable[Metric]:
        for metric in self._source.collect():
            yield metric
            twin = USD_FROM_NANOS.get(metric.name)
            if twin is None:
                continue
            usd = Metric(twin[0], twin[1], "counter")
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    usd.add_sample(twin[0] + "_total", sample.labels, sample.value / NANOS_PER_USD)
            yield usd


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Metrics:
    def __init__(self) -> None:
        # *_created series double the series count and no panel or alert needs them.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.multiprocess = multiprocess_dir() is not None
        # In multiprocess mode samples go to files whatever the registry; a private
        # registry keeps several gateways in one test process apart.
        reg = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "gateway_requests",
            "Requests handled, by outcome.",
            ["tenant", "model", "provider", "route", "status_class", "cache"],
            registry=reg,
        )
        self.tokens = Counter(
            "gateway_tokens",
            "Tokens billed by upstreams (kind: prompt, cached_prompt, "
            "completion, reasoning). cached_prompt is part of prompt; reasoning of completion.",
            ["tenant", "model", "kind"],
            registry=reg,
        )
        # Money is counted in integer nano-dollars (exact in a float64 up to 2**53) and
        # exposed in USD by dividing once at scrape time (see UsdFromNanos), so the USD
        # series equal the ledger to the nano-dollar instead of drifting with float sums.
        self.cost = Counter(
            "gateway_cost_nanodollars",
            "What tenants were charged, in nano-dollars (exact); see gateway_cost_usd_total.",
            ["tenant", "model", "provider"],
            registry=reg,
        )
        self.cache_hits = Counter(
            "gateway_cache_hits",
            "Requests answered from the prompt cache.",
            ["tenant", "model"],
            registry=reg,
        )
        self.cache_saved = Counter(
            "gateway_cache_saved_nanodollars",
            "Upstream cost avoided by cache hits, in nano-dollars (exact).",
            ["tenant", "model"],
            registry=reg,
        )
        self.budget_rejections = Counter(
            "gateway_budget_rejections",
            "Requests rejected because a budget window was full (window: daily, monthly, "
            "total, or end_user_daily... and end_user_balance for an end user's).",
            ["tenant", "window"],
            registry=reg,
        )
        self.rate_limit_rejections = Counter(
            "gateway_rate_limit_rejections",
            "Requests rejected by a rate limit (limit: rpm, tpm, concurrent, and key_... or "
            "end_user_... for a key's or an end user's own).",
            ["tenant", "limit"],
            registry=reg,
        )
        self.upstream_errors = Counter(
            "gateway_upstream_errors",
            "Failed upstream attempts, by error code.",
            ["provider", "model", "code"],
            registry=reg,
        )
        self.upstream_attempts = Counter(
            "gateway_upstream_attempts",
            "Calls made to upstreams (each retry and fallback is one); the denominator of "
            "the upstream error ratio.",
            ["provider", "model"],
            registry=reg,
        )
        self.retries = Counter(
            "gateway_retries",
            "Upstream attempts retried on the same model.",
            ["provider", "model"],
            registry=reg,
        )
        self.fallbacks = Counter(
            "gateway_fallbacks",
            "Requests that fell back to the next model of the chain.",
            ["tenant", "from_model", "to_model"],
            registry=reg,
        )
        self.replays = Counter(
            "gateway_idempotent_replays",
            "Responses replayed for a repeated Idempotency-Key.",
            ["tenant"],
            registry=reg,
        )
        self.reloads = Counter(
            "gateway_config_reloads",
            "Policy reload attempts, by result.",
            ["result"],
            registry=reg,
        )
        self.reload_failures = Counter(
            "gateway_config_reload_failures",
            "Policy reloads refused (the old policy stays).",
            registry=reg,
        )
        self.last_reload_ok = Gauge(
            "gateway_config_last_reload_successful",
            "1 if the last policy reload succeeded (or none was needed), 0 while a bad "
            "edit is being refused.",
            registry=reg,
            multiprocess_mode="livemin",
        )
        self.last_reload_ok.set(1)
        self.internal_errors = Counter(
            "gateway_internal_errors",
            "Unexpected failures inside the gateway (bugs).",
            registry=reg,
        )
        self.credits = Counter(
            "gateway_credits_topped_up_nanodollars",
            "Prepaid credits added to end users' balances, in nano-dollars (exact); see "
            "gateway_credits_topped_up_usd_total.",
            ["tenant"],
            registry=reg,
        )
        self.api_errors = Counter(
            "gateway_api_errors",
            "Errors answered by the gateway's own endpoints (usage, end users, admin...), "
            "by route template and status.",
            ["route", "status"],
            registry=reg,
        )
        self.ledger_failures = Counter(
            "gateway_ledger_write_failures",
            "Ledger rows that could not be written.",
            registry=reg,
        )
        self.log_lines_dropped = Counter(
            "gateway_access_log_lines_dropped",
            "Access log lines that could not be written (stdout closed or failing).",
            registry=reg,
        )
        self.queue_rejections = Counter(
            "gateway_upstream_queue_rejections",
            "Requests refused because a provider's capacity queue was full or too slow.",
            ["provider"],
            registry=reg,
        )
        self.latency = Histogram(
            "gateway_request_duration_seconds",
            "Total time from request to last byte.",
            ["tenant", "model", "stream"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.upstream_latency = Histogram(
            "gateway_upstream_duration_seconds",
            "Time spent waiting on the upstream.",
            ["provider", "model"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.ttft = Histogram(
            "gateway_time_to_first_token_seconds",
            "Upstream time to the first stream chunk.",
            ["provider", "model"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.overhead = Histogram(
            "gateway_overhead_seconds",
            "Gateway time per request: total minus time waiting on the upstream.",
            ["endpoint"],
            buckets=OVERHEAD_BUCKETS,
            registry=reg,
        )
        self.budget_limit = Gauge(
            "gateway_budget_limit_usd",
            "A tenant's budget limit per window, in USD.",
            ["tenant", "window"],
            registry=reg,
            multiprocess_mode="mostrecent",
        )
        self.budget_spent = Gauge(
            "gateway_budget_spent_usd",
            "A tenant's spend in the current window, in USD.",
            ["tenant", "window"],
            registry=reg,
            multiprocess_mode="mostrecent",
        )
        self.budget_remaining = Gauge(
            "gateway_budget_remaining_usd",
            "What a tenant can still spend in the current window (limit - spent - reserved).",
            ["tenant", "window"],
            registry=reg,
            multiprocess_mode="mostrecent",
        )
        self.circuit = Gauge(
            "gateway_circuit_state",
            "Circuit breaker per upstream model: 0 closed, 1 half-open, 2 open.",
            ["provider", "model"],
            registry=reg,
            multiprocess_mode="max",
        )
        self.in_flight = Gauge(
            "gateway_in_flight_requests",
            "Requests being handled now.",
            registry=reg,
            multiprocess_mode="livesum",
        )
        self.model_info = Gauge(
            "gateway_model_info",
            "Always 1: each configured model with its provider, tier and kind (for joins).",
            ["model", "provider", "tier", "kind"],
            registry=reg,
            multiprocess_mode="max",
        )
        self._children: dict[tuple[Any, ...], Any] = {}
        self._pending_windows: dict[str, list[WindowState]] = {}
        self._exposed = CollectorRegistry(auto_describe=True)
        self._exposed.register(UsdFromNanos(self.registry))
        if not self.multiprocess:  # (neither works across processes)
            # process_resident_memory_bytes, process_cpu_seconds_total, ...
            ProcessCollector(registry=self._exposed)
            # python_gc_collections_total, python_gc_objects_collected_total, ...
            GCCollector(registry=self._exposed)

    # -- exposition ----------------------------------------------------------------------
    def exposition(self) -> bytes:
        self.flush_windows()
        if self.multiprocess:
            reg = CollectorRegistry()
            reg.register(UsdFromNanos(MultiProcessCollector(None)))  # type: ignore[no-untyped-call]
            return generate_latest(reg)
        return generate_latest(self._exposed)

    def close(self) -> None:
        """A worker that stops takes its live gauges (in flight, reload state) along;
        its counters stay in the sums."""
        if self.multiprocess:
            mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]

    # -- hot path helpers ------------------------------------------------------------------
    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = _fast(metric.labels(*labels))
        return child

    def observe(self, ctx: RequestContext) -> None:
        """Everything a finished request contributes."""
        tenant = ctx.tenant_name
        model = ctx.model.name if ctx.model else ""
        provider = ctx.model.provider if ctx.model else ""
        route = ctx.route.label if ctx.route else ""
        err = ctx.error
        status = err.status if err is not None else (499 if ctx.client_gone else ctx.status)
        self._child(
            self.requests, tenant, model, provider, route, f"{status // 100}xx", ctx.cache_status
        ).inc()
        u = ctx.usage
        if u is not None and ctx.cache_status != "hit":
            if u.prompt_tokens:
                self._child(self.tokens, tenant, model, "prompt").inc(u.prompt_tokens)
            if u.cached_tokens:
                self._child(self.tokens, tenant, model, "cached_prompt").inc(u.cached_tokens)
            if u.completion_tokens:
                self._child(self.tokens, tenant, model, "completion").inc(u.completion_tokens)
            if u.reasoning_tokens:
                self._child(self.tokens, tenant, model, "reasoning").inc(u.reasoning_tokens)
        if ctx.charged:
            self._child(self.cost, tenant, model, provider).inc(ctx.charged)
        if ctx.cache_status == "hit" and err is None:  # a hit refused at admission saved nothing
            self._child(self.cache_hits, tenant, model).inc()
            if ctx.saved:
                self._child(self.cache_saved, tenant, model).inc(ctx.saved)
        if ctx.replayed:
            self._child(self.replays, tenant).inc()
        if err is not None:
            if err.code in ("budget_exceeded", "insufficient_credits"):
                window = ctx.reject_window or ""
                self._child(self.budget_rejections, tenant, window).inc()
            elif err.code == "rate_limit_exceeded":
                self._child(self.rate_limit_rejections, tenant, ctx.reject_limit or "").inc()
        total = ctx.elapsed()
        if tenant:
            self._child(self.latency, tenant, model, "true" if ctx.stream else "false").observe(
                total
            )
        for a in ctx.attempts:
            if a.outcome not in NOT_CALLED:
                self._child(self.upstream_attempts, a.provider, a.model).inc()
        if ctx.upstream_seconds and ctx.model is not None:
            self._child(self.upstream_latency, provider, model).observe(ctx.upstream_seconds)
        self._child(self.overhead, ctx.endpoint).observe(max(total - ctx.upstream_seconds, 0.0))

    def first_token(self, model: Model, seconds: float) -> None:
        self._child(self.ttft, model.provider, model.name).observe(seconds)

    def upstream_error(self, model: Model, exc: UpstreamError) -> None:
        code = exc.error_code if exc.error_code in UPSTREAM_ERROR_CODES else "upstream_rejected"
        self._child(self.upstream_errors, model.provider, model.name, code).inc()
        if code == "upstream_capacity_exhausted":
            self._child(self.queue_rejections, model.provider).inc()

    def retry(self, model: Model) -> None:
        self._child(self.retries, model.provider, model.name).inc()

    def fallback(self, ctx: RequestContext, src: Model, dst: Model) -> None:
        self._child(self.fallbacks, ctx.tenant_name, src.name, dst.name).inc()

    def internal_error(self) -> None:
        self.internal_errors.inc()

    def credits_topped_up(self, tenant: str, nanos: int) -> None:
        if nanos:
            self._child(self.credits, tenant).inc(nanos)

    def api_error(self, route: str, status: int) -> None:
        self._child(self.api_errors, route, str(status)).inc()

    def ledger_failure(self) -> None:
        self.ledger_failures.inc()

    def reload(self, ok: bool) -> None:
        self._child(self.reloads, "success" if ok else "failure").inc()
        self.last_reload_ok.set(1 if ok else 0)
        if not ok:
            self.reload_failures.inc()

    def windows(self, tenant: str, windows: list[WindowState]) -> None:
        """Note a tenant's budget state; the gauges are set at the next flush (each
        second and before a scrape), not twice per request."""
        self._pending_windows[tenant] = windows

    def flush_windows(self) -> None:
        pending, self._pending_windows = self._pending_windows, {}
        for tenant, windows in pending.items():
            self._set_windows(tenant, windows)

    def _set_windows(self, tenant: str, windows: list[WindowState]) -> None:
        for w in windows:
            if w.limit is None:
                continue
            self._child(self.budget_limit, tenant, w.window).set(nanos_to_float_usd(w.limit))
            self._child(self.budget_spent, tenant, w.window).set(nanos_to_float_usd(w.spent))
            self._child(self.budget_remaining, tenant, w.window).set(
                nanos_to_float_usd(w.remaining or 0)
            )

    def circuit_state(self, provider: str, model: str, state: str) -> None:
        self._child(self.circuit, provider, model).set(CIRCUIT_STATES[state])

    def catalog(self, models: Iterable[Model]) -> None:
        """Export the catalog as ``gateway_model_info`` (dashboards join on ``model`` to
        split spend by tier)."""
        for m in models:
            self.model_info.labels(m.name, m.provider, m.tier, m.kind).set(1)
