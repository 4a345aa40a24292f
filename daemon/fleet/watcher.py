"""The journal watcher: one loop for the whole fleet instead of a poll per account.

A processor must see rows another process appended to its database (`omsd approve`, `omsd
retry`); alone, omsd asks its journal every second. A fleet of a thousand accounts would ask
a thousand times a second. Instead this loop looks at each database's write-ahead log once a
`every_s` (one `stat`: every commit in WAL mode writes to it, so its size or time changes)
and wakes the processor of each database that changed. The version it keeps per database
also tells the metrics which accounts' gauges need reading again.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

from ..ops.waiting import wait_any

Stamp = tuple[int, int] | None


def _stamp(wal: str) -> Stamp:
    try:
        st = os.stat(wal)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns)


class JournalWatcher:
    def __init__(self, every_s: float = 1.0) -> None:
        self.every_s = every_s
        self._watched: dict[str, tuple[Callable[[], None], Stamp]] = {}  # -wal path -> (wake, last stamp)
        self._versions: dict[str, int] = {}
        self.looks = 0  # rounds done (tests, benchmarks)

    def watch(self, db: Path, wake: Callable[[], None]) -> Callable[[], None]:
        """Call `wake` whenever `db` changes; returns the call that stops watching it."""
        wal = f"{db}-wal"
        self._watched[wal] = (wake, _stamp(wal))
        self._versions.setdefault(wal, 0)

        def unwatch() -> None:
            self._watched.pop(wal, None)
            self._versions.pop(wal, None)

        return unwatch

    def version(self, db: Path) -> int:
        """A number that grows each time `db` was seen changed (-1: not watched)."""
        return self._versions.get(f"{db}-wal", -1)

    def look(self) -> int:
        """One round: wake the processors of the databases that changed; returns how many."""
        changed = 0
        for wal, (wake, last) in list(self._watched.items()):
            now = _stamp(wal)
            if now != last:
                self._watched[wal] = (wake, now)
                self._versions[wal] = self._versions.get(wal, 0) + 1
                wake()
                changed += 1
        self.looks += 1
        return changed

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await wait_any(stop, within_s=self.every_s)
            self.look()
