"""Waiting in loops: until woken, told to stop, or a timeout, whichever comes first."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

IDLE_S = 3600.0  # an alarm set for nothing sleeps this long between looks (it is woken when set)


async def wait_any(*events: asyncio.Event, within_s: float) -> None:
    """Return when any event is set or `within_s` seconds have passed."""
    if any(e.is_set() for e in events):
        return
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, timeout=within_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()


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
