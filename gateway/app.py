"""The Litestar application."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from litestar import Litestar
from litestar.types import ASGIApp

from .api.auth import auth_middleware
from .api.end_users import END_USER_ROUTES
from .api.errors import EXCEPTION_HANDLERS
from .api.proxy import ProxyFastPath, proxy_endpoint
from .api.routes import ROUTES
from .gctune import tune_after_startup
from .runtime import Runtime

PROXIED = {
    "/v1/chat/completions": ("chat", "/chat/completions"),
    "/v1/embeddings": ("embeddings", "/embeddings"),
}


def create_app(runtime: Runtime, *, tune_gc: bool = False) -> ASGIApp:
    """The Litestar app, with the proxied endpoints dispatched in front of it.
    ``tune_gc``: set the garbage collector for serving once started (see gctune); only
    for a process that does nothing but serve."""
    litestar = create_litestar(runtime, tune_gc)
    routes = {
        path: proxy_endpoint(runtime, path, endpoint, upstream)
        for path, (endpoint, upstream) in PROXIED.items()
    }
    return ProxyFastPath(litestar, routes)


def create_litestar(runtime: Runtime, tune_gc: bool = False) -> Litestar:
    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        await runtime.start()
        if tune_gc:
            tune_after_startup()
        try:
            yield
        finally:
            await runtime.stop()

    app = Litestar(
        route_handlers=[*ROUTES, *END_USER_ROUTES],
        middleware=[auth_middleware],
        exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
        lifespan=[lifespan],
        openapi_config=None,
        request_max_body_size=runtime.max_body,
        logging_config=None,
    )
    app.state.runtime = runtime
    return app
