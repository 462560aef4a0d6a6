"""Everything a request needs, built once at start-up and shared."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

from .clock import SYSTEM_CLOCK, Clock
from .config import LoadedConfig, Policy, ProviderConfig, Tenant
from .flights import FlightHub
from .leases import LeaseKeeper
from .logs import AccessLog
from .metrics import Metrics
from .policy_store import PolicyStore
from .state import StateBackend, StateUnavailable, WindowState, open_state
from .tokens import TokenCounter, encodings_for
from .upstream import Upstream, build_upstreams
from .upstream.breaker import Breakers
from .upstream.capacity import Capacity

log = logging.getLogger("gateway")
T = TypeVar("T")


class Runtime:
    def __init__(
        self,
        config: LoadedConfig,
        *,
        policy: Policy | None = None,
        state: StateBackend | None = None,
        clock: Clock = SYSTEM_CLOCK,
        watch_policies: bool = True,
    ) -> None:
        cfg = config.gateway
        self.config = config
        self.catalog = config.catalog
        self.clock = clock
        self.metrics = Metrics()
        self.policies = PolicyStore(config, self.metrics, policy)
        self.tokens = TokenCounter(
            cfg.tokenizer.cache_dir,
            encodings_for((m.upstream_model, m.encoding) for m in self.catalog.models.values()),
        )
        self.state = state if state is not None else open_state(cfg.state, cfg, clock)
        self.upstreams: dict[str, Upstream] = build_upstreams(cfg.providers, self.tokens)
        self.lease_ms = cfg.reservations.lease_seconds * 1000
        self.leases = LeaseKeeper(self.state, self.lease_ms)
        self.breakers = Breakers(self.metrics.circuit_state)
        self.capacity = Capacity(dict(cfg.providers))
        self.flights = FlightHub()
        self.access_log = AccessLog(cfg.logging, on_drop=self.metrics.log_lines_dropped.inc)
        self.admin_keys = frozenset(
            bytes.fromhex(k.removeprefix("sha256:")) for k in cfg.admin_keys
        )
        self.max_body = cfg.requests.max_body_bytes
        self.metrics_enabled = cfg.metrics.enabled
        self.watch_policies = watch_policies
        self._windows: dict[str, list[WindowState]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._state_retry: asyncio.Task[None] | None = None
        self._gauges: asyncio.Task[None] | None = None
        self.ready = False

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        await self.tokens.load(self.config.gateway.tokenizer.load_timeout_seconds)
        try:
            await self._start_state()
        except StateUnavailable as exc:
            # Come up not ready (readyz says why; requests get 503) and keep trying:
            # an orchestrator restarting the gateway in a loop would not fix Redis.
            log.error("state backend unavailable at start-up (%s); retrying every 2s", exc)
            self._state_retry = asyncio.get_running_loop().create_task(self._retry_state())
        self.metrics.catalog(self.catalog.models.values())
        self.leases.start()
        self.access_log.start()
        if self.metrics_enabled:
            self._gauges = asyncio.get_running_loop().create_task(self._refresh_budget_gauges())
        if self.watch_policies:
            self.policies.start()
        policy = self.policies.current
        log.info(
            "gateway ready: state=%s, %d providers, %d models, %d tenants, policy digest %s",
            self.state.name,
            len(self.upstreams),
            len(self.catalog.models),
            len(policy.tenants),
            policy.digest,
        )
        self.ready = True

    async def _start_state(self) -> None:
        await self.state.start()
        # Downgrade rules need each tenant's budget state before its first request.
        for tenant in self.policy.tenants.values():
            if tenant.downgrade is not None:
                self.note_windows(tenant.name, await self.state.usage(tenant.name, tenant.budgets))

    async def _retry_state(self) -> None:
        while True:
            await asyncio.sleep(2)
            try:
                await self._start_state()
            except StateUnavailable as exc:
                log.warning("state backend still unavailable: %s", exc)
                continue
            log.info("state backend %s is reachable now", self.state.name)
            return

    async def _refresh_budget_gauges(self, interval: float = 15.0) -> None:
        """Budget gauges follow window resets and other processes' spend even for tenants
        that send nothing (a budget alert must clear after midnight)."""
        since = 0.0
        while True:
            # Requests note their tenant's state; the gauges take it once a second.
            await asyncio.sleep(1.0)
            self.metrics.flush_windows()
            since += 1.0
            if since < interval:
                continue
            since = 0.0
            for tenant in list(self.policy.tenants.values()):
                if not tenant.budgets.any:
                    continue
                try:
                    self.note_windows(
                        tenant.name, await self.state.usage(tenant.name, tenant.budgets)
                    )
                except StateUnavailable:
                    break  # readyz reports it; try again next round

    async def stop(self) -> None:
        self.ready = False
        for task in (self._state_retry, self._gauges):
            if task is not None:
                task.cancel()
        self.metrics.flush_windows()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=30)
        await self.policies.stop()
        await self.leases.stop()
        for up in self.upstreams.values():
            await up.aclose()
        await self.state.close()
        await self.access_log.stop()
        self.metrics.close()

    def track(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Run ``coro`` as a task that shutdown waits for (settlements, ledger writes)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- shared knowledge ------------------------------------------------------------------
    @property
    def policy(self) -> Policy:
        return self.policies.current

    def provider_config(self, name: str) -> ProviderConfig:
        return self.config.gateway.providers[name]

    def note_windows(self, tenant: str, windows: list[WindowState]) -> None:
        """Remember a tenant's latest budget state (for downgrades and gauges)."""
        self._windows[tenant] = windows
        self.metrics.windows(tenant, windows)

    def budget_share_remaining(self, tenant: Tenant) -> float | None:
        """The smallest share of any budget window still available, as last seen."""
        windows = self._windows.get(tenant.name)
        if not windows:
            return None
        shares = [
            (w.remaining or 0) / w.limit for w in windows if w.limit is not None and w.limit > 0
        ]
        return min(shares) if shares else None
