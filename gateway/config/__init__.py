"""Configuration: the deployment config and the hot-reloadable policy files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .catalog import Catalog, Model, build_catalog
from .deployment import GatewayConfig, ModelConfig, ProviderConfig
from .errors import ConfigError
from .loader import load_deployment, load_policy_files, policy_dir
from .snapshot import BudgetLimits, Policy, Route, Rule, Tenant, build_policy


@dataclass(frozen=True, slots=True)
class LoadedConfig:
    path: Path
    gateway: GatewayConfig
    catalog: Catalog
    policy_dir: Path


def load_config(path: str | Path) -> LoadedConfig:
    """Load and validate the deployment config (not the policies)."""
    cfg = load_deployment(path)
    return LoadedConfig(
        path=Path(path).resolve(),
        gateway=cfg,
        catalog=build_catalog(cfg),
        policy_dir=policy_dir(path, cfg),
    )


def load_policy(loaded: LoadedConfig) -> Policy:
    """Load, validate and compile every policy file against the catalog."""
    return build_policy(load_policy_files(loaded.policy_dir), loaded.catalog)


__all__ = [
    "BudgetLimits",
    "Catalog",
    "ConfigError",
    "GatewayConfig",
    "LoadedConfig",
    "Model",
    "ModelConfig",
    "Policy",
    "ProviderConfig",
    "Route",
    "Rule",
    "Tenant",
    "build_catalog",
    "build_policy",
    "load_config",
    "load_policy",
]
