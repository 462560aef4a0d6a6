"""``POST /v1/chat/completions`` and ``POST /v1/embeddings``: the proxied endpoints.

They are plain ASGI apps dispatched before Litestar (see :class:`ProxyFastPath`): its
router, middleware stack and exception layer cost about a tenth of a request's CPU, and
these endpoints need none of them (the pipeline authenticates and answers its own
errors)."""

from __future__ import annotations

import asyncio
import time

from litestar.types import ASGIApp, Receive, Scope, Send

from ..errors import method_not_allowed
from ..pipeline.context import RequestContext, new_request_id
from ..pipeline.run import handle
from ..runtime import Runtime
from .asgi import AsgiResponder, ClientDisconnected, Watch, read_body, send_error, watch_disconnect


def proxy_endpoint(rt: Runtime, path: str, endpoint: str, upstream_path: str) -> ASGIApp:
    async def handler(scope: Scope, receive: Receive, send: Send) -> None:
        method = scope.get("method", "")
        if method != "POST":
            await send_error(
                send,
                method_not_allowed(f"{method} is not supported on {path}; use POST."),
                [(b"allow", b"POST")],
            )
            return
        now_ms = rt.clock.now_ms()
        headers = dict(scope["headers"])
        out = AsgiResponder(send)
        task = asyncio.current_task()
        assert task is not None
        watcher: Watch | None = None

        async def body() -> bytes:
            nonlocal watcher
            try:
                raw = await read_body(receive, headers, rt.max_body)
            except ClientDisconnected:
                out.disconnected = True
                raise
            watcher = watch_disconnect(receive, out, task)
            return raw

        ctx = RequestContext(
            runtime=rt,
            endpoint=endpoint,
            upstream_path=upstream_path,
            request_id=new_request_id(now_ms),
            started=time.perf_counter(),
            started_ms=now_ms,
            policy=rt.policy,
            headers=headers,
            read_body=body,
        )
        rt.metrics.in_flight.inc()
        try:
            await handle(ctx, out)
        except asyncio.CancelledError:
            # The client went away (the watcher cancelled us); finish() already ran
            # shielded. Anything else cancelling us (shutdown) propagates.
            if not out.disconnected or task.uncancel() > 0:
                raise
        finally:
            rt.metrics.in_flight.dec()
            if watcher is not None:
                watcher.stop()

    return handler


class ProxyFastPath:
    """Sends the proxied paths straight to their endpoint, everything else to ``app``."""

    def __init__(self, app: ASGIApp, routes: dict[str, ASGIApp]) -> None:
        self.app = app
        self._routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":  # type: ignore[comparison-overlap]
            route = self._routes.get(scope["path"])
            if route is not None:
                await route(scope, receive, send)
                return
        await self.app(scope, receive, send)
