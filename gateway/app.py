"""The Litestar application."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from litestar import Litestar

from .api.auth import auth_middleware
from .api.errors import EXCEPTION_HANDLERS
from .api.proxy import proxy_route
from .api.routes import ROUTES
from .runtime import Runtime


def create_app(runtime: Runtime) -> Litestar:
    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()

    app = Litestar(
        route_handlers=[
            proxy_route("/v1/chat/completions", "chat", "/chat/completions"),
            proxy_route("/v1/embeddings", "embeddings", "/embeddings"),
            *ROUTES,
        ],
        middleware=[auth_middleware],
        exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
        lifespan=[lifespan],
        openapi_config=None,
        request_max_body_size=runtime.max_body,
        logging_config=None,
    )
    app.state.runtime = runtime
    return app
