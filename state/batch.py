"""The records that pass between the store and the pure core: a journal row as read, and
the batch that applying a run of rows gives (what the store then writes in one transaction).

Plain data, no behaviour: `state/apply.py` makes batches, `state/store/` reads rows and
writes batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .models import Effect, Order
from .outcomes import Outcome


@dataclass(frozen=True, slots=True)
class JournalRow:
    offset: int
    kind: str
    source: str
    order_id: str | None
    payload: str
    reason: str | None
    received_at: datetime
    version: int = 1


@dataclass(frozen=True, slots=True)
class HistoryRow:
    order_id: str
    journal_offset: int
    from_phase: str | None
    to_phase: str
    status: str | None
    cause: str
    at: datetime


@dataclass(frozen=True, slots=True)
class UnreadableRow:
    """A journal row the processor could not read: kept for the operator, never skipped silently."""

    journal_offset: int
    kind: str
    order_id: str | None
    error: str
    received_at: datetime
    found_at: datetime | None = None  # set by the store when it is recorded


@dataclass(frozen=True, slots=True)
class Transition:
    """An order's phase or status changed (for the log line, metrics and listeners)."""

    order_id: str
    offset: int
    from_phase: str | None
    to_phase: str
    status: str | None
    cause: str
    intent_at: datetime | None = None
    code: str | None = None  # the order's last VTEX result code (EOI...), and last error
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Note:
    """A fact worth a log line that is not a transition (an intent parked, a row unreadable):
    the pure core cannot log, so the processor logs these once the batch is committed."""

    event: str
    level: str  # "debug" | "info" | "warning" | "error"
    fields: dict[str, Any]


@dataclass(slots=True)
class Batch:
    """What applying a run of journal rows decided, written by the store as one unit."""

    offset: int
    orders: dict[str, Order] = field(default_factory=dict)
    before: dict[str, Order | None] = field(default_factory=dict)
    effects: list[Effect] = field(default_factory=list)  # live ones only: never a superseded effect
    history: list[HistoryRow] = field(default_factory=list)
    add_pending: dict[str, tuple[str, int]] = field(default_factory=dict)
    remove_pending: set[str] = field(default_factory=set)
    unreadable: list[UnreadableRow] = field(default_factory=list)
    transitions: list[Transition] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)  # for the connector, in the order they happened
    touched: dict[str, int] = field(default_factory=dict)  # order id -> last offset that applied to it
    expired: int = 0  # parked intents dropped as expired

    def live(self) -> dict[str, int | None]:
        """Per order of the batch, the sequence of the one effect it still waits for (None:
        none). Every other pending effect of these orders is superseded and never performed."""
        return {k: o.inflight.seq if o.inflight is not None else None for k, o in self.orders.items()}
