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
from collections.abc import Callable
from datetime import UTC, datetime

from omsd.state.apply import apply, needs, read
from omsd.state.batch import Batch, Transition
from omsd.state.models import FetchOrder, Policy
from omsd.state.statuses import Phase
from omsd.state.store import Store

from ..ops.logs import get_logger
from ..ops.metrics import Metrics
from ..ops.waiting import wait_any

log = get_logger("omsd.processor")


class Processor:
    def __init__(
        self,
        store: Store,
        policy: Policy,
        *,
        batch_size: int = 200,
        max_batch_size: int = 2000,
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
        self._on_effects = on_effects
        self._on_timer = on_timer  # told the earliest timer each batch set, to fire it when due
        self._clock = clock
        self._metrics = metrics or Metrics()
        self.wake = asyncio.Event()
        self.applied = asyncio.Condition()
        self.offset = 0
        self.listeners: list[Callable[[Transition], None]] = []
        self.progress: Callable[[], None] = lambda: None  # called on every turn of `run`

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
        await self._store.derived.commit(batch, now=self._clock())
        self.offset = batch.offset
        self._committed(batch)
        async with self.applied:
            self.applied.notify_all()
        return len(rows)

    def _committed(self, batch: Batch) -> None:
        """Tell what the batch did, now that it happened: the effect runner and the timer
        alarm, the metrics, the log, the listeners."""
        if batch.unreadable:
            self._metrics.journal_unreadable.inc(len(batch.unreadable))
        if batch.expired:
            self._metrics.intents_expired.inc(batch.expired)
        if lookups := sum(1 for e in batch.effects if isinstance(e, FetchOrder) and e.purpose == "link_intent"):
            self._metrics.link_lookups.labels(trigger="intent").inc(lookups)
        if batch.effects and self._on_effects is not None:
            self._on_effects()
        if self._on_timer is not None and (dues := [o.timer.due_at for o in batch.orders.values() if o.timer]):
            self._on_timer(min(dues))
        logger = log.bind()  # resolved once per batch, not once per line
        for note in batch.notes:
            getattr(logger, note.level)(note.event, **note.fields)
        for t in batch.transitions:
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
