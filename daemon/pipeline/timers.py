"""Timers: they are data (each order's one timer, mirrored in the `timers` table); here
the due ones become `TimerFired` journal events, when they come due.

The processor tells `Timers.set_at` the earliest timer each batch set; an `Alarm` fires at
that time (firings at least 20 ms apart), turns every due timer into an event (deleting
it in the same transaction), wakes the processor and sets itself for the next one. At
start-up it fires at once: timers left by the last run. One mechanism: a firing that
fails ends the loop, which the supervisor restarts (and the process, if it is no
database refusal: the error is fatal).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from omsd.state.store import Store

from ..ops.waiting import wait_any

IDLE_S = 3600.0  # an alarm set for nothing sleeps this long between looks (it is woken when set)


class Timers:
    def __init__(
        self, store: Store, wake: Callable[[], None], *, clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    ) -> None:
        self._store = store
        self._wake = wake
        self._clock = clock
        self.alarm = Alarm(clock=clock)

    def set_at(self, when: datetime) -> None:
        self.alarm.set_at(when)

    async def fire(self) -> None:
        """Turn due timers into events, then set the alarm for the next one (it holds only
        the earliest it was told of)."""
        if await self._store.outbox.fire_due_timers(self._clock()):
            self._wake()
        if (due := await self._store.outbox.next_timer_due()) is not None:
            self.alarm.set_at(due)

    async def run(self, stop: asyncio.Event) -> None:
        self.alarm.set_at(self._clock())  # timers left by the last run: fire the due, then the next
        await self.alarm.run(self.fire, stop)


class Alarm:
    """Runs `fire` at the earliest time it was set for (wall clock), then waits to be set
    again. A later time never postpones an earlier one; firings are at least `min_gap_s`
    apart, so many due times close together cost one firing, not one each."""

    def __init__(self, *, min_gap_s: float = 0.02, clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self._min_gap_s = min_gap_s
        self._clock = clock
        self._due: float | None = None  # loop time
        self._changed = asyncio.Event()

    def set_at(self, when: datetime) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time() + (when - self._clock()).total_seconds()
        if self._due is None or due < self._due:
            self._due = due
            self._changed.set()

    async def run(self, fire: Callable[[], Awaitable[object]], stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            self._changed.clear()
            due = self._due
            if due is None or (wait := due - loop.time()) > 0:
                await wait_any(self._changed, stop, within_s=IDLE_S if due is None else wait)
                continue
            self._due = None
            await fire()
            await wait_any(stop, within_s=self._min_gap_s)
