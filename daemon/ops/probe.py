"""Whether the database takes writes, found by writing, never by a reader.

A write probe (a page-sized row written and deleted, committed to disk) runs on its own
schedule: every `store_probe_s` while the database refuses writes (the first that
commits clears the alarm and resumes intake), every `PROBE_OK_EVERY` probes' worth of
that while it takes them. `/readyz` may ask for a fresh answer, at most once a
`min_gap_s` (one probe shared by concurrent callers); `/metrics` and everything else
read the last answer. So no scrape or probe of ours writes more than one page a second.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from omsd.state.store.db import Database

from .metrics import Metrics
from .waiting import wait_any

PROBE_OK_EVERY = 6  # while writes work, one probe every this many `store_probe_s` (30 s by default)


class StoreProbe:
    def __init__(
        self,
        db: Database,
        metrics: Metrics,
        *,
        every_s: float,
        min_gap_s: float = 1.0,
        ok_every_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._db = db
        self._metrics = metrics
        self._every_s = every_s
        self._ok_every_s = ok_every_s if ok_every_s is not None else every_s * PROBE_OK_EVERY
        self._min_gap_s = min_gap_s
        self._clock = clock
        self._lock = asyncio.Lock()
        self._at: float | None = None
        self.ok = True  # the last probe's answer (a refused real write also makes the store say so)

    async def probe(self) -> bool:
        """Write now; remember and return whether the write committed."""
        async with self._lock:
            self.ok = await self._db.probe_write() is None
            self._at = self._clock()
        self._metrics.store_probes.labels(result="ok" if self.ok else "refused").inc()
        return self.ok

    async def fresh(self) -> bool:
        """An answer at most `min_gap_s` old: the last one, or a new probe."""
        if self._at is not None and self._clock() - self._at < self._min_gap_s:
            return self.ok
        if self._lock.locked():  # a probe is under way: share its answer
            async with self._lock:
                return self.ok
        return await self.probe()

    async def run(self, stop: asyncio.Event, writable: asyncio.Event) -> None:
        """Probe every `every_s` while `writable` is clear, every `ok_every_s` (PROBE_OK_EVERY ×
        `every_s`) while set."""
        while not stop.is_set():
            await wait_any(stop, within_s=self._every_s if not writable.is_set() else self._ok_every_s)
            if not stop.is_set():
                await self.probe()
