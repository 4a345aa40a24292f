"""What the store's methods take and give, besides the batch (`state/batch.py`)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from ..events import AnyEntry
from ..models import Effect


def iso(dt: datetime) -> str:
    """The one text form of a time in the database: UTC, microseconds."""
    return (dt if dt.tzinfo is UTC else dt.astimezone(UTC)).isoformat(timespec="microseconds")


def from_iso(text: str) -> datetime:
    return datetime.fromisoformat(text)


@dataclass(frozen=True, slots=True)
class NewEntry:
    """A journal row to append."""

    kind: str
    source: str
    payload: str
    received_at: datetime
    order_id: str | None = None
    dedup_key: str | None = None
    event_id: str | None = None
    reason: str | None = None
    version: int | None = None  # None: the current version of its kind

    @classmethod
    def of(
        cls,
        event: AnyEntry,
        *,
        source: str,
        received_at: datetime,
        dedup_key: str | None = None,
        event_id: str | None = None,
    ) -> NewEntry:
        """The journal row for an accepted event: its kind, order and JSON payload."""
        return cls(
            kind=event.kind,
            source=source,
            order_id=getattr(event, "order_id", None),
            payload=event.model_dump_json(),
            received_at=received_at,
            dedup_key=dedup_key,
            event_id=event_id,
        )


@dataclass(frozen=True, slots=True)
class Appended:
    offset: int | None  # None when the entry was a duplicate
    duplicate: bool


@dataclass(frozen=True, slots=True)
class OutboxRow:
    id: int
    order_id: str
    seq: int
    effect: Effect
    state: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class ClaimClass:
    """Pending effects to claim together: of `kind` (any: empty), with a purpose among
    `purposes` (any: None), at most `most` of them, oldest first, and none once `upto` effects
    are claimed in all (this class and those before it)."""

    kind: str
    most: int
    purposes: tuple[str, ...] | None = None
    upto: int | None = None


@dataclass(frozen=True, slots=True)
class ParkedIntent:
    """An approval intent that names a marketplace order id no VTEX order is linked to yet."""

    marketplace_order_id: str
    source: str
    journal_offset: int
    since: datetime | None  # when the intent was journaled (None: its row is gone)


@dataclass(slots=True)
class Pruned:
    """What a prune removed (or, previewed, would remove)."""

    orders: int = 0  # orders whose rows were replaced by one snapshot each
    journal_rows: int = 0  # their journal rows removed (the snapshots not counted)
    history_rows: int = 0
    outbox_rows: int = 0
    rejected_rows: int = 0
    outcome_rows: int = 0  # outcome events older than the retention (none a relay still owes)

    def add(self, other: Pruned) -> None:
        self.orders += other.orders
        self.journal_rows += other.journal_rows
        self.history_rows += other.history_rows
        self.outbox_rows += other.outbox_rows
        self.rejected_rows += other.rejected_rows
        self.outcome_rows += other.outcome_rows
