"""Who gets the next request slot when the one budget is saturated.

Every VTEX call names a class. The `Arbiter` orders waiting calls: strict priority
by class, except that a class with a minimum share is served ahead of its turn as
soon as its credit says so. While a class waits, each grant (to anyone) adds its
share to its credit; when the credit reaches one grant it is served next and pays
one grant back. Credit is not banked while a class has nobody waiting, so a quiet
class cannot later burst past the others.

Why these classes, in this order:
- COMMIT: an uncommitted feed handle turns into a duplicate delivery after the
  visibility timeout, costing a GET and a commit again; commits are few (one per
  many handles).
- APPROVAL: the approval PUT. Its order was just confirmed free by a Get order: it
  finishes what the release path began, and the longer it waits the older that check.
- CHECK: the Get order that decides an approval when the order is known free
  (`pre_approval`), the one after a refusal (`after_refusal`), and the lookup that links
  an intent waiting parked (`link_intent`): a released order is what omsd exists for.
- INTAKE: feed GETs. A guaranteed share (one grant in four) so a flood of
  approvals or commits never stops omsd from reading the events that release orders.
- SPECULATIVE: a Get order that may find the order still held, being created or not
  there yet (`speculative`: an intent before any status, creation and held re-checks).
  Under load the feed tells the same for a tenth of a call; a small share (one in
  twenty) so it is late, never starved.
- BACKGROUND: link lookups, confirmation checks, configuration self-checks:
  everything that can wait. A small share (one in twenty) so it is late under load,
  never starved.

`PriorityGate` is the asyncio face: `async with gate.turn(cls)` lets one caller at
a time through, in the arbiter's order, to take its throttle slot.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from enum import IntEnum
from typing import Generic, TypeVar

T = TypeVar("T")


class Priority(IntEnum):
    COMMIT = 0
    APPROVAL = 1
    CHECK = 2
    INTAKE = 3
    SPECULATIVE = 4
    BACKGROUND = 5


MIN_SHARE: dict[Priority, float] = {Priority.INTAKE: 0.25, Priority.SPECULATIVE: 0.05, Priority.BACKGROUND: 0.05}


class Arbiter(Generic[T]):
    """Pure ordering of waiting callers: push waiters, pop the one to serve next."""

    def __init__(self, shares: dict[Priority, float] | None = None) -> None:
        self._shares = MIN_SHARE if shares is None else shares
        self._queues: dict[Priority, deque[T]] = {p: deque() for p in Priority}
        self._credit: dict[Priority, float] = dict.fromkeys(Priority, 0.0)

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def push(self, priority: Priority, item: T) -> None:
        self._queues[priority].append(item)

    def remove(self, priority: Priority, item: T) -> None:
        """Forget a waiter that gave up (cancelled)."""
        with suppress(ValueError):
            self._queues[priority].remove(item)

    def pop(self) -> T | None:
        """The next waiter to serve, or None when nobody waits."""
        waiting = [p for p in Priority if self._queues[p]]
        if not waiting:
            return None
        for p in Priority:
            if p in waiting:
                self._credit[p] += self._shares.get(p, 0.0)
            else:
                self._credit[p] = 0.0  # no banking while nobody of the class waits
        due = [p for p in waiting if self._credit[p] >= 1.0]
        chosen = due[0] if due else waiting[0]
        self._credit[chosen] = max(0.0, self._credit[chosen] - 1.0)
        return self._queues[chosen].popleft()


class PriorityGate:
    """One caller at a time through the gate, highest class first (see `Arbiter`)."""

    def __init__(self, shares: dict[Priority, float] | None = None) -> None:
        self._arbiter: Arbiter[asyncio.Future[None]] = Arbiter(shares)
        self._busy = False

    @asynccontextmanager
    async def turn(self, priority: Priority) -> AsyncIterator[None]:
        if self._busy or len(self._arbiter):
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._arbiter.push(priority, waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                self._arbiter.remove(priority, waiter)
                if waiter.done() and not waiter.cancelled():
                    self._next()  # the turn was handed to us as we were cancelled: pass it on
                raise
        self._busy = True
        try:
            yield
        finally:
            self._next()

    def _next(self) -> None:
        while (waiter := self._arbiter.pop()) is not None:
            if not waiter.done():
                waiter.set_result(None)  # the turn passes directly: _busy stays True
                return
        self._busy = False
