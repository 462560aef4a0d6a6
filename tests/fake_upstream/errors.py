"""Error bodies in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``,
with the messages, types and codes the real API uses for each status."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# status -> (type, code, message); ``{model}`` is filled in.
_KNOWN: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Invalid request."),
    401: (
        "invalid_request_error",
        "invalid_api_key",
        "Incorrect API key provided. You can find your API key at "
        "https://platform.openai.com/account/api-keys.",
    ),
    403: (
        "invalid_request_error",
        "unsupported_country_region_territory",
        "Country, region, or territory not supported",
    ),
    404: (
        "invalid_request_error",
        "model_not_found",
        "The model `{model}` does not exist or you do not have access to it.",
    ),
    429: (
        "requests",
        "rate_limit_exceeded",
        "Rate limit reached for {model} in organization org-fake on requests per min (RPM): "
        "Limit 3, Used 3, Requested 1. Please try again in 20s.",
    ),
    500: (
        "server_error",
        None,
        "The server had an error while processing your request. Sorry about that!",
    ),
    502: ("server_error", None, "Bad gateway."),
    503: ("server_error", None, "The engine is currently overloaded, please try again later."),
    504: ("server_error", None, "Gateway timeout."),
}

MISSING_KEY = (
    "You didn't provide an API key. You need to provide your API key in an Authorization "
    "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
)


def error_body(
    status: int,
    model: str = "",
    *,
    message: str | None = None,
    param: str | None = None,
    code: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The body OpenAI answers with ``status``; arguments replace its defaults."""
    kind, default_code, default_message = _KNOWN.get(
        status,
        ("server_error" if status >= 500 else "invalid_request_error", None, f"Error {status}."),
    )
    error: dict[str, Any] = {
        "message": message or default_message.format(model=model or "unknown"),
        "type": kind,
        "param": param,
        "code": code or default_code,
    }
    if overrides:
        error.update(overrides)
    return {"error": error}
