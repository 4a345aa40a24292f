"""VTEX's time format: ISO-8601 with up to 7 fractional digits, `Z` or an offset, in this century."""

from __future__ import annotations

from datetime import UTC, datetime

EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)


LATEST = datetime(2100, 1, 1, tzinfo=UTC)


class BadTime(ValueError):
    pass


def parse_time(text: str) -> datetime:
    """ISO-8601 as VTEX writes it: up to 7 fractional digits, `Z` or an offset.
    A timestamp without a zone is taken as UTC (VTEX documents UTC). Times outside
    EARLIEST..LATEST are refused (also those that overflow when moved to UTC)."""
    try:
        value = datetime.fromisoformat(_six_digit_fraction(text.strip()))
        value = value.replace(tzinfo=value.tzinfo or UTC).astimezone(UTC)
    except OverflowError:
        raise BadTime(f"timestamp out of range: {_escaped(text[:40])!r}") from None
    except ValueError as exc:
        raise BadTime(f"not an ISO-8601 timestamp: {_escaped(text[:40])!r} ({exc})") from None
    if not EARLIEST <= value < LATEST:
        raise BadTime(f"timestamp out of range {EARLIEST.year}..{LATEST.year}: {_escaped(text[:40])!r}")
    return value


def _six_digit_fraction(text: str) -> str:
    """VTEX writes 7 fractional digits (`...41.8830000Z`); datetime takes at most 6."""
    head, dot, rest = text.partition(".")
    if not dot:
        return text
    digits = len(rest) - len(rest.lstrip("0123456789"))
    return f"{head}.{rest[: min(digits, 6)]}{rest[digits:]}"


def _escaped(text: str) -> str:
    """`text` with anything UTF-8 cannot hold (lone surrogates) written as `\\u` escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
