"""Running the daemon's loops: every task owned, a database refusal waited out, shutdown
in order.

Loops run as siblings in one TaskGroup: if one raises, all stop and the error leaves
`run` (the daemon logs it once and exits non-zero; systemd restarts it). A loop whose
write the database refused (disk full) is not fatal: it waits until writes work again
(beating, so the watchdog knows it waits, not hangs) and starts again. Shutdown: the
intake loops stop first, then the work loops drain, each within what is left of
`grace_s`, after which they are cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from omsd.state.store import StoreUnwritable

from .logs import get_logger
from .waiting import wait_any

log = get_logger("omsd.supervisor")


def _nothing() -> None:
    return None


@dataclass(frozen=True)
class Loop:
    """A long-running task: `run(stop)` returns when `stop` is set."""

    name: str
    run: Callable[[asyncio.Event], Awaitable[None]]
    beat: Callable[[], None] = _nothing  # told while the loop waits for the database
    restart: Callable[[], Awaitable[object]] | None = None  # run before starting again after a refusal


class Supervisor:
    def __init__(self, store_ok: asyncio.Event, *, grace_s: float, retry_s: float) -> None:
        self._store_ok = store_ok
        self._grace_s = grace_s
        self._retry_s = retry_s

    async def run(
        self,
        stop: asyncio.Event,
        *,
        intake: Sequence[Loop],
        work: Sequence[Loop],
        side: Sequence[Loop] = (),
        on_stopping: Callable[[], None] = _nothing,
    ) -> None:
        """Until `stop`, then stop `intake`, drain `work` (and `side`), within the grace period.
        A loop of `intake` or `work` that ends unasked stops everything."""
        intake_stop, work_stop = asyncio.Event(), asyncio.Event()
        async with asyncio.TaskGroup() as tg:
            intakes = [tg.create_task(self._resilient(loop, intake_stop), name=loop.name) for loop in intake]
            works = [tg.create_task(self._resilient(loop, work_stop), name=loop.name) for loop in work]
            sides = [tg.create_task(self._resilient(loop, work_stop), name=loop.name) for loop in side]
            stopper = tg.create_task(stop.wait(), name="stop-signal")
            await asyncio.wait([stopper, *intakes, *works], return_when=asyncio.FIRST_COMPLETED)
            if not stop.is_set():
                # A loop ended without being asked to: stop the rest. If it raised,
                # the TaskGroup re-raises its error when this block exits.
                log.error("omsd_loop_ended", tasks=[t.get_name() for t in (*intakes, *works) if t.done()])
                stopper.cancel()
                intake_stop.set()
                work_stop.set()
                return
            log.info("omsd_stopping", grace_s=self._grace_s)
            on_stopping()
            deadline = asyncio.get_running_loop().time() + self._grace_s
            intake_stop.set()
            for task in intakes:
                await _wait_until(task, deadline)
            work_stop.set()
            for task in [*works, *sides]:
                await _wait_until(task, deadline)

    async def _resilient(self, loop: Loop, stop: asyncio.Event) -> None:
        """Run `loop` until it returns; when a write of it is refused, wait for the database
        (beating), then run `restart` (e.g. recovering effects its failure left started)
        and the loop again."""
        starting = loop.restart is not None and not self._store_ok.is_set()
        while True:
            try:
                if starting and loop.restart is not None:
                    await loop.restart()
                await loop.run(stop)
                return
            except* StoreUnwritable as group:
                log.warning("loop_paused_database_unwritable", loop=loop.name, error=str(group.exceptions[0]))
            starting = loop.restart is not None
            while not self._store_ok.is_set() and not stop.is_set():
                loop.beat()
                await wait_any(self._store_ok, stop, within_s=self._retry_s)
            if stop.is_set():
                return


async def _wait_until(task: asyncio.Task[Any], deadline: float) -> None:
    remaining = max(0.0, deadline - asyncio.get_running_loop().time())
    done, _ = await asyncio.wait([task], timeout=remaining)
    if not done:
        log.warning("shutdown_grace_exceeded", task=task.get_name())
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def first_error(exc: BaseException) -> BaseException:
    """The first error a TaskGroup collected (groups nest: a loop's own TaskGroup)."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc
