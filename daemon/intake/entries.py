"""Turning what arrives (feed items, hook pushes, notifications, intents) into journal entries.

Nothing here raises on bad input: a malformed item becomes a `rejected` journal entry that
keeps the raw item and the reason, so an operator can see it, and the feed handle is still
committed. Every entry made here can be stored: its texts are valid UTF-8 (a lone surrogate
never reaches JSON or SQLite)."""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from pydantic import (
    ValidationError,
)

from omsd.state.events import IntentReceived, IntentRecorded, NotificationReceived, StatusChanged
from omsd.state.store import NewEntry, iso

from .jsonsafe import MAX_DEPTH, deeper_than, safe_text, storable
from .wire import (
    FEED_NAMES,
    HANDLE_MAX,
    HOOK_NAMES,
    ORDER_ID,
    FeedItem,
    HookPush,
    ResultEnvelope,
    is_ping,
    present,
    reason_of,
)

REJECTED_BODY_MAX = 64 * 1024


"""The most of a rejected item or body kept in the journal (the rest: size and digest)."""


@dataclass(frozen=True, slots=True)
class Intake:
    entry: NewEntry
    handle: str | None
    accepted: bool
    changed_at: datetime | None = None  # an accepted status event's change time


def status_dedup_key(order_id: str, state: str, change: datetime | None) -> str:
    """One key per (order, status, change time): the same change seen twice, by feed or
    hook, whatever the casing of the payload, is one event."""
    return f"status:{order_id}:{state}:{iso(change) if change else '-'}"


def _raw(item: object) -> str:
    """Canonical JSON, ASCII only (a lone surrogate becomes a `\\u` escape); an item
    JSON cannot write (too deep, an int too long to print) is named by its type."""
    try:
        return json.dumps(item, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError):
        return json.dumps({"unrepresentable": type(item).__name__})


def feed_item(item: object, received_at: datetime) -> Intake:
    """One feed item → an accepted StatusChanged entry, or a rejected one with its reason.
    Never raises on content: whatever fails to parse, validate or serialise is rejected."""
    fields = present(item)
    handle = fields.get("handle") if isinstance(fields, dict) else None
    handle = handle if _valid_handle(handle) else None
    if not isinstance(item, dict):
        reason = f"feed item must be a JSON object, got {type(item).__name__}"
        return Intake(entry=rejected("feed", item, reason, received_at), handle=None, accepted=False)
    try:
        event = FeedItem.model_validate(item).event("feed")
        entry = _status_entry(event, received_at)
    except ValidationError as exc:
        reason = reason_of(exc, FEED_NAMES)
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        reason = f"unreadable feed item ({type(exc).__name__})"
    else:
        return Intake(entry=entry, handle=handle, accepted=True, changed_at=event.current_change)
    return Intake(entry=rejected("feed", item, reason, received_at), handle=handle, accepted=False)


def _valid_handle(value: object) -> bool:
    """A handle omsd can store and send back: what FeedItem accepts as `handle`."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= HANDLE_MAX
        and value.isascii()
        and value.isprintable()
        and " " not in value
    )


def _status_entry(event: StatusChanged, received_at: datetime) -> NewEntry:
    """Feed and hook alike: the dedup key makes the same change one event. Raises
    ValueError when the entry could not be stored as UTF-8 (never with valid ids)."""
    entry = NewEntry.of(
        event,
        source=event.source,
        received_at=received_at,
        dedup_key=status_dedup_key(event.order_id, event.state, event.current_change),
        event_id=f"{event.source}:{event.event_id}" if event.event_id else None,
    )
    if not all(storable(text) for text in (entry.payload, entry.dedup_key or "", entry.event_id or "")):
        raise ValueError("entry is not valid UTF-8")
    return entry


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


def rejected(
    source: str, item: object, reason: str, received_at: datetime, *, limit: int = REJECTED_BODY_MAX
) -> NewEntry:
    """A journal row that keeps a bad item and why it was refused. The handle is left
    out of the stored item and of the dedup key: a redelivery is the same bad item.
    An item whose JSON is longer than `limit` or nests deeper than MAX_DEPTH (a reader
    could not parse it back) is kept as its head, size and digest."""
    kept = item
    if isinstance(item, dict):
        kept = {k: v for k, v in item.items() if str(k).lower() != "handle"}
    raw = _raw(kept)
    if len(raw) > limit or deeper_than(raw, MAX_DEPTH):
        raw = body_summary(raw.encode("ascii"), limit)
    return _rejected_row(source, raw, reason, received_at, _guess_order_id(kept))


def rejected_body(source: str, body: bytes, reason: str, received_at: datetime, *, limit: int) -> NewEntry:
    """A journal row that keeps a request body that is not JSON (or not text): as a JSON
    string when it is short UTF-8 text, else as its head (text or base64), size and digest."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    raw = json.dumps(text) if text is not None and len(body) <= limit else body_summary(body, limit)
    return _rejected_row(source, raw, reason, received_at, None)


def body_summary(body: bytes, limit: int) -> str:
    """JSON naming `body` by size and sha256, with at most `limit` bytes of its head:
    as `text` when that head is UTF-8, else as `base64`."""
    head = body[: max(0, limit - 200)]
    summary: dict[str, Any] = {
        "size": len(body),
        "sha256": hashlib.sha256(body).hexdigest(),
        "truncated": len(head) < len(body),
    }
    for cut in range(4):  # the limit may fall inside a multi-byte character
        try:
            summary["text"] = head[: len(head) - cut].decode("utf-8")
            break
        except UnicodeDecodeError:
            continue
    else:
        summary["base64"] = base64.b64encode(head[: (len(head) // 4) * 3]).decode("ascii")
    return json.dumps(summary, sort_keys=True)


def _rejected_row(source: str, raw: str, reason: str, received_at: datetime, order_id: str | None) -> NewEntry:
    digest = hashlib.sha256(f"{source}:{raw}".encode()).hexdigest()[:32]
    return NewEntry(
        kind="rejected",
        source=source,
        payload=raw,
        received_at=received_at,
        reason=safe_text(reason[:1000]),
        dedup_key=f"rejected:{digest}",
        order_id=order_id,
    )


def _guess_order_id(item: object) -> str | None:
    """The item's order id, when it is a well-formed one (so `omsd journal --order` finds it)."""
    fields = present(item)
    value = fields.get("orderid") if isinstance(fields, dict) else None
    try:
        return ORDER_ID.validate_python(value)
    except ValidationError:
        return None


@dataclass(frozen=True, slots=True)
class HookIntake:
    """A hook push: a ping (touches nothing), an accepted event, or a rejection."""

    ping: bool
    entry: NewEntry | None
    reason: str | None = None
    account: str | None = None


def hook_item(body: object, received_at: datetime) -> HookIntake:
    """One push → an accepted StatusChanged entry, or a rejected entry with its reason.
    The dedup key is the feed's, so the same change seen by feed and hook is one event."""
    if is_ping(body):
        return HookIntake(ping=True, entry=None)
    if not isinstance(body, dict):
        reason = f"hook body must be a JSON object, got {type(body).__name__}"
        return HookIntake(ping=False, entry=rejected("hook", body, reason, received_at), reason=reason)
    try:
        push = HookPush.model_validate(body)
        entry = _status_entry(push.event("hook"), received_at)
    except ValidationError as exc:
        reason = reason_of(exc, HOOK_NAMES)
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        reason = f"unreadable push ({type(exc).__name__})"
    else:
        return HookIntake(ping=False, entry=entry, account=push.origin.account)
    return HookIntake(ping=False, entry=rejected("hook", body, reason, received_at), reason=reason)


def notification_entry(
    env: ResultEnvelope, received_at: datetime, *, authenticated: bool, body: str | None = None
) -> NewEntry:
    """A processing-result notification → its journal entry; the same operation and code
    seen twice is one event. `authenticated` says it came by omsd's capability URL (or
    from an operator's `omsd ingest`); an unauthenticated copy is journaled but never
    acted on, and never deduplicates away the authenticated one. `body`: the request's
    body as received (kept for the connector, which may want it re-posted unchanged)."""
    event = NotificationReceived(
        marketplace_order_id=env.marketplace_order_id,
        code=env.code,
        flow=env.flow,
        success=env.success,
        operation_id=env.operation_id,
        message=env.message,
        account=env.account_name,
        authenticated=authenticated,
        body=body,
    )
    dedup = f"notification:{env.operation_id}:{env.code}" if env.operation_id else None
    if dedup and not authenticated:
        dedup += ":unauthenticated"
    return NewEntry.of(event, source="notification", received_at=received_at, dedup_key=dedup)
