"""In-process wake-ups for single-flight followers: the leader's end wakes followers in
the same process at once; followers in other processes poll the shared cache."""

from __future__ import annotations

import asyncio
import contextlib


class FlightHub:
    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}
        self._waiters: dict[str, int] = {}

    async def wait(self, key: str, timeout: float) -> None:
        """Wait until ``notify(key)`` or ``timeout`` seconds, whichever comes first."""
        ev = self._events.get(key)
        if ev is None:
            ev = self._events[key] = asyncio.Event()
        self._waiters[key] = self._waiters.get(key, 0) + 1
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ev.wait(), timeout)
        finally:
            left = self._waiters[key] - 1
            if left:
                self._waiters[key] = left
            else:  # nobody waits any more: forget the key (its leader may be elsewhere)
                del self._waiters[key]
                if self._events.get(key) is ev:
                    del self._events[key]

    def notify(self, key: str) -> None:
        ev = self._events.pop(key, None)
        if ev is not None:
            ev.set()

    def __len__(self) -> int:
        return len(self._events)
