"""The processor: applies the journal, in offset order, and commits what it decided.

Each turn reads the next rows after its offset, reads what the store holds for the ids
they name (`state.apply.needs`), applies them (`state.apply`: routing, the machine,
supersession; pure) and commits the batch in ONE transaction: order rows, effects (the
outbox), timers, history and the new offset. The offset is the truth of what has been
applied: after a crash the processor starts from there again, and because applying is
pure the outcome is the same. What the batch decided is logged after the commit.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Collection
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime

from omsd.state.apply import apply, needs, read
from omsd.state.batch import Batch, Transition
from omsd.state.events import Resync
from omsd.state.models import FetchOrder, Order, Policy
from omsd.state.statuses import STUCK, Phase
from omsd.state.store import Store

from ..ops.logs import get_logger
from ..ops.metrics import Metrics
from ..ops.waiting import wait_any
from . import stuck

log = get_logger("omsd.processor")

MAX_BATCH = 2000  # the largest batch the processor reads; each full one doubles the next up to it

# What an operator reads at info of an order's life is its intent, its approval (the effect
# runner's `approval_answered`) and its outcome; the other notes of the pure core go to debug.
NOTE_LEVELS = {"intent_linked": "debug", "notification_unrouted": "debug"}

_OPEN_TO_CLOSED = (Phase.APPROVED, Phase.REJECTED)


def is_milestone(t: Transition) -> bool:
    """A transition an operator reads at info: the order got an intent (it leaves
    `tracking`), an order with an intent closed, or an operator's retry took it out of
    `dead`. Everything else (status changes of orders nobody asked to approve, the steps
    between intent and outcome) is debug; a move to `dead` is `order_dead`, a warning."""
    if t.from_phase == t.to_phase:
        return False
    if t.from_phase in (None, Phase.TRACKING):
        return t.to_phase != Phase.TRACKING
    if t.from_phase == Phase.DEAD:
        return True
    return t.to_phase in _OPEN_TO_CLOSED and t.intent_at is not None


class Processor:
    def __init__(
        self,
        store: Store,
        policy: Policy,
        *,
        batch_size: int = 200,
        max_batch_size: int = MAX_BATCH,
        on_effects: Callable[[], None] | None = None,
        on_timer: Callable[[datetime], None] | None = None,
        on_outcomes: Callable[[int], None] | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        metrics: Metrics | None = None,
    ) -> None:
        self._store = store
        self._policy = policy
        self._batch_size = batch_size  # the first batch; each full one doubles the next, up to the max
        self._max_batch_size = max(batch_size, max_batch_size)
        self._next_size = batch_size
        self._on_effects = on_effects
        self._on_timer = on_timer  # told the earliest timer each batch set, to fire it when due
        self._on_outcomes = on_outcomes  # told the last outcome seq each batch wrote (long polls, the relay)
        self._clock = clock
        self._metrics = metrics or Metrics()
        self.wake = asyncio.Event()
        self.applied = asyncio.Condition()
        self.offset = 0
        self.listeners: list[Callable[[Transition], None]] = []
        self.progress: Callable[[], None] = lambda: None  # called on every turn of `run`
        # In a fleet, a turn across the accounts (ops/turns.py) for each batch `run` applies.
        self.turn: Callable[[], AbstractAsyncContextManager[object]] = contextlib.nullcontext
        self.on_stuck: Callable[[int], None] = lambda n: None  # told how many orders are stuck
        self.on_parked: Callable[[], None] = lambda: None  # told when a batch parked an intent

    async def run_once(self) -> int:
        """Apply the next batch of journal events. Returns how many rows were consumed."""
        offset = await self._store.read.processor_offset()
        rows = await self._store.journal.after(offset, self._next_size)
        full = len(rows) == self._next_size
        self._next_size = min(self._next_size * 2, self._max_batch_size) if full else self._batch_size
        if not rows:
            self.offset = offset
            return 0
        entries = [(row, read(row)) for row in rows]
        view = await self._store.read.view(*needs(entries))
        batch = apply(entries, view, self._policy)
        await self._commit(batch)
        self.offset = batch.offset
        # A resync (`omsd retry`) of a stuck order applies its held events again.
        retry = {e.order_id for _, e in entries if isinstance(e, Resync) and _stuck(batch.orders.get(e.order_id))}
        if retry:
            await self.retry_stuck(retry)
        elif _touches_stuck(batch):
            await self._count_stuck()
        async with self.applied:
            self.applied.notify_all()
        return len(rows)

    async def retry_stuck(self, order_ids: Collection[str] | None = None) -> int:
        """Apply again the held events of these stuck orders (every one when None), each in
        its own transaction; returns how many are no longer stuck (or stuck further on)."""
        if order_ids is None:
            order_ids = [o.order_id for o in await self._store.read.list_orders(STUCK, limit=1_000_000)]
        moved = 0
        for order_id in sorted(order_ids):
            result = await stuck.reapply(self._store, self._policy, order_id, self.offset)
            if result is None:
                continue
            was = result.stored.stuck
            assert was is not None
            if result.still_stuck:
                log.warning("order_still_stuck", order_id=order_id, offset=was.offset, error=was.error)
                continue
            await self._commit(result.batch)
            log.info("order_unstuck", order_id=order_id, offset=was.offset, held=was.held)
            moved += 1
            if self._on_effects is not None:
                self._on_effects()  # its effects waited while it was stuck
        await self._count_stuck()
        return moved

    async def _count_stuck(self) -> None:
        self.on_stuck(await self._store.read.count_orders(STUCK))

    async def _commit(self, batch: Batch) -> None:
        last_outcome = await self._store.derived.commit(batch, now=self._clock())
        if last_outcome is not None and self._on_outcomes is not None:
            self._on_outcomes(last_outcome)
        self._committed(batch)

    def _committed(self, batch: Batch) -> None:
        """Tell what the batch did, now that it happened: the effect runner and the timer
        alarm, the metrics, the log, the listeners."""
        if batch.unreadable:
            self._metrics.journal_unreadable.inc(len(batch.unreadable))
        if batch.expired:
            self._metrics.intents_expired.inc(batch.expired)
        for fact in batch.outcomes:
            self._metrics.outcomes.labels(type=fact.type).inc()
        if not_applied := sum(1 for n in batch.notes if n.event == "event_not_applied"):
            self._metrics.events_not_applied.inc(not_applied)
        if lookups := sum(1 for e in batch.effects if isinstance(e, FetchOrder) and e.purpose == "link_intent"):
            self._metrics.link_lookups.labels(trigger="intent").inc(lookups)
        if batch.effects and self._on_effects is not None:
            self._on_effects()
        if batch.add_pending:
            self.on_parked()
        if self._on_timer is not None and (dues := [o.timer.due_at for o in batch.orders.values() if o.timer]):
            self._on_timer(min(dues))
        logger = log.bind()  # resolved once per batch, not once per line
        for note in batch.notes:
            getattr(logger, NOTE_LEVELS.get(note.event, note.level))(note.event, **note.fields)
        for t in batch.transitions:
            fields = {
                "order_id": t.order_id,
                "offset": t.offset,
                "from_phase": t.from_phase,
                "to_phase": t.to_phase,
                "status": t.status,
                "cause": t.cause,
            }
            if t.to_phase == Phase.DEAD and t.from_phase != Phase.DEAD:
                logger.warning("order_dead", **fields, code=t.code, error=t.error)
            elif is_milestone(t):
                logger.info("order_transition", **fields)
            else:
                logger.debug("order_transition", **fields)
            for listener in self.listeners:
                listener(t)

    async def drain(self) -> int:
        total = 0
        while n := await self.run_once():
            total += n
        return total

    async def run(self, stop: asyncio.Event, poll_s: float = 1.0) -> None:
        """Apply events as they arrive; also polls, so entries written by another
        process (the `omsd approve` command) are picked up."""
        self.offset = await self._store.read.processor_offset()
        await self.retry_stuck()  # at start: a fixed setting or a new version may apply them now
        while not stop.is_set():
            self.progress()
            self.wake.clear()
            async with self.turn():
                applied = await self.run_once()
            if applied:
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


def _stuck(order: Order | None) -> bool:
    return order is not None and order.stuck is not None


def _touches_stuck(batch: Batch) -> bool:
    """An order of the batch got stuck, or was and still is (its count may have changed)."""
    return any(o.stuck is not None for o in batch.orders.values())
