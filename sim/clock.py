"""Time as VTEX writes it: UTC with seven fractional digits and a Z (§1.2), never repeating."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta


def vtex_time(dt: datetime) -> str:
    """VTEX's feed format: UTC with 7 fractional digits and a Z."""
    dt = dt.astimezone(UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond:06d}0Z"


class Clock:
    """Wall-clock time that moves forward on every read, so two changes never share a timestamp."""

    def __init__(self) -> None:
        self._last = datetime.now(UTC)

    def now(self) -> datetime:
        now = datetime.now(UTC)
        if now <= self._last:
            now = self._last + timedelta(microseconds=1)
        self._last = now
        return now
