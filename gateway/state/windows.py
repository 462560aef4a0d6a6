"""UTC calendar windows and rate-limit minutes, from integer milliseconds.

The Redis Lua scripts compute the same periods (``lua/lib_windows.lua``); a test checks
that both agree across day, month and year boundaries."""

from __future__ import annotations

from datetime import UTC, datetime

DAY_MS = 86_400_000
MINUTE_MS = 60_000


def civil(ms: int) -> tuple[int, int, int]:
    d = datetime.fromtimestamp(ms // 1000, tz=UTC)
    return d.year, d.month, d.day


def period(window: str, ms: int) -> str:
    """The id of the window period containing ``ms``: ``d20261126``, ``m202611``, ``t``."""
    if window == "total":
        return "t"
    y, m, d = civil(ms)
    if window == "daily":
        return f"d{y:04d}{m:02d}{d:02d}"
    if window == "monthly":
        return f"m{y:04d}{m:02d}"
    raise ValueError(window)


def resets_at(window: str, ms: int) -> int | None:
    """When the period containing ``ms`` ends (ms), or None for ``total``."""
    if window == "total":
        return None
    if window == "daily":
        return (ms // DAY_MS + 1) * DAY_MS
    y, m, _ = civil(ms)
    y, m = (y + 1, 1) if m == 12 else (y, m + 1)
    return int(datetime(y, m, 1, tzinfo=UTC).timestamp()) * 1000


def minute(ms: int) -> int:
    return ms // MINUTE_MS
