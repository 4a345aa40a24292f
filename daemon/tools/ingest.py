"""`omsd ingest` and `omsd export`: events captured elsewhere into the journal, and back.

Input is a JSON array or JSON lines. Each item is a feed item (as `GET /api/orders/feed`
returns it), a hook push (PascalCase), a processing-result notification, or a journal
row as `omsd export` writes it; the kind is detected per item or forced. Feed items,
pushes and notifications go through the live intake's own builders (same validation,
same dedup keys); journal rows keep their kind, version, time and keys.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from pydantic import ValidationError

from omsd.state.batch import Transition
from omsd.state.events import UnreadableEntry, read_entry
from omsd.state.models import Policy
from omsd.state.store import NewEntry, Store, from_iso

from ..intake import entries, wire
from ..intake.jsonsafe import MAX_DEPTH, deeper_than
from ..pipeline.processor import Processor

Kind = Literal["feed", "hook", "notification", "journal"]
KINDS: tuple[Kind, ...] = ("feed", "hook", "notification", "journal")
MAX_INPUT = 256 * 2**20  # bytes: the input is held in memory whole
JOURNAL_FIELDS = ("kind", "version", "source", "order_id", "dedup_key", "event_id", "payload", "reason", "received_at")


@dataclass(frozen=True, slots=True)
class Line:
    """One input item: its entry, or why it was refused."""

    number: int  # line number (JSON lines) or item number (JSON array), from 1
    kind: str | None
    entry: NewEntry | None = None
    error: str | None = None


class InputTooLarge(ValueError):
    """The input is larger than MAX_INPUT bytes."""


def items(text: str) -> list[tuple[int, Any, str | None]]:
    """(number, item, parse error) for a JSON array or JSON lines. An item nests at most
    jsonsafe.MAX_DEPTH deep (checked before parsing: the parser cannot recurse too deep)."""
    if text.lstrip().startswith("["):
        try:
            data = _load(text, MAX_DEPTH + 1)
        except ValueError as exc:
            return [(1, None, f"not a JSON array: {exc}")]
        if not isinstance(data, list):
            return [(1, None, "not a JSON array")]
        return [(n, item, None) for n, item in enumerate(data, start=1)]
    out: list[tuple[int, Any, str | None]] = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((n, _load(line, MAX_DEPTH), None))
        except ValueError as exc:
            out.append((n, None, f"not JSON: {exc}"))
    return out


def _load(text: str, depth: int) -> Any:
    if deeper_than(text, depth):
        raise ValueError(f"nests deeper than {depth}")
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError(f"nests deeper than {depth}") from None


def detect(item: Any) -> Kind | None:
    """The kind an item looks like, by its keys."""
    if not isinstance(item, dict):
        return None
    if {"kind", "payload", "received_at"} <= item.keys():
        return "journal"
    if "marketplaceOrderId" in item and "code" in item:
        return "notification"
    if "OrderId" in item or "Origin" in item:
        return "hook"
    if "orderId" in item:
        return "feed"
    return None


def parse(text: str, kind: Kind | None, received_at: datetime) -> list[Line]:
    out = []
    for number, item, error in items(text):
        if error is not None:
            out.append(Line(number, None, error=error))
            continue
        found = kind or detect(item)
        if found is None:
            out.append(Line(number, None, error="kind not recognised (use --kind)"))
            continue
        entry, why = _entry(found, item, received_at)
        out.append(Line(number, found, entry, why))
    return out


def _entry(kind: Kind, item: Any, received_at: datetime) -> tuple[NewEntry | None, str | None]:
    match kind:
        case "feed":
            fed = entries.feed_item(item, received_at)
            return (fed.entry, None) if fed.accepted else (None, fed.entry.reason)
        case "hook":
            pushed = entries.hook_item(item, received_at)
            if pushed.ping:
                return None, "a hook ping carries no order"
            return (pushed.entry, None) if pushed.reason is None else (None, pushed.reason)
        case "notification":
            try:
                env = wire.ResultEnvelope.model_validate(item)
            except ValidationError as exc:
                err = exc.errors()[0]
                return None, f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}"
            return entries.notification_entry(env, received_at, authenticated=True), None  # the operator vouches
        case "journal":
            return _journal_entry(item)


def _journal_entry(item: Any) -> tuple[NewEntry | None, str | None]:
    if not isinstance(item, dict):
        return None, "a journal row must be a JSON object"
    try:
        row = {k: item.get(k) for k in JOURNAL_FIELDS}
        entry = NewEntry(
            kind=str(row["kind"]),
            source=str(row["source"] or "ingest"),
            payload=row["payload"] if isinstance(row["payload"], str) else json.dumps(row["payload"]),
            received_at=from_iso(str(row["received_at"])),
            order_id=row["order_id"],
            dedup_key=row["dedup_key"],
            event_id=row["event_id"],
            reason=row["reason"],
            version=int(row["version"] or 1),
        )
        if entry.kind != "rejected":
            read_entry(entry.kind, entry.version or 1, entry.payload)
    except UnreadableEntry as exc:
        return None, f"{item.get('kind')}: {exc}"
    except (ValueError, TypeError) as exc:
        return None, f"bad journal row: {exc}"
    return entry, None


def export_line(row: dict[str, Any]) -> str:
    """A journal row as one JSON line (the payload as stored, so it reads back byte for byte)."""
    return json.dumps({k: row[k] for k in ("offset", *JOURNAL_FIELDS)}, separators=(",", ":"))


async def decisions(store: Store, policy: Policy, clock: Callable[[], datetime]) -> list[str]:
    """Apply what the journal holds beyond the processor's offset, as the daemon would at
    start (the effects wait in the outbox for it), and say what was decided: each
    transition and each VTEX call queued. On a scratch copy for `--dry-run`."""
    before = await store.outbox.states()
    seen: list[Transition] = []
    processor = Processor(store, policy, clock=clock)
    processor.listeners.append(seen.append)
    await processor.drain()
    out = [f"{t.order_id}: {t.from_phase or 'new'} -> {t.to_phase} ({t.cause})" for t in seen]
    calls = sorted(k for k in await store.outbox.states() if k not in before)
    return out + [f"{order_id}: queues effect seq {seq} (a VTEX call)" for order_id, seq in calls]
