"""Feed items a stopped process may have taken and never journaled.

A feed GET hides its items at VTEX for the visibility timeout. A process that dies after a
GET answered and before its items were journaled (SIGKILL, a crash, a lost machine) leaves
them hidden for up to `OMSD_FEED_VISIBILITY_TIMEOUT_S` (240 s): a release among them would
wait that long, or for the held re-check (`OMSD_HELD_RECHECK_S`). In the restarts benchmark
(20 SIGKILLs in 64 s) a kill took about one item with it, and the approvals of the orders
whose release it was were not sent within the run.

So the database says whether a process reads the feed (`vtex_learned`, record `feed_reads`):
marked when the feed poller starts, cleared when it stops cleanly (its last round journaled
and committed). A start that finds the mark of a process that is gone re-checks every order
whose intent waits for its release: a `Resync`, which asks a speculative Get order (behind the
release path, docs/operations.md "Request budget"); a release the feed shows meanwhile moves
it onto the release path, a hold keeps the order waiting.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime

from omsd.state.store import Store, from_iso, iso

MARK = "feed_reads"


def _utcnow() -> datetime:
    return datetime.now(UTC)


class FeedReads:
    def __init__(self, store: Store, *, clock: Callable[[], datetime] = _utcnow) -> None:
        self._store = store
        self._clock = clock
        self._mine = False  # this process marked it (a loop started again after a refusal finds its own)

    async def begin(self) -> datetime | None:
        """Mark the feed as being read. Returns when the reads of a process that stopped without
        clearing its mark began, or None when the last one stopped cleanly (or never read)."""
        left = None if self._mine else _since(await self._store.learned.get(MARK))
        now = self._clock()
        await self._store.learned.put({MARK: json.dumps({"since": iso(now)})}, now=now)
        self._mine = True
        return left

    async def end(self) -> None:
        """Every item read was journaled (and its handle committed or kept): clear the mark."""
        await self._store.learned.put({MARK: json.dumps({})}, now=self._clock())
        self._mine = False


def _since(text: str | None) -> datetime | None:
    """When the marked reads began; a record that cannot be read counts as a mark (a re-check
    costs a few Get orders, a lost release minutes)."""
    if text is None:
        return None
    try:
        record = json.loads(text)
    except ValueError:
        record = None
    if not isinstance(record, dict):
        return datetime.min.replace(tzinfo=UTC)
    since = record.get("since")
    if since is None:
        return None
    try:
        at = from_iso(since) if isinstance(since, str) else None
    except ValueError:
        at = None
    return at if at is not None and at.tzinfo is not None else datetime.min.replace(tzinfo=UTC)
