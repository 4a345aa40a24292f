"""Waiting in loops: until woken, told to stop, or a timeout, whichever comes first."""

from __future__ import annotations

import asyncio


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


class Watermark:
    """A number that only rises (the last outcome seq committed, say), and waiters that wake
    the moment it passes the value they have seen. One waiter or ten thousand: each waits
    on the current generation's event, which `advance` sets and replaces."""

    def __init__(self, value: int = 0) -> None:
        self.value = value
        self._risen = asyncio.Event()
        self.waiting = 0  # waiters right now (long polls and streams, for the metric)

    def advance(self, value: int) -> None:
        if value > self.value:
            self.value = value
            risen, self._risen = self._risen, asyncio.Event()
            risen.set()

    def risen(self) -> asyncio.Event:
        """An event set the next time the value rises (check `value` before waiting on it)."""
        return self._risen

    async def wait_above(self, seen: int, within_s: float) -> bool:
        """True once the value is above `seen`; False when `within_s` passed first."""
        if self.value > seen:
            return True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_s
        self.waiting += 1
        try:
            while self.value <= seen:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return False
                await wait_any(self._risen, within_s=remaining)
        finally:
            self.waiting -= 1
        return True
