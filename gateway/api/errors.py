"""Litestar's own errors (unknown path, wrong method, bad parameters) and anything
unexpected, answered in OpenAI's error shape. A traceback never reaches a client."""

from __future__ import annotations

import logging
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException, NotFoundException
from litestar.exceptions.http_exceptions import MethodNotAllowedException

from ..errors import GatewayError, bad_request, internal, method_not_allowed, not_found

log = logging.getLogger("gateway.api")


def _respond(exc: GatewayError) -> Response[bytes]:
    return Response(
        content=exc.to_bytes(),
        status_code=exc.status,
        media_type="application/json",
        headers=exc.headers,
    )


def gateway_error(request: Request[Any, Any, Any], exc: GatewayError) -> Response[bytes]:
    route = request.scope.get("path_template") or "unmatched"  # never the raw path
    request.app.state.runtime.metrics.api_error(str(route), exc.status)
    return _respond(exc)


def http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
    if isinstance(exc, NotFoundException):
        err = not_found(f"No such endpoint: {request.method} {request.url.path}.")
    elif isinstance(exc, MethodNotAllowedException):
        err = method_not_allowed(f"{request.method} is not supported on {request.url.path}.")
    elif exc.status_code == 413:
        err = GatewayError(
            413, str(exc.detail), type="invalid_request_error", code="request_too_large"
        )
    elif exc.status_code < 500:
        err = bad_request(str(exc.detail))
        err.status = exc.status_code
    else:
        err = internal(request.headers.get("x-request-id", "-"))
    return _respond(err)


def unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return _respond(internal("-"))


EXCEPTION_HANDLERS = {
    GatewayError: gateway_error,
    HTTPException: http_error,
    Exception: unexpected,
}
