"""The model catalog compiled from the deployment config: concrete models and aliases."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..money import Price
from .deployment import GatewayConfig


@dataclass(frozen=True, slots=True)
class Model:
    name: str
    provider: str
    upstream_model: str
    kind: str  # "chat" | "embedding"
    tier: str  # "cheap" | "premium"
    price: Price
    max_output_tokens: int
    max_tokens_param: str
    encoding: str | None
    image_tokens: int
    fallbacks: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Catalog:
    models: Mapping[str, Model]
    aliases: Mapping[str, str]

    def resolve(self, name: str) -> Model | None:
        """A concrete model by its name or an alias; ``None`` if neither."""
        model = self.models.get(name)
        if model is None:
            target = self.aliases.get(name)
            if target is not None:
                model = self.models.get(target)
        return model

    def chain(self, model: Model) -> tuple[Model, ...]:
        """The model followed by its fallbacks, each once, in order."""
        out = [model]
        seen = {model.name}
        queue = list(model.fallbacks)
        while queue:
            name = queue.pop(0)
            if name in seen:
                continue
            seen.add(name)
            fb = self.models[name]
            out.append(fb)
        return tuple(out)

    def known(self, name: str) -> bool:
        return name in self.models or name in self.aliases


def build_catalog(config: GatewayConfig) -> Catalog:
    models = {
        name: Model(
            name=name,
            provider=m.provider,
            upstream_model=m.upstream_model or name,
            kind=m.kind,
            tier=m.tier,
            price=m.price.to_price(),
            max_output_tokens=m.max_output_tokens,
            max_tokens_param=m.max_tokens_param,
            encoding=m.encoding,
            image_tokens=m.image_tokens,
            fallbacks=tuple(m.fallbacks),
        )
        for name, m in config.models.items()
    }
    return Catalog(models=models, aliases=dict(config.aliases))
