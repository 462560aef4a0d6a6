"""Logging: structured JSON (or plain text) lines, and one access line per request.

The access line carries what an operator needs to follow the money (request id, tenant,
model, route, tokens, cost, cache, status, latency) and never a key; prompt text only
when the operator turns on ``logging.log_prompts``. Lines are buffered and written by
the event loop every 100 ms, so logging never costs a system call per request."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import Callable
from functools import lru_cache
from typing import IO, TYPE_CHECKING, Any

import orjson

from .config.deployment import LoggingConfig
from .money import nanos_to_usd

if TYPE_CHECKING:
    from .pipeline.context import RequestContext


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out).decode()


@lru_cache(maxsize=8)
def _utc_second(second: int) -> str:
    """An access line's ``ts``: requests of the same second share it (one strftime each
    second instead of one per request)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second))


def setup_logging(cfg: LoggingConfig) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_gateway", False):
            root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler._gateway = True  # type: ignore[attr-defined]
    handler.setFormatter(
        JsonFormatter()
        if cfg.format == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root.addHandler(handler)
    root.setLevel(cfg.level.upper())
    logging.getLogger("gateway").setLevel(cfg.level.upper())


log = logging.getLogger("gateway.logs")


class AccessLog:
    def __init__(
        self,
        cfg: LoggingConfig,
        stream: IO[bytes] | None = None,
        on_drop: Callable[[int], None] | None = None,
    ) -> None:
        self.enabled = cfg.access_log
        self.json = cfg.format == "json"
        self.log_prompts = cfg.log_prompts
        self._stream = stream
        self._buf: list[bytes] = []
        self._task: asyncio.Task[None] | None = None
        # Lines that could not be written (stdout closed or failing) are counted here
        # (gateway_access_log_lines_dropped_total) and a warning says so once per outage.
        self._on_drop = on_drop
        self._failing = False

    def line(self, ctx: RequestContext) -> dict[str, Any]:
        u = ctx.usage
        err = ctx.error
        d: dict[str, Any] = {
            "ts": _utc_second(ctx.started_ms // 1000),
            "msg": "request",
            "request_id": ctx.request_id,
            "endpoint": ctx.endpoint,
            "tenant": ctx.tenant_name,
            "key": ctx.key_fp,
            "requested_model": ctx.requested_model,
            "model": ctx.model.name if ctx.model else "",
            "provider": ctx.model.provider if ctx.model else "",
            "route": ctx.route.reason if ctx.route else "",
            "stream": ctx.stream,
            "status": err.status if err else (499 if ctx.client_gone else ctx.status),
            "error": err.error_code if err else ("client_disconnected" if ctx.client_gone else ""),
            "prompt_tokens": u.prompt_tokens if u else 0,
            "cached_tokens": u.cached_tokens if u else 0,
            "completion_tokens": u.completion_tokens if u else 0,
            "reasoning_tokens": u.reasoning_tokens if u else 0,
            "cost_usd": nanos_to_usd(ctx.charged),
            "cache": ctx.cache_status,
            "replay": ctx.replayed,
            "latency_ms": round(ctx.elapsed() * 1000, 2),
            "upstream_ms": round(ctx.upstream_seconds * 1000, 2),
        }
        if ctx.ttft is not None:
            d["ttft_ms"] = round(ctx.ttft * 1000, 2)
        if ctx.end_user:
            d["end_user"] = ctx.end_user
        if err is not None:
            d["error_message"] = err.message
        if self.log_prompts:
            d["request_body"] = ctx.body
        return d

    def write(self, ctx: RequestContext) -> None:
        if not self.enabled:
            return
        d = self.line(ctx)
        if self.json:
            self._buf.append(orjson.dumps(d) + b"\n")
        else:
            self._buf.append(
                " ".join(f"{k}={_text_value(v)}" for k, v in d.items()).encode() + b"\n"
            )
        if len(self._buf) > 512:
            self.flush()

    def flush(self) -> None:
        if not self._buf:
            return
        lines = len(self._buf)
        data = b"".join(self._buf)
        self._buf.clear()
        stream = self._stream or sys.stdout.buffer
        try:
            stream.write(data)
            stream.flush()
        except (OSError, ValueError) as exc:  # ValueError: the stream was closed
            if self._on_drop is not None:
                self._on_drop(lines)
            if not self._failing:
                self._failing = True
                log.warning(
                    "access log lines cannot be written (%s: %s); they are dropped and "
                    "counted in gateway_access_log_lines_dropped_total until writing works",
                    type(exc).__name__,
                    exc,
                )
            return
        if self._failing:
            self._failing = False
            log.warning("access log lines are written again")

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="access-log")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.flush()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            self.flush()


def _text_value(v: Any) -> str:
    """A value for a ``key=value`` line: bare when it is one word, else JSON."""
    if isinstance(v, str) and v and not any(c.isspace() or c in '"=' for c in v):
        return v
    return orjson.dumps(v).decode()
