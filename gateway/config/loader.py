"""Reading config files: YAML -> ``${ENV}`` substitution -> pydantic -> cross-checks.

Every problem is reported as ``file: key.path: problem``; all problems of a file are
reported together so an operator can fix them in one pass."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from .deployment import GatewayConfig
from .env import substitute
from .errors import ConfigError, format_problem
from .policy import PolicyFile

M = TypeVar("M", bound=BaseModel)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys instead of silently keeping the last one."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            mark = key_node.start_mark
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (line {mark.line + 1})", mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,
)


def read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from exc
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{path}: {where}invalid YAML: {problem}"]) from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: the top level must be a mapping, got {type(data).__name__}"])
    return data


def validate(model: type[M], data: Any, file: Path) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(pydantic_problems(exc, file)) from exc


def pydantic_problems(exc: ValidationError, file: Path) -> list[str]:
    problems = []
    for err in exc.errors(include_url=False):
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (not part of the config schema; check the spelling)"
        elif err["type"] == "missing":
            msg = "required key is missing"
        problems.append(format_problem(file, err["loc"], msg))
    return problems


def load_deployment(path: str | Path) -> GatewayConfig:
    file = Path(path)
    data = substitute(read_yaml(file), file)
    return validate(GatewayConfig, data, file)


def policy_dir(config_path: str | Path, config: GatewayConfig) -> Path:
    """Policy directory; a relative path is relative to the config file's folder."""
    p = Path(config.policies)
    return p if p.is_absolute() else (Path(config_path).resolve().parent / p).resolve()


def policy_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        raise ConfigError([f"{directory}: policy directory does not exist"])
    return sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")])


def load_policy_files(directory: Path) -> list[tuple[Path, PolicyFile]]:
    problems: list[str] = []
    out: list[tuple[Path, PolicyFile]] = []
    for file in policy_files(directory):
        try:
            out.append((file, validate(PolicyFile, substitute(read_yaml(file), file), file)))
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems)
    return out
