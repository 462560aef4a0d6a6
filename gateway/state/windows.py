"""UTC calendar windows and rate-limit minutes, from integer milliseconds.

The Redis Lua scripts compute the same periods (``lua/lib_windows.lua``); a test checks
that both agree across day, month and year boundaries."""

from __future__ import annotations

from datetime import UTC, datetime
from functools import lru_cache

DAY_MS = 86_400_000
MINUTE_MS = 60_000


# Periods change once a day: every request asks for them (admit, settle, usage), so
# the calendar arithmetic is done once per day, not several times a request.
@lru_cache(maxsize=16)
def _civil_day(day: int) -> tuple[int, int, int]:
    d = datetime.fromtimestamp(day * (DAY_MS // 1000), tz=UTC)
    return d.year, d.month, d.day


def period(window: str, ms: int) -> str:
    """The id of the window period containing ``ms``: ``d20261126``, ``m202611``, ``t``."""
    try:
        return periods(ms)[window]
    except KeyError:
        raise ValueError(window) from None


def periods(ms: int) -> dict[str, str]:
    """The ids of the periods containing ``ms``, by window (``daily``, ``monthly``,
    ``total``). Shared between callers: read it, never change it."""
    return _periods_day(ms // DAY_MS)


@lru_cache(maxsize=16)
def _periods_day(day: int) -> dict[str, str]:
    y, m, d = _civil_day(day)
    return {"daily": f"d{y:04d}{m:02d}{d:02d}", "monthly": f"m{y:04d}{m:02d}", "total": "t"}


def resets_at(window: str, ms: int) -> int | None:
    """When the period containing ``ms`` ends (ms), or None for ``total``."""
    if window == "total":
        return None
    if window == "daily":
        return (ms // DAY_MS + 1) * DAY_MS
    return _month_end(ms // DAY_MS)


@lru_cache(maxsize=16)
def _month_end(day: int) -> int:
    y, m, _ = _civil_day(day)
    y, m = (y + 1, 1) if m == 12 else (y, m + 1)
    return int(datetime(y, m, 1, tzinfo=UTC).timestamp()) * 1000


def minute(ms: int) -> int:
    return ms // MINUTE_MS
