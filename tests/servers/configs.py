"""Config builders for tests: a fake upstream provider plus the mock, and tenants."""

from __future__ import annotations

import hashlib
import json
from typing import Any

# Prices (USD per 1M tokens) chosen so costs are easy to check by hand.
CHEAP = {"input": 1, "cached_input": 0.5, "output": 2}
PREMIUM = {"input": 10, "cached_input": 5, "output": 30}
EMBED = {"input": 0.1}
PROVIDER_KEY = "sk-provider-secret-0123456789"


def key_hash(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def gateway_config(
    fake_url: str | None = None, *, state: str = "memory://", **extra: Any
) -> dict[str, Any]:
    providers: dict[str, Any] = {"mock": {"type": "mock"}}
    models: dict[str, Any] = {
        "mock-chat": {"provider": "mock", "tier": "cheap", "price": CHEAP},
        "mock-embed": {"provider": "mock", "kind": "embedding", "price": EMBED},
    }
    if fake_url is not None:
        providers["fake"] = {
            "type": "openai",
            "base_url": fake_url,
            "api_key": PROVIDER_KEY,
            "timeouts": {"connect": 2, "first_byte": 10, "idle": 10, "non_stream": 30},
            "retries": {"max_attempts": 1},
        }
        models.update(
            {
                "cheap": {
                    "provider": "fake",
                    "upstream_model": "fake-cheap",
                    "tier": "cheap",
                    "price": CHEAP,
                    "max_output_tokens": 1000,
                },
                "premium": {
                    "provider": "fake",
                    "upstream_model": "fake-premium",
                    "tier": "premium",
                    "price": PREMIUM,
                    "max_output_tokens": 1000,
                },
                "embed": {
                    "provider": "fake",
                    "upstream_model": "fake-embed",
                    "kind": "embedding",
                    "price": EMBED,
                },
            }
        )
    cfg: dict[str, Any] = {
        "state": state,
        "admin_keys": [key_hash("admin-key")],
        "providers": providers,
        "models": models,
        "logging": {"level": "warning", "access_log": False},
    }
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    return cfg


def tenant(key: str, **policy: Any) -> dict[str, Any]:
    return {"keys": [key_hash(key)], **policy}


def policy(tenants: dict[str, Any], routes: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"version": 1, "tenants": tenants, "routes": routes or {}}


def directive(**kw: Any) -> dict[str, Any]:
    """Body fields telling the fake upstream how to behave (see tests/fake_upstream)."""
    return {"metadata": {"fake": json.dumps(kw)}}
