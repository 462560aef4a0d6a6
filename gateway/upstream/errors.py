"""Upstream failures, translated from the HTTP client's exceptions in one place.

    UpstreamError (GatewayError)          caller sees   retry same model   try fallback
    ├── UpstreamUnreachable               502           yes                yes
    ├── UpstreamTimeout                   504           yes                yes
    ├── UpstreamRateLimited (429)         503           yes (Retry-After)  yes
    ├── UpstreamServerError (5xx)         502           yes                yes
    ├── UpstreamAuthFailed (401/403)      502           no                 yes
    ├── UpstreamRejected (other 4xx)      upstream's    no                 no (request at fault)
    ├── UpstreamBadResponse (garbage)     502           yes                yes
    └── CircuitOpen                       503           no                 yes

Messages name the provider and model, never carry the provider's key, and pass the
upstream's own message on only after scrubbing anything that looks like a key.
"""

from __future__ import annotations

import re

import orjson

from ..errors import GatewayError

_KEYLIKE = re.compile(r"(sk|pk|rk|key|api[_-]?key)[-_A-Za-z0-9*]{8,}", re.IGNORECASE)


def scrub(text: str, secrets: tuple[str, ...] = ()) -> str:
    for s in secrets:
        if s:
            text = text.replace(s, "[redacted]")
    return _KEYLIKE.sub("[redacted]", text)


class UpstreamError(GatewayError):
    retryable = True
    fallback_ok = True

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str,
        provider: str,
        model: str,
        type: str = "upstream_error",
        retry_after: float | None = None,
        upstream_status: int | None = None,
        param: str | None = None,
    ) -> None:
        headers = {"retry-after": str(max(1, round(retry_after)))} if retry_after else None
        super().__init__(status, message, type=type, code=code, headers=headers, param=param)
        self.provider = provider
        self.model = model
        self.retry_after = retry_after
        self.upstream_status = upstream_status


class UpstreamUnreachable(UpstreamError):
    def __init__(self, provider: str, model: str, detail: str) -> None:
        super().__init__(
            502,
            f"Upstream provider {provider!r} (model {model!r}) is unreachable: {detail}.",
            code="upstream_unreachable",
            provider=provider,
            model=model,
        )


class UpstreamTimeout(UpstreamError):
    def __init__(self, provider: str, model: str, what: str, seconds: float) -> None:
        super().__init__(
            504,
            f"Upstream provider {provider!r} (model {model!r}) timed out: no {what} "
            f"within {seconds:g}s.",
            code="upstream_timeout",
            provider=provider,
            model=model,
        )


class UpstreamRateLimited(UpstreamError):
    def __init__(self, provider: str, model: str, retry_after: float | None, detail: str) -> None:
        super().__init__(
            503,
            f"Upstream provider {provider!r} (model {model!r}) is rate limiting the gateway's "
            f"account{': ' + detail if detail else ''}. Retry later.",
            code="upstream_rate_limited",
            provider=provider,
            model=model,
            retry_after=retry_after or 1.0,
            upstream_status=429,
        )


class UpstreamServerError(UpstreamError):
    def __init__(self, provider: str, model: str, status: int, detail: str) -> None:
        super().__init__(
            502,
            f"Upstream provider {provider!r} (model {model!r}) failed with HTTP {status}"
            f"{': ' + detail if detail else ''}.",
            code="upstream_error",
            provider=provider,
            model=model,
            upstream_status=status,
        )


class UpstreamAuthFailed(UpstreamError):
    retryable = False

    def __init__(self, provider: str, model: str, status: int) -> None:
        super().__init__(
            502,
            f"Upstream provider {provider!r} refused the gateway's credentials (HTTP {status}). "
            "This is a gateway configuration problem: check the provider's api_key.",
            code="upstream_auth_failed",
            provider=provider,
            model=model,
            upstream_status=status,
        )


class UpstreamRejected(UpstreamError):
    """The upstream says the request itself is wrong: pass its status and message on."""

    retryable = False
    fallback_ok = False

    def __init__(
        self,
        provider: str,
        model: str,
        status: int,
        detail: str,
        type: str,
        param: str | None,
        code: str | None,
    ) -> None:
        super().__init__(
            status,
            detail or f"Upstream provider {provider!r} rejected the request (HTTP {status}).",
            code=code or "upstream_rejected",
            type=type or "invalid_request_error",
            provider=provider,
            model=model,
            upstream_status=status,
            param=param,
        )


class UpstreamBadResponse(UpstreamError):
    def __init__(self, provider: str, model: str, detail: str) -> None:
        super().__init__(
            502,
            f"Upstream provider {provider!r} (model {model!r}) sent a response the gateway "
            f"cannot read: {detail}.",
            code="upstream_bad_response",
            provider=provider,
            model=model,
        )


class CircuitOpen(UpstreamError):
    retryable = False

    def __init__(self, provider: str, model: str, retry_after: float) -> None:
        super().__init__(
            503,
            f"Upstream provider {provider!r} (model {model!r}) is failing; the gateway stopped "
            f"sending it requests for {retry_after:.0f}s (circuit open).",
            code="upstream_circuit_open",
            provider=provider,
            model=model,
            retry_after=retry_after,
        )


def from_status(
    provider: str,
    model: str,
    status: int,
    body: bytes,
    retry_after: float | None,
    secrets: tuple[str, ...],
) -> UpstreamError:
    """Map an upstream non-2xx answer to the error the caller sees."""
    message, etype, param, code = _parse_error_body(body)
    message = scrub(message, secrets)[:2000]
    if status == 429:
        return UpstreamRateLimited(provider, model, retry_after, message)
    if status in (401, 403):
        return UpstreamAuthFailed(provider, model, status)
    if status >= 500 or status < 400:
        return UpstreamServerError(provider, model, status, message)
    if status == 404 and code == "model_not_found":
        # The request named a model the gateway knows, so this is configuration.
        return UpstreamServerError(provider, model, status, message)
    return UpstreamRejected(provider, model, status, message, etype, param, code)


def _parse_error_body(body: bytes) -> tuple[str, str, str | None, str | None]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body[:500].decode("utf-8", "replace").strip(), "", None, None
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict):
        return (
            str(err.get("message") or ""),
            str(err.get("type") or ""),
            err.get("param") if isinstance(err.get("param"), str) else None,
            err.get("code") if isinstance(err.get("code"), str) else None,
        )
    if isinstance(err, str):
        return err, "", None, None
    return "", "", None, None
