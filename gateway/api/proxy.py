"""``POST /v1/chat/completions`` and ``POST /v1/embeddings``: the proxied endpoints."""

from __future__ import annotations

import asyncio
import time

from litestar.handlers import asgi
from litestar.handlers.asgi_handlers import ASGIRouteHandler
from litestar.types import Receive, Scope, Send

from ..errors import method_not_allowed
from ..pipeline.context import RequestContext, new_request_id
from ..pipeline.run import handle
from ..runtime import Runtime
from .asgi import AsgiResponder, ClientDisconnected, read_body, send_error, watch_disconnect


def proxy_route(path: str, endpoint: str, upstream_path: str) -> ASGIRouteHandler:
    async def handler(scope: Scope, receive: Receive, send: Send) -> None:
        rt: Runtime = scope["litestar_app"].state.runtime
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
        watcher: asyncio.Task[None] | None = None

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
            if watcher is not None and not watcher.done():
                watcher.cancel()

    return asgi(path, name=f"proxy-{endpoint}", copy_scope=False)(handler)
