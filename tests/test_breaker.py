"""The circuit breaker's decisions, on a clock the test moves."""

from __future__ import annotations

from gateway.config.deployment import Breaker as BreakerConfig
from gateway.upstream.breaker import SLICES, CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def breaker(**cfg: float) -> tuple[CircuitBreaker, Clock, list[str]]:
    clock, changes = Clock(), []
    b = CircuitBreaker(BreakerConfig(**cfg), changes.append, clock)  # type: ignore[arg-type]
    return b, clock, changes


def test_consecutive_failures_open_then_a_probe_closes() -> None:
    b, clock, changes = breaker(failure_threshold=3, open_seconds=10)
    for _ in range(2):
        b.record(False)
    b.record(True)  # a success resets the streak
    for _ in range(2):
        b.record(False)
    assert b.state == "closed"
    b.record(False)
    assert b.state == "open" and b.blocked_for() == 10
    clock.now += 10
    assert b.blocked_for() == 0 and b.state == "half_open"  # one probe goes
    assert b.blocked_for() > 0  # the next waits for it
    b.record(True)
    assert changes == ["open", "half_open", "closed"]


def test_failure_ratio_over_the_window_opens() -> None:
    b, clock, _ = breaker(failure_threshold=100, min_requests=20, failure_ratio=0.5)
    for i in range(40):  # 25 % fail, never 3 in a row
        b.record(i % 4 != 0)
        clock.now += 0.1
    assert b.state == "closed"
    for _ in range(19):  # 29 of 59 fail
        b.record(False)
    assert b.state == "closed"
    b.record(False)  # 30 of 60: 50 %
    assert b.state == "open"


def test_calls_older_than_the_window_no_longer_count() -> None:
    b, clock, _ = breaker(failure_threshold=100, min_requests=10, window_seconds=30)
    for _ in range(9):
        b.record(False)
    clock.now += 31  # those failures left the window
    for _ in range(9):
        b.record(True)
    b.record(False)  # 1 of 10 in the window
    assert b.state == "closed"
    for _ in range(9):
        b.record(False)  # 10 of 19
    assert b.state == "open"


def test_memory_does_not_grow_with_the_request_rate() -> None:
    b, clock, _ = breaker(window_seconds=30)
    for _ in range(100_000):  # 1,000 calls a second for 100 s
        b.record(True)
        clock.now += 0.001
    assert len(b._slices) <= SLICES + 1
    assert 29_000 <= b._calls <= 30_000
