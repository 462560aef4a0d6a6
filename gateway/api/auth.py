"""Authentication for every route, except an explicit short list.

Like TensorZero's ``UNAUTHENTICATED_ROUTES``: a new route is authenticated unless
someone adds it here on purpose. ``/admin/...`` needs an admin key. The two proxied
endpoints never reach this middleware: they are dispatched before Litestar
(:class:`gateway.api.proxy.ProxyFastPath`) and authenticate as the first stage of the
request pipeline; they are listed below so that is visible here too."""

from __future__ import annotations

from typing import TYPE_CHECKING

from litestar.types import ASGIApp, Receive, Scope, Send

from ..errors import GatewayError, unauthorized
from ..pipeline.authenticate import is_admin, tenant_for
from .asgi import send_error

if TYPE_CHECKING:
    from ..runtime import Runtime

UNAUTHENTICATED_ROUTES = frozenset({"/healthz", "/readyz", "/metrics"})
PIPELINE_AUTHENTICATED_ROUTES = frozenset({"/v1/chat/completions", "/v1/embeddings"})
ADMIN_PREFIX = "/admin"


def auth_middleware(app: ASGIApp) -> ASGIApp:
    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if (
            scope["type"] != "http"  # type: ignore[comparison-overlap]
            or path in UNAUTHENTICATED_ROUTES
            or path in PIPELINE_AUTHENTICATED_ROUTES
        ):
            await app(scope, receive, send)
            return
        rt: Runtime = scope["litestar_app"].state.runtime
        header = dict(scope["headers"]).get(b"authorization")
        try:
            if path == ADMIN_PREFIX or path.startswith(ADMIN_PREFIX + "/"):
                if not rt.admin_keys or not is_admin(rt.admin_keys, header):
                    raise unauthorized(
                        "This endpoint needs an admin key (admin_keys in gateway.yaml)."
                    )
                scope["state"]["gateway_admin"] = True
            else:
                tenant, fp = tenant_for(rt.policy, header)
                scope["state"]["gateway_tenant"] = tenant
                scope["state"]["gateway_key_fp"] = fp
        except GatewayError as exc:
            await send_error(send, exc)
            return
        await app(scope, receive, send)

    return middleware
