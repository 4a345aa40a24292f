"""Applying journal rows: routing, the machine and supersession, in one pure step.

`apply(rows, view, policy) -> Batch` reads each row, routes the entries that name only a
marketplace order id (`routing.route`), runs `decide` for each event, releases parked
intents when an order learns its marketplace id, and keeps only the effects the orders
still wait for. No I/O: `view` is what the store held, before the batch, for every id the
rows name (`needs` lists them), and the store writes the returned batch in one transaction.

The processor, `omsd replay` (a rebuild from an empty view, over the journal in chunks)
and `omsd ingest --dry-run` all apply rows here, so they cannot disagree.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from pydantic import BaseModel

from . import outcomes, routing
from .batch import Batch, HistoryRow, JournalRow, Note, Transition, UnreadableRow
from .events import (
    Entry,
    Event,
    IntentExpired,
    IntentReceived,
    IntentRecorded,
    NotificationReceived,
    OrderFetched,
    OrderSnapshot,
    StatusChanged,
    UnreadableEntry,
    read_entry,
)
from .machine import decide
from .models import Order, Policy, Stuck, is_superseded
from .statuses import STUCK

CAUSE_MAX = 500  # a history cause built from an error message is cut to this


@dataclass(frozen=True, slots=True)
class View:
    """What the store holds, before a batch, for the ids its rows name: the orders by id,
    the latest updated order per marketplace id, the parked intents (source, offset) by
    marketplace id, and per marketplace id an order not linked to any whose VTEX id derives
    from it (`routing.derived_marketplace_id`). An id the rows name that is absent here
    does not exist."""

    orders: Mapping[str, Order] = field(default_factory=dict)
    by_marketplace_id: Mapping[str, Order] = field(default_factory=dict)
    parked: Mapping[str, tuple[str, int]] = field(default_factory=dict)
    derived: Mapping[str, Order] = field(default_factory=dict)


EMPTY = View()


def read(row: JournalRow) -> Entry | str | None:
    """The entry a row holds; why it cannot be read; None for a rejected row (kept for the record)."""
    if row.kind == "rejected":
        return None
    try:
        return read_entry(row.kind, row.version, row.payload)
    except UnreadableEntry as exc:
        return str(exc)


def needs(entries: Iterable[tuple[JournalRow, Entry | str | None]]) -> tuple[set[str], set[str]]:
    """The order ids and the marketplace ids a run of rows names: what its `View` must cover.
    A status event also names the marketplace id its order's id derives from (an intent
    may wait parked on it)."""
    order_ids: set[str] = set()
    mkts: set[str] = set()
    for row, entry in entries:
        if row.order_id is not None:
            order_ids.add(row.order_id)
        if isinstance(entry, StatusChanged) and (derived := routing.derived_marketplace_id(entry.order_id)):
            mkts.add(derived)
        if isinstance(entry, BaseModel):
            names_order, names_mkt = _names(type(entry))
            if names_order and (order_id := entry.order_id) is not None:  # type: ignore[union-attr]
                order_ids.add(order_id)
            mkt = entry.order.marketplace_order_id if isinstance(entry, OrderSnapshot) else None
            if names_mkt:
                mkt = entry.marketplace_order_id  # type: ignore[union-attr]
            if mkt is not None:
                mkts.add(mkt)
    return order_ids, mkts


_NAMED: dict[type[BaseModel], tuple[bool, bool]] = {}


def _names(cls: type[BaseModel]) -> tuple[bool, bool]:
    """Whether entries of this class have an order id, and a marketplace id, field: asked of
    the class once (`getattr` on a model without the field costs an exception per row)."""
    if (found := _NAMED.get(cls)) is None:
        found = _NAMED[cls] = ("order_id" in cls.model_fields, "marketplace_order_id" in cls.model_fields)
    return found


class Applier:
    """Applies rows one at a time over a view and gathers the batch. `fresh`: a rebuild
    (`omsd replay`): no transition is announced; the view is empty, or (a rebuild in steps)
    what the rows before gave, its `by_marketplace_id` the order each id was linked to first."""

    def __init__(self, policy: Policy, view: View = EMPTY, *, emit_effects: bool = True, fresh: bool = False) -> None:
        self._policy = policy
        self._view = view
        self._emit_effects = emit_effects
        self._fresh = fresh
        self._orders: dict[str, Order | None] = {}  # every order the batch has looked at, as it stands now
        self._by_mkt: dict[str, str] = {}  # marketplace id -> order id, of the orders in `_orders`
        self._by_derived: dict[str, str] = {}  # derived marketplace id -> id of an unlinked order in `_orders`
        self.batch = Batch(offset=0)
        if fresh:
            # A rebuild in steps (`omsd replay`): the view holds what the rows before gave, and
            # each marketplace id it names routes to the order first linked to it, as one pass
            # over the whole journal routes it (an order loaded later must not take its place).
            for mkt, order in view.by_marketplace_id.items():
                self._known(order.order_id, order)
                self._by_mkt[mkt] = order.order_id

    def apply(self, row: JournalRow, entry: Entry | str | None) -> None:
        """Apply one row as `read` gave it: an entry, why it is unreadable, or None (rejected)."""
        self.batch.offset = row.offset
        if entry is None:
            return
        if isinstance(entry, str):
            self._unreadable(row, entry)
            return
        match entry:
            case NotificationReceived() | IntentReceived():
                self._route(row, entry)
            case IntentExpired():
                self._expire(row, entry)
            case IntentRecorded() if self._refused(row, entry):
                pass
            case _:
                self._decide(row, entry)

    def links(self) -> dict[str, str]:
        """Marketplace id -> the order its entries route to, as the view and the rows so far
        linked them (a rebuild in steps carries the new ones to the next step)."""
        return dict(self._by_mkt)

    def finish(self) -> Batch:
        """The batch, with only the effects the orders still wait for (an effect a later
        event of the batch superseded is never written, let alone performed)."""
        batch = self.batch
        batch.effects = [e for e in batch.effects if not is_superseded(batch.orders.get(e.order_id), e.seq)]
        return batch

    # ---- lookups ---------------------------------------------------------------------------
    def _order(self, order_id: str) -> Order | None:
        if order_id not in self._orders:
            self._known(order_id, self._view.orders.get(order_id))
        return self._orders[order_id]

    def _known(self, order_id: str, order: Order | None) -> None:
        self._orders[order_id] = order
        self.batch.before[order_id] = order
        if order is not None and order.marketplace_order_id is not None:
            self._by_mkt.setdefault(order.marketplace_order_id, order_id)
        elif order is not None:
            self._derives(order_id)

    def _derives(self, order_id: str) -> None:
        """Index an unlinked order by the marketplace id its id derives from; of two (a split
        order: `-01`, `-02`), the smallest id, as the store's look-up does."""
        if (derived := routing.derived_marketplace_id(order_id)) is not None:
            known = self._by_derived.get(derived)
            if known is None or order_id < known:
                self._by_derived[derived] = order_id

    def _derived_from(self, mkt: str) -> Order | None:
        """An order, not linked to any marketplace id, whose VTEX id derives from `mkt`."""
        stored = self._view.derived.get(mkt)
        ids = [i for i in (self._by_derived.get(mkt), stored.order_id if stored else None) if i is not None]
        if not ids:
            return None
        order_id = min(ids)
        if order_id not in self._orders and stored is not None:
            self._known(order_id, stored)
        return self._orders.get(order_id)

    def _by_marketplace_id(self, mkt: str) -> Order | None:
        if (order_id := self._by_mkt.get(mkt)) is not None:
            return self._orders[order_id]
        found = self._view.by_marketplace_id.get(mkt)
        if found is None:
            return None
        if found.order_id not in self._orders:
            self._known(found.order_id, found)
        return self._orders.get(found.order_id)

    def _parked(self, mkt: str) -> tuple[str, int] | None:
        """The intent parked for this marketplace id, as of this point of the batch."""
        if (parked := self.batch.add_pending.get(mkt)) is not None:
            return parked
        if mkt in self.batch.remove_pending:  # released or expired earlier in this batch
            return None
        return self._view.parked.get(mkt)

    def _note(self, event: str, level: str = "info", **fields: object) -> None:
        self.batch.notes.append(Note(event, level, fields))

    def _outcome(self, fact: outcomes.Outcome) -> None:
        """Outcomes are for the live stream: a rebuild (`fresh`) derives none (the stream keeps
        what it said; deriving again would give the same ids)."""
        if not self._fresh:
            self.batch.outcomes.append(fact)

    # ---- one row ----------------------------------------------------------------------------
    def _unreadable(self, row: JournalRow, error: str) -> None:
        """Never skipped silently: noted, kept in `unreadable`, and written to the order's
        history when the order is known."""
        self._note(
            "journal_entry_unreadable", "error", offset=row.offset, kind=row.kind, order_id=row.order_id, error=error
        )
        self.batch.unreadable.append(UnreadableRow(row.offset, row.kind, row.order_id, error, row.received_at))
        order = self._order(row.order_id) if row.order_id is not None else None
        if order is not None:
            cause = f"journal row {row.offset} unreadable: {error}"[:CAUSE_MAX]
            self._history(order.order_id, row, order.phase, order.phase, order.status, cause)

    def _route(self, row: JournalRow, entry: NotificationReceived | IntentReceived) -> None:
        mkt = entry.marketplace_order_id
        linked = self._by_marketplace_id(mkt)
        parked = linked is None and self._parked(mkt) is not None
        if isinstance(entry, NotificationReceived) and entry.authenticated:  # VTEX's word first, then omsd's
            order_id = linked.order_id if linked is not None else None
            self._outcome(outcomes.processing_result(entry, order_id, row.offset, row.received_at))
        match routing.route(entry, linked, parked):
            case routing.Decide(event=event):
                self._decide(row, event)
            case routing.Park(marketplace_order_id=mkt, source=source):
                self.batch.add_pending[mkt] = (source, row.offset)
                self._note("intent_parked", marketplace_order_id=mkt, source=source, offset=row.offset)
                at = row.received_at
                self._outcome(
                    outcomes.outcome(outcomes.INTENT_ACCEPTED, row.offset, at, None, mkt, source=source, parked=True)
                )
                if (lookup := routing.lookup(self._derived_from(mkt), mkt, again=True)) is not None:
                    self._decide(row, lookup)
            case routing.AlreadyParked():
                pass
            case routing.Unrouted(code=code):
                self._note("notification_unrouted", offset=row.offset, marketplace_order_id=mkt, code=code)

    def _refused(self, row: JournalRow, entry: IntentRecorded) -> bool:
        """An intent naming an order known under another marketplace id is refused, and the
        order it names is left untouched (the API refuses it up front when it can tell)."""
        reason = routing.contradiction(self._order(entry.order_id), entry.marketplace_order_id)
        if reason is None:
            return False
        self._note("intent_refused", "warning", offset=row.offset, order_id=entry.order_id, reason=reason)
        return True

    def _expire(self, row: JournalRow, entry: IntentExpired) -> None:
        """Drop the parked intent the entry names, unless it was linked (or parked anew) since."""
        mkt, offset, at = entry.marketplace_order_id, row.offset, row.received_at
        parked = self._parked(mkt)  # removals are written first: one parked anew stays
        if parked is None or parked[1] != entry.parked_offset:
            return
        self.batch.add_pending.pop(mkt, None)
        self.batch.remove_pending.add(mkt)
        self.batch.expired += 1
        self._outcome(
            outcomes.outcome(
                outcomes.INTENT_EXPIRED,
                offset,
                at,
                None,
                mkt,
                ttl_s=entry.ttl_s,
                parked_offset=entry.parked_offset,
            )
        )
        self._note(
            "intent_expired", "warning", marketplace_order_id=mkt, parked_at=entry.parked_offset, ttl_s=entry.ttl_s
        )

    def _decide(self, row: JournalRow, event: Event, *, released: bool = False) -> None:
        before = self._order(event.order_id)
        if before is not None and before.stuck is not None:
            self._hold(row, event, before)
            return
        if isinstance(event, OrderFetched) and (mkt := routing.answers_parked(before, event)) and self._parked(mkt):
            self._release_parked(row, event.order_id, mkt)  # first: the answer then decides the approval
            before = self._order(event.order_id)
        try:
            decision = decide(before, event, row.received_at, self._policy)
        except Exception as exc:  # a bug must not stop every other order, nor lose this event
            self._stick(row, event, before, exc)
            return
        after = decision.order
        self._orders[after.order_id] = after
        self.batch.orders[after.order_id] = after
        self.batch.touched[after.order_id] = row.offset
        if after.marketplace_order_id is not None:
            self._by_mkt.setdefault(after.marketplace_order_id, after.order_id)
        elif before is None:
            self._derives(after.order_id)
        if self._emit_effects:
            self.batch.effects.extend(decision.effects)
        for fact in outcomes.of_decision(before, after, event, row.offset, row.received_at, released=released):
            self._outcome(fact)
        from_phase = before.phase if before is not None else None
        if from_phase != after.phase or (before is not None and before.status != after.status):
            cause = decision.cause or event.kind
            self._history(after.order_id, row, from_phase, after.phase, after.status, cause)
            if not self._fresh:
                self.batch.transitions.append(
                    Transition(
                        after.order_id,
                        row.offset,
                        from_phase,
                        after.phase,
                        after.status,
                        cause,
                        after.intent_at,
                        after.last_code,
                        after.last_error,
                    )
                )
        if (mkt := routing.newly_linked(before, after)) is not None:
            self._release_parked(row, after.order_id, mkt)
        elif isinstance(event, StatusChanged) and not after.link_checked:
            self._look_up_if_parked(row, after)

    def _look_up_if_parked(self, row: JournalRow, order: Order) -> None:
        """A status event of an order whose id derives from a marketplace id an intent waits
        parked on (the intent came first): look the link up now."""
        mkt = routing.derived_marketplace_id(order.order_id)
        if mkt is None or self._parked(mkt) is None:
            return
        if (lookup := routing.lookup(order, mkt, again=False)) is not None:
            self._decide(row, lookup)

    def _release_parked(self, row: JournalRow, order_id: str, mkt: str) -> None:
        parked = self._parked(mkt)  # the intent parked now (one parked anew after an expiry included)
        self.batch.add_pending.pop(mkt, None)
        if parked is None:
            return
        self.batch.remove_pending.add(mkt)
        self._note("intent_linked", order_id=order_id, marketplace_order_id=mkt, parked_at=parked[1])
        self._decide(row, routing.release(order_id, mkt, parked[0]), released=True)

    def _history(
        self, order_id: str, row: JournalRow, from_phase: str | None, to_phase: str, status: str | None, cause: str
    ) -> None:
        self.batch.history.append(
            HistoryRow(order_id, row.offset, from_phase, to_phase, status, cause, row.received_at)
        )

    # ---- an event that cannot be applied -------------------------------------------------------
    def _stick(self, row: JournalRow, event: Event, before: Order | None, exc: Exception) -> None:
        """`decide` raised: the order keeps its state from before the event, marked stuck on
        this row, so that the event is applied again by a retry rather than skipped."""
        error = f"{type(exc).__name__}: {exc}"[:CAUSE_MAX]
        stuck = Stuck(offset=row.offset, kind=event.kind, error=error, at=row.received_at, new=before is None)
        order = (before or Order(order_id=event.order_id)).model_copy(update={"stuck": stuck})
        self._keep(row, order)
        self._note(
            "event_not_applied", "error", offset=row.offset, order_id=order.order_id, kind=event.kind, error=error
        )
        cause = f"event {event.kind} not applied: {error}; the order's later events wait for `omsd retry`"
        self._history(order.order_id, row, before.phase if before else None, STUCK, order.status, cause[:CAUSE_MAX])

    def _hold(self, row: JournalRow, event: Event, order: Order) -> None:
        """An event for a stuck order waits in the journal (a retry applies it, in order)."""
        assert order.stuck is not None
        stuck = order.stuck.model_copy(update={"held": order.stuck.held + 1})
        self._keep(row, order.model_copy(update={"stuck": stuck}))
        self._note("event_held", "debug", offset=row.offset, order_id=order.order_id, kind=event.kind)
        cause = f"event {event.kind} held: the order is stuck on journal row {stuck.offset}"
        self._history(order.order_id, row, STUCK, STUCK, order.status, cause)

    def _keep(self, row: JournalRow, order: Order) -> None:
        self._orders[order.order_id] = order
        self.batch.orders[order.order_id] = order
        self.batch.touched[order.order_id] = row.offset


def apply(
    rows: Iterable[tuple[JournalRow, Entry | str | None]],
    view: View,
    policy: Policy,
    *,
    emit_effects: bool = True,
) -> Batch:
    """Apply a run of rows (as `read` gives them) over what the store holds: the batch to write."""
    applier = Applier(policy, view, emit_effects=emit_effects)
    for row, entry in rows:
        applier.apply(row, entry)
    return applier.finish()
