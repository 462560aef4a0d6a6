"""Circuit breakers, one per (provider, model).

closed -> open: after ``failure_threshold`` consecutive failures, or when at least
``min_requests`` calls in the last ``window_seconds`` failed at ``failure_ratio`` or more.
open -> half-open: after ``open_seconds``; one probe is let through.
half-open -> closed on the probe's success, -> open again on its failure.
State is exported as the ``gateway_circuit_state`` gauge.

The window is kept as counts per slice of time (``SLICES`` of them), not a record per
call: memory and work stay the same whatever the request rate (a record per call held
120,000 entries, ~10 MB, at 4,000 requests/s over the default 30 s window), at the price
of the window's edge moving in steps of ``window_seconds / SLICES``."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from ..config.deployment import Breaker as BreakerConfig

Clock = Callable[[], float]
SLICES = 30


class CircuitBreaker:
    def __init__(
        self, cfg: BreakerConfig, on_change: Callable[[str], None], clock: Clock = time.monotonic
    ) -> None:
        self.cfg = cfg
        self.state = "closed"
        self._on_change = on_change
        self._clock = clock
        self._consecutive = 0
        self._width = cfg.window_seconds / SLICES
        # [slice number, calls, failures], oldest first; and their sums
        self._slices: deque[list[int]] = deque()
        self._calls = 0
        self._failed = 0
        self._opened_at = 0.0
        self._probing = False

    def _set(self, state: str) -> None:
        if state != self.state:
            self.state = state
            self._on_change(state)

    def blocked_for(self) -> float:
        """0 if a call may go ahead now; else seconds until the breaker half-opens."""
        if self.state == "closed":
            return 0.0
        now = self._clock()
        if self.state == "open":
            wait = self._opened_at + self.cfg.open_seconds - now
            if wait > 0:
                return wait
            self._set("half_open")
            self._probing = False
        if self._probing:
            return max(self.cfg.open_seconds / 10, 0.1)
        self._probing = True
        return 0.0

    def record(self, ok: bool) -> None:
        now = self._clock()
        if self.state == "half_open":
            self._probing = False
            if ok:
                self._consecutive = 0
                self._forget()
                self._set("closed")
            else:
                self._open(now)
            return
        self._count(now, ok)
        if ok:
            self._consecutive = 0
            return
        self._consecutive += 1
        if self._consecutive >= self.cfg.failure_threshold:
            self._open(now)
            return
        calls = self._calls
        if calls >= self.cfg.min_requests and self._failed / calls >= self.cfg.failure_ratio:
            self._open(now)

    def _count(self, now: float, ok: bool) -> None:
        """Add one call to the window, dropping the slices that fell out of it."""
        n = int(now // self._width)
        slices = self._slices
        oldest = n - SLICES  # slices up to this one are older than the window
        while slices and slices[0][0] <= oldest:
            _, calls, failed = slices.popleft()
            self._calls -= calls
            self._failed -= failed
        if slices and slices[-1][0] == n:
            last = slices[-1]
        else:
            last = [n, 0, 0]
            slices.append(last)
        last[1] += 1
        self._calls += 1
        if not ok:
            last[2] += 1
            self._failed += 1

    def _forget(self) -> None:
        self._slices.clear()
        self._calls = self._failed = 0

    def _open(self, now: float) -> None:
        self._opened_at = now
        self._consecutive = 0
        self._forget()
        self._set("open")


class Breakers:
    def __init__(self, on_change: Callable[[str, str, str], None], clock: Clock = time.monotonic):
        self._by_key: dict[tuple[str, str], CircuitBreaker] = {}
        self._on_change = on_change
        self._clock = clock

    def get(self, provider: str, model: str, cfg: BreakerConfig) -> CircuitBreaker:
        key = (provider, model)
        b = self._by_key.get(key)
        if b is None:
            b = CircuitBreaker(cfg, lambda s: self._on_change(provider, model, s), self._clock)
            self._by_key[key] = b
            self._on_change(provider, model, "closed")
        return b
