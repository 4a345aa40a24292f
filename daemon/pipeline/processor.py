"""The processor: applies journal events in offset order to the machine.

For each run of events it routes entries that name only a marketplace order id,
calls `decide` per event, and commits the new order rows, their effects (the
outbox), timers, history and its own offset in ONE transaction. Its offset is
the truth of what has been applied: after a crash it starts from there again,
and because `decide` is pure the outcome is the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

from pydantic import BaseModel

from omsd.state import routing
from omsd.state.events import (
    Entry,
    Event,
    IntentExpired,
    IntentReceived,
    NotificationReceived,
    UnreadableEntry,
    read_entry,
)
from omsd.state.machine import decide
from omsd.state.models import Order, Policy
from omsd.state.statuses import Phase
from omsd.state.store import Batch, HistoryRow, JournalRow, Store, UnreadableRow

from ..ops.logs import get_logger
from ..ops.metrics import Metrics
from ..ops.waiting import wait_any

log = get_logger("omsd.processor")


@dataclass(slots=True)
class Transition:
    order_id: str
    offset: int
    from_phase: str | None
    to_phase: str
    status: str | None
    cause: str
    intent_at: datetime | None = None
    code: str | None = None  # the order's last VTEX result code (EOI...), and last error
    error: str | None = None


@dataclass(slots=True)
class _Run:
    batch: Batch
    orders: dict[str, Order | None] = field(default_factory=dict)
    transitions: list[Transition] = field(default_factory=list)
    by_marketplace_id: dict[str, str] = field(default_factory=dict)  # of the orders in `orders`
    fresh: bool = False  # a rebuild from nothing: the store's derived rows are not consulted
    touched: dict[str, int] = field(default_factory=dict)  # order id -> last offset that applied to it
    stored: _Stored | None = None  # the store's rows for the batch, read before applying it
    expired: int = 0  # parked intents dropped as expired


@dataclass(slots=True)
class _Stored:
    """What the store holds for the ids a batch names, read in a few queries up front
    (the store's derived rows change only when a batch commits). An id not asked for
    falls back to a single lookup."""

    order_ids: set[str]
    orders: dict[str, Order]
    marketplace_ids: set[str]
    by_marketplace_id: dict[str, Order]
    parked: dict[str, tuple[str, int]]


@dataclass(slots=True)
class Rebuilt:
    """The derived state the journal up to `batch.offset` gives, computed in memory."""

    batch: Batch
    touched: dict[str, int]
    applied: int


class Processor:
    def __init__(
        self,
        store: Store,
        policy: Policy,
        *,
        batch_size: int = 200,
        max_batch_size: int = 2000,
        emit_effects: bool = True,
        on_effects: Callable[[], None] | None = None,
        on_timer: Callable[[datetime], None] | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        metrics: Metrics | None = None,
    ) -> None:
        self._store = store
        self._policy = policy
        self._batch_size = batch_size  # the first batch; each full one doubles the next, up to the max
        self._max_batch_size = max(batch_size, max_batch_size)
        self._next_size = batch_size
        self._emit_effects = emit_effects
        self._on_effects = on_effects
        self._on_timer = on_timer  # told the earliest timer each batch set, to fire it when due
        self._clock = clock
        self._metrics = metrics
        self.unreadable = 0  # journal rows this process found unreadable (omsd_journal_unreadable_total)
        self.expired = 0  # parked intents this process dropped as expired (omsd_intents_expired_total)
        self.wake = asyncio.Event()
        self.applied = asyncio.Condition()
        self.offset = 0
        self.listeners: list[Callable[[Transition], None]] = []
        self.progress: Callable[[], None] = lambda: None  # called on every turn of `run`

    async def run_once(self) -> int:
        """Apply the next batch of journal events. Returns how many rows were consumed."""
        offset = await self._store.processor_offset()
        rows = await self._store.journal_after(offset, self._next_size)
        full = len(rows) == self._next_size
        self._next_size = min(self._next_size * 2, self._max_batch_size) if full else self._batch_size
        if not rows:
            self.offset = offset
            return 0
        run = _Run(batch=Batch(offset=rows[-1].offset))
        entries = [(row, _read(row)) for row in rows]
        run.stored = await self._stored(entries)
        for row, entry in entries:
            await self._apply_entry(run, row, entry)
        written = await self._store.commit_batch(run.batch, now=self._clock())
        self.offset = run.batch.offset
        if run.batch.unreadable:
            self.unreadable += len(run.batch.unreadable)
            if self._metrics is not None:
                self._metrics.journal_unreadable.inc(len(run.batch.unreadable))
        if run.expired:
            self.expired += run.expired
            if self._metrics is not None:
                self._metrics.intents_expired.inc(run.expired)
        if written and self._on_effects is not None:
            self._on_effects()
        if self._on_timer is not None and (dues := [o.timer.due_at for o in run.batch.orders.values() if o.timer]):
            self._on_timer(min(dues))
        self._announce(run.transitions)
        async with self.applied:
            self.applied.notify_all()
        return len(rows)

    def _announce(self, transitions: list[Transition]) -> None:
        """The canonical line per transition (after the commit: what is logged happened),
        and the listeners. The logger is resolved once per batch, not once per line."""
        logger = log.bind()
        for t in transitions:
            logger.info(
                "order_transition",
                order_id=t.order_id,
                offset=t.offset,
                from_phase=t.from_phase,
                to_phase=t.to_phase,
                status=t.status,
                cause=t.cause,
            )
            if t.to_phase == Phase.DEAD and t.from_phase != Phase.DEAD:
                logger.warning("order_dead", order_id=t.order_id, offset=t.offset, code=t.code, error=t.error)
            for listener in self.listeners:
                listener(t)

    async def rebuild(
        self, chunks: AsyncIterator[list[JournalRow]], on_rows: Callable[[int], None] = lambda n: None
    ) -> Rebuilt:
        """Apply journal rows to an empty state, all in memory (for `omsd replay`): no
        store lookups, no effects, no per-transition log lines. Nothing is written."""
        run = _Run(batch=Batch(offset=0), fresh=True)
        applied = 0
        with _no_cycle_collection():
            async for rows in chunks:
                for row in rows:
                    await self._apply_entry(run, row, _read(row))
                if rows:
                    run.batch.offset = rows[-1].offset
                applied += len(rows)
                on_rows(len(rows))
        return Rebuilt(run.batch, run.touched, applied)

    async def drain(self) -> int:
        total = 0
        while n := await self.run_once():
            total += n
        return total

    async def run(self, stop: asyncio.Event, poll_s: float = 1.0) -> None:
        """Apply events as they arrive; also polls, so entries written by another
        process (the `omsd approve` command) are picked up."""
        while not stop.is_set():
            self.progress()
            self.wake.clear()
            if await self.run_once():
                continue
            await wait_any(self.wake, stop, within_s=poll_s)
        await self.drain()

    async def wait_for(self, offset: int, timeout_s: float) -> bool:
        """Wait until the processor has applied `offset` (for the API's answers)."""

        async def reached() -> None:
            async with self.applied:
                await self.applied.wait_for(lambda: self.offset >= offset)

        try:
            await asyncio.wait_for(reached(), timeout=timeout_s)
        except TimeoutError:
            return False
        return True

    async def _stored(self, entries: list[tuple[JournalRow, Entry | str | None]]) -> _Stored:
        """The store's rows for every order and marketplace id the batch names, in a few queries."""
        order_ids: set[str] = set()
        mkts: set[str] = set()
        for row, entry in entries:
            if row.order_id is not None:
                order_ids.add(row.order_id)
            if isinstance(entry, BaseModel):
                if (order_id := getattr(entry, "order_id", None)) is not None:
                    order_ids.add(order_id)
                if (mkt := getattr(entry, "marketplace_order_id", None)) is not None:
                    mkts.add(mkt)
        return _Stored(
            order_ids,
            await self._store.load_orders(order_ids),
            mkts,
            await self._store.orders_by_marketplace_ids(mkts),
            await self._store.pending_intents_for(mkts),
        )

    # ---- one journal row -----------------------------------------------------------------
    async def _apply_entry(self, run: _Run, row: JournalRow, entry: Entry | str | None) -> None:
        """Apply one row as `_read` gave it: an entry, why it is unreadable, or None (rejected)."""
        if entry is None:
            return
        if isinstance(entry, str):
            await self._unreadable(run, row, entry)
            return
        match entry:
            case NotificationReceived() | IntentReceived():
                await self._route(run, row, entry)
            case IntentExpired():
                await self._expire(run, entry)
            case _:
                await self._decide(run, row, entry)

    async def _unreadable(self, run: _Run, row: JournalRow, error: str) -> None:
        """Never skipped silently: logged, kept in `unreadable` (omsd journal --unreadable),
        counted, and written to the order's history when the order is known."""
        log.error("journal_entry_unreadable", offset=row.offset, kind=row.kind, order_id=row.order_id, error=error)
        run.batch.unreadable.append(UnreadableRow(row.offset, row.kind, row.order_id, error, row.received_at))
        order = await self._order(run, row.order_id) if row.order_id is not None else None
        if order is not None:
            run.batch.history.append(
                HistoryRow(
                    order_id=order.order_id,
                    journal_offset=row.offset,
                    from_phase=order.phase,
                    to_phase=order.phase,
                    status=order.status,
                    cause=f"journal row {row.offset} unreadable: {error}"[:500],
                    at=row.received_at,
                )
            )

    async def _order(self, run: _Run, order_id: str) -> Order | None:
        if order_id not in run.orders:
            stored = run.stored
            if run.fresh:
                order = None
            elif stored is not None and order_id in stored.order_ids:
                order = stored.orders.get(order_id)
            else:
                order = await self._store.load_order(order_id)
            self._known(run, order_id, order)
        return run.orders[order_id]

    @staticmethod
    def _known(run: _Run, order_id: str, order: Order | None) -> None:
        run.orders[order_id] = order
        run.batch.before[order_id] = order
        if order is not None and order.marketplace_order_id is not None:
            run.by_marketplace_id.setdefault(order.marketplace_order_id, order_id)

    async def _find_by_marketplace_id(self, run: _Run, marketplace_order_id: str) -> Order | None:
        if (order_id := run.by_marketplace_id.get(marketplace_order_id)) is not None:
            return run.orders[order_id]
        if run.fresh:
            return None
        stored = run.stored
        if stored is not None and marketplace_order_id in stored.marketplace_ids:
            found = stored.by_marketplace_id.get(marketplace_order_id)
        else:
            found = await self._store.order_by_marketplace_id(marketplace_order_id)
        if found is not None and found.order_id not in run.orders:
            self._known(run, found.order_id, found)
        return run.orders.get(found.order_id) if found is not None else None

    async def _parked(self, run: _Run, mkt: str) -> tuple[str, int] | None:
        """The intent parked for this marketplace id, as of this point of the batch."""
        if (parked := run.batch.add_pending.get(mkt)) is not None or run.fresh:
            return parked
        if mkt in run.batch.remove_pending:  # released or expired earlier in this batch
            return None
        if run.stored is not None and mkt in run.stored.marketplace_ids:
            return run.stored.parked.get(mkt)
        return await self._store.pending_intent(mkt)

    async def _route(self, run: _Run, row: JournalRow, entry: NotificationReceived | IntentReceived) -> None:
        mkt = entry.marketplace_order_id
        linked = await self._find_by_marketplace_id(run, mkt)
        parked = linked is None and await self._parked(run, mkt) is not None
        match routing.route(entry, linked, parked):
            case routing.Decide(event=event):
                await self._decide(run, row, event)
            case routing.Park(marketplace_order_id=mkt, source=source):
                run.batch.add_pending[mkt] = (source, row.offset)
                log.info("intent_parked", marketplace_order_id=mkt, source=source, offset=row.offset)
            case routing.AlreadyParked():
                pass
            case routing.Unrouted(code=code):
                log.info("notification_unrouted", offset=row.offset, marketplace_order_id=mkt, code=code)

    async def _expire(self, run: _Run, entry: IntentExpired) -> None:
        """Drop the parked intent the entry names, unless it was linked (or parked anew) since."""
        mkt = entry.marketplace_order_id
        parked = await self._parked(run, mkt)  # removals are written first: one parked anew stays
        if parked is None or parked[1] != entry.parked_offset:
            return
        run.batch.add_pending.pop(mkt, None)
        run.batch.remove_pending.add(mkt)
        run.expired += 1
        log.warning("intent_expired", marketplace_order_id=mkt, parked_at=entry.parked_offset, ttl_s=entry.ttl_s)

    async def _decide(self, run: _Run, row: JournalRow, event: Event) -> None:
        before = await self._order(run, event.order_id)
        try:
            decision = decide(before, event, row.received_at, self._policy)
        except Exception as exc:  # a bug must not stop every other order: skip this event, loudly
            log.exception("event_not_applied", offset=row.offset, order_id=event.order_id, kind=event.kind)
            run.batch.history.append(
                HistoryRow(
                    order_id=event.order_id,
                    journal_offset=row.offset,
                    from_phase=before.phase if before else None,
                    to_phase=before.phase if before else "tracking",
                    status=before.status if before else None,
                    cause=f"event {event.kind} not applied: {type(exc).__name__}: {exc}"[:500],
                    at=row.received_at,
                )
            )
            return
        after = decision.order
        run.orders[after.order_id] = after
        run.batch.orders[after.order_id] = after
        run.touched[after.order_id] = row.offset
        if after.marketplace_order_id is not None:
            run.by_marketplace_id.setdefault(after.marketplace_order_id, after.order_id)
        if self._emit_effects:
            run.batch.effects.extend(decision.effects)
        from_phase = before.phase if before is not None else None
        if from_phase != after.phase or (before is not None and before.status != after.status):
            cause = decision.cause or event.kind
            run.batch.history.append(
                HistoryRow(
                    order_id=after.order_id,
                    journal_offset=row.offset,
                    from_phase=from_phase,
                    to_phase=after.phase,
                    status=after.status,
                    cause=cause,
                    at=row.received_at,
                )
            )
            if not run.fresh:
                run.transitions.append(
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
            await self._release_parked(run, row, after.order_id, mkt)

    async def _release_parked(self, run: _Run, row: JournalRow, order_id: str, mkt: str) -> None:
        parked = await self._parked(run, mkt)
        run.batch.add_pending.pop(mkt, None)
        if parked is None or mkt in run.batch.remove_pending:
            return
        run.batch.remove_pending.add(mkt)
        log.info("intent_linked", order_id=order_id, marketplace_order_id=mkt, parked_at=parked[1])
        await self._decide(run, row, routing.release(order_id, mkt, parked[0]))


def _read(row: JournalRow) -> Entry | str | None:
    """The entry a row holds; why it cannot be read; None for a rejected row (kept for the record)."""
    if row.kind == "rejected":
        return None
    try:
        return read_entry(row.kind, row.version, row.payload)
    except UnreadableEntry as exc:
        return str(exc)


@contextlib.contextmanager
def _no_cycle_collection() -> Iterator[None]:
    """Pause Python's cycle collector while a rebuild holds millions of live objects:
    each full collection walks all of them again (docs/benchmarks.md measures it), and
    a rebuild makes no reference cycles (reference counting frees its garbage)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
