"""Config errors name the file, the key path and the problem."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path


class ConfigError(Exception):
    """One or more problems in a deployment config or policy file."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def format_problem(file: str | Path, path: Iterable[str | int], problem: str) -> str:
    where = ".".join(str(p) for p in path)
    return f"{file}: {where}: {problem}" if where else f"{file}: {problem}"
