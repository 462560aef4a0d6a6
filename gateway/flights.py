"""In-process wake-ups for single-flight followers: the leader's end wakes followers in
the same process at once; followers in other processes poll the shared cache."""

from __future__ import annotations

import asyncio
import contextlib


class FlightHub:
    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}

    async def wait(self, key: str, timeout: float) -> None:
        ev = self._events.get(key)
        if ev is None:
            ev = self._events[key] = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ev.wait(), timeout)

    def notify(self, key: str) -> None:
        ev = self._events.pop(key, None)
        if ev is not None:
            ev.set()
