"""Keeping reservations of long requests alive.

A reservation's lease lets the budget recover if the process holding it dies. A request
that is still running (a long stream) must not lose its reservation, so every
``lease/3`` seconds the keeper renews the leases of every request in flight, one state
call per tenant."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from .state.base import StateBackend, StateUnavailable

log = logging.getLogger("gateway.leases")


class LeaseKeeper:
    def __init__(self, state: StateBackend, lease_ms: int) -> None:
        self._state = state
        self._lease_ms = lease_ms
        self._held: dict[str, set[str]] = {}
        self._task: asyncio.Task[None] | None = None

    def hold(self, tenant: str, rid: str) -> None:
        held = self._held.get(tenant)
        if held is None:
            held = self._held[tenant] = set()
        held.add(rid)

    def release(self, tenant: str, rid: str) -> None:
        held = self._held.get(tenant)
        if held is not None:
            held.discard(rid)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="lease-keeper")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def renew(self) -> None:
        for tenant, ids in list(self._held.items()):
            if ids:
                await self._state.extend(tenant, list(ids), self._lease_ms)

    async def _run(self) -> None:
        interval = self._lease_ms / 3000
        while True:
            await asyncio.sleep(interval)
            try:
                await self.renew()
            except StateUnavailable as exc:
                log.warning("could not renew reservation leases: %s", exc)
