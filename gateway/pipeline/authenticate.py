"""Stage 1, authenticate: ``Authorization: Bearer <key>`` -> tenant.

Keys are stored only as SHA-256 digests; the presented key is hashed and looked up by
digest, so neither the lookup's timing nor any log line depends on the key itself. The
client's key is never forwarded upstream (the upstream gets the provider's key)."""

from __future__ import annotations

import hashlib
import hmac

from ..config.snapshot import Policy, Tenant
from ..errors import unauthorized
from .context import RequestContext

_MISSING = (
    "Missing API key. Send your gateway key as 'Authorization: Bearer <key>' "
    "(the OpenAI SDK does this when you pass api_key=...)."
)
_MALFORMED = "Malformed Authorization header; expected 'Bearer <key>'."
_WRONG = "Incorrect API key provided. Check the key your gateway operator gave you."


def fingerprint(digest: bytes) -> str:
    """A short, non-reversible id for logs and the ledger."""
    return digest.hex()[:12]


def key_digest(header: bytes | str | None) -> bytes:
    """The SHA-256 digest of the bearer token in an Authorization header value."""
    if not header:
        raise unauthorized(_MISSING)
    raw = header.encode("latin-1") if isinstance(header, str) else header
    scheme, _, token = raw.partition(b" ")
    token = token.strip()
    if scheme.lower() != b"bearer" or not token:
        raise unauthorized(_MALFORMED)
    return hashlib.sha256(token).digest()


def tenant_for(policy: Policy, header: bytes | str | None) -> tuple[Tenant, str]:
    digest = key_digest(header)
    tenant = policy.keys.get(digest)
    if tenant is None:
        raise unauthorized(_WRONG)
    return tenant, fingerprint(digest)


def is_admin(admin_digests: frozenset[bytes], header: bytes | str | None) -> bool:
    digest = key_digest(header)
    return any(hmac.compare_digest(digest, d) for d in admin_digests)


def authenticate(ctx: RequestContext) -> None:
    digest = key_digest(ctx.headers.get(b"authorization"))
    tenant = ctx.policy.keys.get(digest)
    if tenant is None:
        raise unauthorized(_WRONG)
    ctx.tenant, ctx.key_fp = tenant, fingerprint(digest)
    ctx.key_limits = ctx.policy.key_limits.get(digest)
