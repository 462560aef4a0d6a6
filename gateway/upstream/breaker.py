"""Circuit breakers, one per (provider, model).

closed -> open: after ``failure_threshold`` consecutive failures, or when at least
``min_requests`` calls in the last ``window_seconds`` failed at ``failure_ratio`` or more.
open -> half-open: after ``open_seconds``; one probe is let through.
half-open -> closed on the probe's success, -> open again on its failure.
State is exported as the ``gateway_circuit_state`` gauge."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from ..config.deployment import Breaker as BreakerConfig

Clock = Callable[[], float]


class CircuitBreaker:
    def __init__(
        self, cfg: BreakerConfig, on_change: Callable[[str], None], clock: Clock = time.monotonic
    ) -> None:
        self.cfg = cfg
        self.state = "closed"
        self._on_change = on_change
        self._clock = clock
        self._consecutive = 0
        self._calls: deque[tuple[float, bool]] = deque()
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
                self._calls.clear()
                self._set("closed")
            else:
                self._open(now)
            return
        calls = self._calls
        calls.append((now, ok))
        horizon = now - self.cfg.window_seconds
        while calls and calls[0][0] < horizon:
            calls.popleft()
        if ok:
            self._consecutive = 0
            return
        self._consecutive += 1
        if self._consecutive >= self.cfg.failure_threshold:
            self._open(now)
            return
        if len(calls) >= self.cfg.min_requests:
            failed = sum(1 for _, good in calls if not good)
            if failed / len(calls) >= self.cfg.failure_ratio:
                self._open(now)

    def _open(self, now: float) -> None:
        self._opened_at = now
        self._consecutive = 0
        self._calls.clear()
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
