"""``${ENV_VAR}`` substitution in config values.

Substitution runs on parsed YAML string values (never on the raw text), so a value from
the environment cannot change the structure of the file. ``${VAR:-default}`` gives a
default; ``$${`` is a literal ``${``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import ConfigError, format_problem

_VAR = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def substitute(value: Any, file: str | Path, env: Mapping[str, str] | None = None) -> Any:
    """Return ``value`` with every ``${VAR}`` in its strings replaced; unset vars are errors."""
    environ = os.environ if env is None else env
    problems: list[str] = []

    def walk(node: Any, path: tuple[str | int, ...]) -> Any:
        if isinstance(node, str):
            return _sub_str(node, path)
        if isinstance(node, dict):
            return {k: walk(v, (*path, str(k))) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v, (*path, i)) for i, v in enumerate(node)]
        return node

    def _sub_str(text: str, path: tuple[str | int, ...]) -> str:
        if "$" not in text:
            return text

        def repl(m: re.Match[str]) -> str:
            if m.group(0) == "$${":
                return "${"
            name, default = m.group(1), m.group(2)
            if name in environ:
                return environ[name]
            if default is not None:
                return default
            problems.append(format_problem(file, path, f"environment variable {name} is not set"))
            return ""

        return _VAR.sub(repl, text)

    out = walk(value, ())
    if problems:
        raise ConfigError(problems)
    return out
