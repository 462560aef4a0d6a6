"""How the fake should answer one call: a :class:`Behaviour`, and the scripted queues.

A behaviour comes from up to four places, later ones overriding earlier ones key by key:
the fake's defaults (``latency``), the ``x-fake-behaviour`` header, the request body's
``metadata.fake`` (an object, or a JSON string since OpenAI's metadata values are strings),
and the next entry scripted for the call's model."""

from __future__ import annotations

import dataclasses
import threading
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

ANY_MODEL = "*"
DEFAULT_EXTRA: dict[str, Any] = {"x_fake_extra": {"nested": True}}
USAGE_KEYS = frozenset(
    {"prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens", "reasoning_tokens"}
)


class DirectiveError(ValueError):
    """A behaviour directive the fake does not understand."""


@dataclass(frozen=True, slots=True)
class Behaviour:
    """Every field is optional; ``None`` means "behave normally"."""

    status: int | None = None  # answer this HTTP status with an OpenAI-shaped error
    retry_after: float | None = None  # Retry-After header (seconds), e.g. with status 429
    error: Mapping[str, Any] | None = None  # overrides message/type/param/code of the error
    headers: Mapping[str, str] | None = None  # extra response headers
    delay: float | None = None  # seconds before the response headers
    ttft: float | None = None  # seconds before the first stream chunk
    chunk_delay: float | None = None  # seconds between stream chunks
    tokens: int | None = None  # completion tokens (content chunks) per choice
    disconnect_after: int | None = None  # stream: drop the connection after N chunks
    malformed: bool | int | str | None = None  # True/N: bad JSON (after N chunks); "http"
    error_in_stream: int | None = None  # send an error event after N chunks, then end
    no_usage: bool | None = None  # report no usage (ignores stream_options.include_usage)
    no_done: bool | None = None  # end the stream without "data: [DONE]"
    usage: Mapping[str, int] | None = None  # reported usage numbers, see USAGE_KEYS
    reasoning_tokens: int | None = None  # added to completion_tokens, as OpenAI counts them
    cached_tokens: int | None = None  # prompt_tokens_details.cached_tokens
    extra: Mapping[str, Any] | None = None  # unknown fields added to the response / chunks

    def merge(self, over: Behaviour | None) -> Behaviour:
        """This behaviour with every field ``over`` sets replaced."""
        if over is None:
            return self
        changes = {f.name: v for f in _FIELDS if (v := getattr(over, f.name)) is not None}
        return dataclasses.replace(self, **changes) if changes else self

    @classmethod
    def parse(cls, value: Any) -> Behaviour:
        """A behaviour from a directive: an object, its JSON text, or a bare status code."""
        if isinstance(value, Behaviour):
            return value
        if isinstance(value, str | bytes):
            try:
                value = orjson.loads(value)
            except orjson.JSONDecodeError as exc:
                raise DirectiveError(f"fake directive is not JSON: {exc}") from None
        if isinstance(value, int) and not isinstance(value, bool):
            value = {"status": value}
        if value is None:
            return NORMAL
        if not isinstance(value, Mapping):
            raise DirectiveError(f"fake directive must be an object, got {value!r}")
        unknown = set(value) - _NAMES
        if unknown:
            raise DirectiveError(f"unknown fake directive keys: {sorted(unknown)}")
        return cls(**{k: _check(k, v) for k, v in value.items()})


_FIELDS = dataclasses.fields(Behaviour)
_NAMES = frozenset(f.name for f in _FIELDS)
_SECONDS = frozenset({"retry_after", "delay", "ttft", "chunk_delay"})
_COUNTS = frozenset(
    {"tokens", "disconnect_after", "error_in_stream", "reasoning_tokens", "cached_tokens"}
)
NORMAL = Behaviour()


def _check(key: str, value: Any) -> Any:
    """``value`` if it is valid for ``key``; raises DirectiveError otherwise."""
    if value is None:
        return None
    ok: bool
    if key == "status":
        ok = _is_int(value) and 100 <= value <= 599
    elif key in _SECONDS:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and value >= 0
    elif key in _COUNTS:
        ok = _is_int(value) and value >= 0
    elif key in ("no_usage", "no_done"):
        ok = isinstance(value, bool)
    elif key == "malformed":
        ok = isinstance(value, bool) or (_is_int(value) and value >= 0) or value == "http"
    elif key == "usage":
        ok = isinstance(value, Mapping) and all(
            k in USAGE_KEYS and _is_int(v) and v >= 0 for k, v in value.items()
        )
    elif key == "extra":
        if value is True:
            return DEFAULT_EXTRA
        ok = isinstance(value, Mapping)
    elif key == "headers":
        ok = isinstance(value, Mapping) and all(isinstance(v, str) for v in value.values())
    else:  # error
        ok = isinstance(value, Mapping)
    if not ok:
        raise DirectiveError(f"bad value for fake directive {key!r}: {value!r}")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class Scripts:
    """Per-model queues of behaviours; each matching call takes the next one. Calls for a
    model without entries of its own take from the ``"*"`` queue. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queues: dict[str, deque[Behaviour]] = {}

    def add(self, model: str, behaviours: Iterable[Any]) -> None:
        """Append behaviours (objects, JSON text, or bare status codes) for ``model``."""
        if not isinstance(model, str) or not model:
            raise DirectiveError("script needs a model name or '*'")
        if isinstance(behaviours, str | bytes | Mapping):
            raise DirectiveError("script behaviours must be a list")
        parsed = [Behaviour.parse(b) for b in behaviours]
        with self._lock:
            self._queues.setdefault(model, deque()).extend(parsed)

    def pop(self, model: str) -> Behaviour | None:
        if not self._queues:  # fast path, racy but only ever a hint
            return None
        with self._lock:
            for key in (model, ANY_MODEL):
                queue = self._queues.get(key)
                if queue:
                    return queue.popleft()
        return None

    def pending(self) -> dict[str, int]:
        with self._lock:
            return {model: len(q) for model, q in self._queues.items() if q}

    def clear(self) -> None:
        with self._lock:
            self._queues.clear()
