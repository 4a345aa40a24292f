"""Turns across a fleet's accounts, for the work that holds the event loop.

asyncio interleaves tasks only where they await. An account draining a backlog applies
batch after batch (reading rows, `apply`'s CPU, the commit), and each batch it starts
competes with a quiet account's one release, whose approval then waits behind it. With
turns, a processor applies one batch per turn; a turn goes to the accounts asking in the
order they asked (first come, first served), and an account that wants another turn asks
again behind those already waiting. So an account with work waits for at most one batch of
each account ahead of it, however long their backlogs: a busy account yields after every
batch to any account that asked meanwhile.

`at_once` turns may run together (their SQLite work runs in each account's own thread; the
Python part shares the interpreter).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

HISTORY = 256  # the last grants `Turns.history` keeps (tests, debugging)


class Turns:
    def __init__(self, at_once: int = 1) -> None:
        if at_once < 1:
            raise ValueError("at_once must be 1 or more")
        self._free = at_once
        self._waiting: deque[tuple[str, asyncio.Future[None]]] = deque()
        self.history: deque[str] = deque(maxlen=HISTORY)  # who was granted a turn, in order
        self.granted = 0

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @asynccontextmanager
    async def turn(self, who: str) -> AsyncIterator[None]:
        """Hold one turn for the block."""
        await self._acquire(who)
        try:
            yield
        finally:
            self._release()

    async def _acquire(self, who: str) -> None:
        if self._free > 0 and not self._waiting:
            self._free -= 1
            self._grant(who)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (who, future)
        self._waiting.append(entry)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self._release()  # granted just as it was cancelled: pass the turn on
            else:
                self._waiting.remove(entry)
            raise

    def _release(self) -> None:
        while self._waiting:
            who, future = self._waiting.popleft()
            if not future.done():
                self._grant(who)
                future.set_result(None)  # the turn passes straight to the next in line
                return
        self._free += 1

    def _grant(self, who: str) -> None:
        self.granted += 1
        self.history.append(who)
