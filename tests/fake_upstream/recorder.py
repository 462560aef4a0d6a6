"""What the fake has received and served, readable from any thread."""

from __future__ import annotations

import threading
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from multidict import CIMultiDictProxy


@dataclass(frozen=True, slots=True)
class Received:
    """One request as it arrived. Unpacks as ``headers, body = received``."""

    method: str
    path: str
    headers: CIMultiDictProxy[str]  # case-insensitive
    body: Any  # the parsed JSON body; None when there was none or it was not JSON
    raw: bytes

    def __iter__(self) -> Iterator[Any]:
        return iter((self.headers, self.body))

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "path": self.path,
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "body": self.body,
        }


class Recorder:
    """Counts calls per model and path, keeps the last ``keep`` requests, and tracks
    responses in flight and those the caller abandoned before they were complete."""

    def __init__(self, keep: int = 100) -> None:
        self._lock = threading.Lock()
        self.by_model: Counter[str] = Counter()
        self.by_path: Counter[str] = Counter()
        self.received: deque[Received] = deque(maxlen=keep)
        self.aborted = 0
        self.in_flight = 0
        self.max_in_flight = 0

    def reset(self) -> None:
        """Forget everything except the responses still in flight."""
        with self._lock:
            self.by_model.clear()
            self.by_path.clear()
            self.received.clear()
            self.aborted = 0
            self.max_in_flight = self.in_flight

    def request(self, received: Received, model: str | None) -> None:
        with self._lock:
            self.received.append(received)
            self.by_path[received.path] += 1
            if model is not None:
                self.by_model[model] += 1

    def started(self) -> None:
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def finished(self, aborted: bool) -> None:
        with self._lock:
            self.in_flight -= 1
            self.aborted += aborted

    def calls(self, model: str | None = None) -> int:
        with self._lock:
            return self.by_model.get(model, 0) if model else sum(self.by_model.values())

    def requests(self) -> list[Received]:
        with self._lock:
            return list(self.received)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "calls": dict(self.by_model),
                "total": sum(self.by_model.values()),
                "paths": dict(self.by_path),
                "aborted": self.aborted,
                "in_flight": self.in_flight,
                "max_in_flight": self.max_in_flight,
                "requests": [r.to_json() for r in self.received],
            }
