"""Turning what VTEX sends (feed items, later hook pushes) into journal entries.

Nothing here raises on bad input: a malformed item becomes a `rejected` journal
entry that keeps the raw item and the reason, so an operator can see it, and
the feed handle is still committed.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from omsd.state.events import IntentReceived, IntentRecorded, StatusChanged
from omsd.state.statuses import Status
from omsd.state.store import NewEntry, iso

_TIME = re.compile(r"^(?P<base>\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(?:\.(?P<frac>\d+))?(?P<tz>Z|[+-]\d{2}:?\d{2})?$")


class BadTime(ValueError):
    pass


def parse_time(text: str) -> datetime:
    """ISO-8601 as VTEX writes it: up to 7 fractional digits, `Z` or an offset.
    A timestamp without a zone is taken as UTC (VTEX documents UTC)."""
    match = _TIME.match(text.strip())
    if match is None:
        raise BadTime(f"not an ISO-8601 timestamp: {text[:40]!r}")
    frac = (match.group("frac") or "")[:6].ljust(6, "0")
    tz = match.group("tz") or "+00:00"
    if tz == "Z":
        tz = "+00:00"
    elif ":" not in tz:
        tz = f"{tz[:3]}:{tz[3:]}"
    try:
        return datetime.fromisoformat(f"{match.group('base')}.{frac}{tz}").astimezone(UTC)
    except ValueError as exc:
        raise BadTime(f"invalid timestamp {text[:40]!r}: {exc}") from None


@dataclass(frozen=True, slots=True)
class Intake:
    entry: NewEntry
    handle: str | None
    accepted: bool


class _Reject(Exception):
    pass


def status_dedup_key(order_id: str, state: str, change: datetime | None) -> str:
    """One key per (order, status, change time): the same change seen twice, by feed or
    hook, whatever the casing of the payload, is one event."""
    return f"status:{order_id}:{state}:{iso(change) if change else '-'}"


def _lower_keys(item: dict[str, Any]) -> dict[str, Any]:
    return {str(k).lower(): v for k, v in item.items()}


def _text(fields: dict[str, Any], name: str, *, required: bool) -> str | None:
    value = fields.get(name.lower())
    if value is None or value == "":
        if required:
            raise _Reject(f"missing field {name}")
        return None
    if not isinstance(value, str):
        raise _Reject(f"field {name} must be a string, got {type(value).__name__}")
    return value


def _time(fields: dict[str, Any], name: str, *, required: bool) -> datetime | None:
    text = _text(fields, name, required=required)
    if text is None:
        return None
    try:
        return parse_time(text)
    except BadTime as exc:
        raise _Reject(f"field {name}: {exc}") from None


def _raw(item: object) -> str:
    try:
        return json.dumps(item, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError):
        return repr(item)


def feed_item(item: object, received_at: datetime) -> Intake:
    """One feed item → an accepted StatusChanged entry, or a rejected one with its reason."""
    handle: str | None = None
    fields: dict[str, Any] = {}
    if isinstance(item, dict):
        fields = _lower_keys(item)
        h = fields.get("handle")
        handle = h if isinstance(h, str) and h else None
    try:
        if not isinstance(item, dict):
            raise _Reject(f"feed item must be a JSON object, got {type(item).__name__}")
        if handle is None:
            raise _Reject("missing field handle")
        event = _status_event(fields, source="feed")
    except _Reject as exc:
        return Intake(entry=rejected("feed", item, str(exc), received_at), handle=handle, accepted=False)
    return Intake(entry=_status_entry(event, received_at), handle=handle, accepted=True)


def _status_entry(event: StatusChanged, received_at: datetime) -> NewEntry:
    """Feed and hook alike: the dedup key makes the same change one event."""
    return NewEntry.of(
        event,
        source=event.source,
        received_at=received_at,
        dedup_key=status_dedup_key(event.order_id, event.state, event.current_change),
        event_id=f"{event.source}:{event.event_id}" if event.event_id else None,
    )


def _status_event(fields: dict[str, Any], *, source: str) -> StatusChanged:
    order_id = _text(fields, "orderId", required=True)
    state = _text(fields, "state", required=True)
    assert order_id is not None
    assert state is not None
    try:
        Status(state)
    except ValueError:
        raise _Reject(f"unknown status {state[:60]!r}") from None
    return StatusChanged(
        order_id=order_id,
        source="feed" if source == "feed" else "hook",
        state=state,
        last_state=_text(fields, "lastState", required=False),
        current_change=_time(fields, "currentChange", required=True),
        last_change=_time(fields, "lastChange", required=False),
        event_id=_text(fields, "eventId", required=False),
        domain=_text(fields, "domain", required=False),
    )


def intent_entry(
    marketplace_order_id: str, order_id: str | None, source: Literal["api", "cli"], received_at: datetime
) -> NewEntry:
    """An approval intent from the API or the command line. With the VTEX order id it goes
    straight to that order; without it the processor routes it by marketplace id (and
    parks it until an order with that id is known)."""
    event: IntentRecorded | IntentReceived
    if order_id:
        event = IntentRecorded(order_id=order_id, marketplace_order_id=marketplace_order_id, source=source)
    else:
        event = IntentReceived(marketplace_order_id=marketplace_order_id, source=source)
    return NewEntry.of(event, source=source, received_at=received_at)


def rejected(source: str, item: object, reason: str, received_at: datetime) -> NewEntry:
    """A journal row that keeps a bad item and why it was refused. The handle is left
    out of the stored item and of the dedup key: a redelivery is the same bad item."""
    kept = item
    if isinstance(item, dict):
        kept = {k: v for k, v in item.items() if str(k).lower() != "handle"}
    raw = _raw(kept)
    digest = hashlib.sha256(f"{source}:{raw}".encode()).hexdigest()[:32]
    return NewEntry(
        kind="rejected",
        source=source,
        payload=raw,
        received_at=received_at,
        reason=reason,
        dedup_key=f"rejected:{digest}",
        order_id=_guess_order_id(kept),
    )


def _guess_order_id(item: object) -> str | None:
    if isinstance(item, dict):
        value = _lower_keys(item).get("orderid")
        if isinstance(value, str) and value:
            return value[:100]
    return None


@dataclass(frozen=True, slots=True)
class HookIntake:
    """A hook push: a ping (touches nothing), an accepted event, or a rejection."""

    ping: bool
    entry: NewEntry | None
    reason: str | None = None
    account: str | None = None


def is_ping(body: object) -> bool:
    """VTEX's `{"hookConfig": "ping"}` probe (any casing), which carries no order."""
    if not isinstance(body, dict):
        return False
    fields = _lower_keys(body)
    return "hookconfig" in fields and "orderid" not in fields


def hook_item(body: object, received_at: datetime) -> HookIntake:
    """One push → an accepted StatusChanged entry, or a rejected entry with its reason.
    When `CurrentChange` is absent (VTEX's guide shows pushes without it), `LastChange`
    is taken as the change time; the dedup key is the feed's, so the same change seen
    by feed and hook is one event."""
    if is_ping(body):
        return HookIntake(ping=True, entry=None)
    try:
        if not isinstance(body, dict):
            raise _Reject(f"hook body must be a JSON object, got {type(body).__name__}")
        fields = _lower_keys(body)
        origin = fields.get("origin")
        if not isinstance(origin, dict):
            raise _Reject("missing field Origin")
        account = _text(_lower_keys(origin), "Account", required=True)
        if fields.get("currentchange") in (None, ""):
            if fields.get("lastchange") in (None, ""):
                raise _Reject("missing field CurrentChange (and LastChange)")
            fields = {**fields, "currentchange": fields.get("lastchange")}
        event = _status_event(fields, source="hook")
    except _Reject as exc:
        return HookIntake(ping=False, entry=rejected("hook", body, str(exc), received_at), reason=str(exc))
    return HookIntake(ping=False, entry=_status_entry(event, received_at), account=account)
