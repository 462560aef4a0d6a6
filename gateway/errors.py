"""Every error the gateway answers, in OpenAI's shape.

    GatewayError                      status  type / code
    ├── bad_request()                 400     invalid_request_error
    ├── unauthorized()                401     authentication_error / invalid_api_key
    ├── budget_exceeded()             402     insufficient_quota / budget_exceeded
    ├── model_not_allowed()           403     permission_error / model_not_allowed
    ├── model_not_found()             404     invalid_request_error / model_not_found
    ├── idempotency_conflict()        409     conflict_error / idempotency_in_progress
    ├── body_too_large()              413     invalid_request_error / request_too_large
    ├── unsupported_media_type()      415     invalid_request_error / unsupported_media_type
    ├── idempotency_mismatch()        422     invalid_request_error / idempotency_key_reused
    ├── rate_limited()                429     rate_limit_exceeded
    ├── internal()                    500     server_error (never carries a traceback)
    ├── upstream failures             502 / 503 / 504 (see gateway.upstream.errors)
    └── state_unavailable()           503     service_unavailable / state_backend_unavailable

Messages say what went wrong and what to do about it. They never contain a key.
"""

from __future__ import annotations

from typing import Any

import orjson


class GatewayError(Exception):
    """An error answered to the caller as ``{"error": {message, type, param, code}}``."""

    __slots__ = ("code", "headers", "message", "param", "status", "type")

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}

    @property
    def error_code(self) -> str:
        """The short name used in the ledger and in metrics."""
        return self.code or self.type

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def to_bytes(self) -> bytes:
        return orjson.dumps(self.body())

    def __repr__(self) -> str:
        return f"GatewayError({self.status}, {self.error_code!r}, {self.message!r})"


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> GatewayError:
    return GatewayError(400, message, type="invalid_request_error", param=param, code=code)


def bad_cursor() -> GatewayError:
    """A ledger page's ``cursor`` that no page of this gateway's state backend gave out."""
    return bad_request(
        "cursor is not one this ledger gave out: pass a page's next_cursor, or no cursor "
        "for the first page.",
        param="cursor",
    )


def unauthorized(message: str) -> GatewayError:
    return GatewayError(401, message, type="authentication_error", code="invalid_api_key")


def budget_exceeded(
    message: str, *, code: str = "budget_exceeded", scope: str = "tenant"
) -> GatewayError:
    """402. ``scope`` says whose money ran out: the tenant's or its end user's (also in the
    ``x-gateway-budget-scope`` header, and as ``param`` 'user' for an end user's)."""
    return GatewayError(
        402,
        message,
        type="insufficient_quota",
        code=code,
        param="user" if scope == "end_user" else None,
        headers={"x-gateway-budget-scope": scope},
    )


def model_not_allowed(message: str) -> GatewayError:
    return GatewayError(
        403, message, type="permission_error", code="model_not_allowed", param="model"
    )


def model_not_found(message: str) -> GatewayError:
    return GatewayError(
        404, message, type="invalid_request_error", code="model_not_found", param="model"
    )


def not_found(message: str) -> GatewayError:
    return GatewayError(404, message, type="invalid_request_error", code="not_found")


def method_not_allowed(message: str) -> GatewayError:
    return GatewayError(405, message, type="invalid_request_error", code="method_not_allowed")


def idempotency_conflict(message: str, retry_after: int = 1) -> GatewayError:
    return GatewayError(
        409,
        message,
        type="conflict_error",
        code="idempotency_in_progress",
        headers={"retry-after": str(retry_after)},
    )


def body_too_large(limit: int) -> GatewayError:
    return GatewayError(
        413,
        f"Request body is larger than the gateway's limit of {limit} bytes.",
        type="invalid_request_error",
        code="request_too_large",
    )


def unsupported_media_type(got: str) -> GatewayError:
    return GatewayError(
        415,
        f"Content-Type must be application/json, got {got or 'nothing'!r}.",
        type="invalid_request_error",
        code="unsupported_media_type",
    )


def idempotency_mismatch(key: str) -> GatewayError:
    return GatewayError(
        422,
        f"Idempotency-Key {key!r} was already used with a different request body. "
        "Use a new key for a new request.",
        type="invalid_request_error",
        code="idempotency_key_reused",
    )


def rate_limited(message: str, retry_after_s: float, headers: dict[str, str]) -> GatewayError:
    retry = max(1, int(-(-retry_after_s // 1)))
    return GatewayError(
        429,
        message,
        type="requests",
        code="rate_limit_exceeded",
        headers={**headers, "retry-after": str(retry)},
    )


def internal(request_id: str) -> GatewayError:
    return GatewayError(
        500,
        f"The gateway failed unexpectedly while handling request {request_id}. "
        "The error is logged under that id; nothing was charged.",
        type="server_error",
        code="internal_error",
    )


def state_unavailable(detail: str) -> GatewayError:
    return GatewayError(
        503,
        f"The gateway's state backend is unavailable ({detail}); budgets cannot be checked, "
        "so no request is forwarded. Retry shortly.",
        type="service_unavailable",
        code="state_backend_unavailable",
        headers={"retry-after": "1"},
    )
