"""Reaching models: one interface (:mod:`.base`), an HTTP transport and the mock."""

from __future__ import annotations

from collections.abc import Mapping

from ..config.deployment import ProviderConfig
from ..tokens import TokenCounter
from .base import ByteStream, JsonResponse, Upstream
from .errors import UpstreamError
from .http import HttpUpstream
from .mock import MockUpstream


def build_upstreams(
    providers: Mapping[str, ProviderConfig], tokens: TokenCounter
) -> dict[str, Upstream]:
    out: dict[str, Upstream] = {}
    for name, cfg in providers.items():
        out[name] = (
            MockUpstream(name, cfg, tokens) if cfg.type == "mock" else HttpUpstream(name, cfg)
        )
    return out


__all__ = ["ByteStream", "JsonResponse", "Upstream", "UpstreamError", "build_upstreams"]
