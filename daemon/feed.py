"""Feed intake: poll VTEX's order feed, journal every item durably, then commit it.

The order of operations is the whole point: items and their handles are written
in one SQLite transaction that reaches disk (`synchronous=FULL`), and only then
are the handles committed to VTEX. Every item is committed, including duplicates
and items omsd cannot parse. A failed commit is retried on the next round; once a
handle is older than the visibility timeout VTEX has made its item visible again,
so the handle is dropped and dedup absorbs the redelivery.

Intake is pipelined: `feed_concurrency` readers keep GETs in flight while one
writer journals whatever batches have arrived in one transaction (a group commit:
one fsync for several batches) and a committer commits the durable handles, up to
`COMMIT_MAX` per POST and `COMMITS_IN_FLIGHT` POSTs at once, while the writer
journals the next batches. The feed is an SQS-like queue: concurrent GETs receive different messages,
and an occasional message delivered to two of them is absorbed by dedup. Only the
first reader polls an idle feed; the others join while it finds items, so an idle
feed costs one GET per poll interval, as before.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from omsd.daemon import intake
from omsd.daemon.errors import AuthFailed, NotFound, VtexError
from omsd.daemon.health import Health
from omsd.daemon.logs import get_logger
from omsd.daemon.metrics import Metrics
from omsd.daemon.settings import Settings
from omsd.daemon.vtex import VtexApi
from omsd.daemon.vtexconfig import ensure_feed_config
from omsd.daemon.wakeup import wait_any
from omsd.state.store import Store, StoreUnwritable

log = get_logger("omsd.feed")

# VTEX publishes no maximum number of handles per commit (../shared/vtex/README.md §1.3);
# 100 is ten full batches, a request body of a few kilobytes.
COMMIT_MAX = 100
# Batches read but not yet journaled. While the database is busy (the processor and the
# effect runner write to it too) readers go on filling this, and the writer journals it
# all in its next transaction: the slower each fsync, the more it carries.
QUEUED_BATCHES = 32
COMMITS_IN_FLIGHT = 4
_DONE = object()  # a reader's last word to the writer


@dataclass(slots=True)
class FeedStats:
    polls: int = 0
    items: int = 0
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    commits: int = 0
    commit_failures: int = 0
    poll_failures: int = 0


class FeedPoller:
    def __init__(
        self,
        store: Store,
        vtex: VtexApi,
        settings: Settings,
        *,
        on_journal: Callable[[], None] | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        metrics: Metrics | None = None,
        health: Health | None = None,
    ) -> None:
        self._store = store
        self._vtex = vtex
        self._settings = settings
        self._on_journal = on_journal
        self._clock = clock
        self._metrics = metrics or Metrics()
        self._health = health
        self.stats = FeedStats()
        self.on_config_recreated: Callable[[str], Awaitable[None]] | None = None
        self._recreating = asyncio.Lock()

    async def poll_once(self) -> int:
        """One round: flush old commits, read a batch, journal it, commit it.
        Returns the number of items VTEX delivered."""
        await self.flush_commits()
        try:
            items = await self._vtex.get_feed(self._settings.maxlot)
        except NotFound:
            log.error("feed_not_configured", hint="omsd recreates the configuration at start-up")
            self.stats.poll_failures += 1
            raise
        self._polled()
        if items:
            await self._journal([items])
            await self.flush_commits()
        return len(items)

    def _polled(self) -> None:
        self.stats.polls += 1
        if self._health is not None:
            self._health.poll_ok()

    async def _journal(self, batches: list[list[Any]]) -> None:
        """Journal the items of several batches, and their handles, in one durable transaction."""
        now = self._clock()
        intakes = [intake.feed_item(item, now) for items in batches for item in items]
        results = await self._store.append(
            [i.entry for i in intakes], acks=[i.handle for i in intakes if i.handle is not None], now=now
        )
        for item, result in zip(intakes, results, strict=True):
            if result.duplicate:
                self.stats.duplicates += 1
                self._metrics.duplicates.labels(source="feed").inc()
            elif item.accepted:
                self.stats.accepted += 1
                self._metrics.events_in.labels(source="feed").inc()
            else:
                self.stats.rejected += 1
                self._metrics.rejected.labels(source="feed").inc()
                log.warning("feed_item_rejected", offset=result.offset, reason=item.entry.reason)
        self.stats.items += len(intakes)
        if self._on_journal is not None and any(not r.duplicate for r in results):
            self._on_journal()

    async def flush_commits(self) -> None:
        """Commit every durable handle not yet committed: up to COMMIT_MAX per request,
        COMMITS_IN_FLIGHT requests at once. A failure stops the round (retried later)."""
        while handles := await self._store.pending_acks(limit=COMMIT_MAX * COMMITS_IN_FLIGHT):
            chunks = [handles[i : i + COMMIT_MAX] for i in range(0, len(handles), COMMIT_MAX)]
            if not all(await asyncio.gather(*(self._commit(chunk) for chunk in chunks))):
                return

    async def _commit(self, handles: list[str]) -> bool:
        try:
            await self._vtex.commit_feed(handles)
        except VtexError as exc:
            self.stats.commit_failures += 1
            self._metrics.feed_commit_failures.inc()
            cutoff = self._clock() - timedelta(seconds=self._settings.feed_visibility_timeout_s)
            dropped = await self._store.acks_failed(handles, str(exc), drop_before=cutoff)
            log.warning("feed_commit_failed", handles=len(handles), error=str(exc), dropped=dropped)
            return False
        await self._store.acks_done(handles)
        self.stats.commits += len(handles)
        self._metrics.feed_commits.inc(len(handles))
        return True

    async def run(self, stop: asyncio.Event) -> None:
        """Read with `feed_concurrency` readers, journal here, commit in a task, until `stop`.
        Any non-empty batch is followed at once by another (a short batch does not mean
        the queue is empty); after an empty one the first reader waits `poll_interval_s`
        (which does not prove the queue empty either: polling goes on)."""
        batches: asyncio.Queue[object] = asyncio.Queue(maxsize=QUEUED_BATCHES)
        finding, journaled, written = asyncio.Event(), asyncio.Event(), asyncio.Event()
        tasks = [
            asyncio.create_task(self._reader(n, stop, batches, finding), name=f"feed-reader-{n}")
            for n in range(self._settings.feed_concurrency)
        ]
        tasks.append(asyncio.create_task(self._committer(journaled, written, batches), name="feed-committer"))
        try:
            await self._writer(batches, self._settings.feed_concurrency, journaled)
            written.set()
            await tasks[-1]
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _writer(self, batches: asyncio.Queue[object], readers: int, journaled: asyncio.Event) -> None:
        """Journal what the readers deliver, every batch waiting in one transaction, until
        every reader is done; raise what a reader or the committer raised."""
        while readers:
            got = [await batches.get()]
            while not batches.empty():
                got.append(batches.get_nowait())
            for item in got:
                if isinstance(item, BaseException):
                    raise item
            readers -= sum(1 for item in got if item is _DONE)
            ready = [item for item in got if isinstance(item, list)]
            if not ready:
                continue
            try:
                await self._journal(ready)
            except StoreUnwritable as exc:
                # Nothing was stored, so no handle was recorded: VTEX redelivers the items.
                log.warning("feed_intake_paused", error=exc.reason)
                continue
            journaled.set()

    async def _committer(self, journaled: asyncio.Event, written: asyncio.Event, out: asyncio.Queue[object]) -> None:
        """Commit durable handles as they are journaled (and retry failed ones every poll
        interval), while the writer journals the next batches; a last round once it is done."""
        try:
            while True:
                await wait_any(journaled, written, within_s=self._settings.poll_interval_s)
                journaled.clear()
                last = written.is_set()
                try:
                    await self.flush_commits()
                except StoreUnwritable as exc:
                    log.warning("feed_commit_paused", error=exc.reason)
                if last:
                    return
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            if written.is_set():
                raise  # the writer is done: run() awaits this task and sees it
            await out.put(exc)

    async def _reader(self, n: int, stop: asyncio.Event, out: asyncio.Queue[object], finding: asyncio.Event) -> None:
        """Reader `n`: GET batches and hand them to the writer. Reader 0 polls an idle feed
        every `poll_interval_s`; the others wait until some reader finds items again."""
        try:
            while not stop.is_set():
                if self._health is not None and not self._health.store_ok.is_set():
                    # The database refuses writes: read nothing VTEX would have to redeliver.
                    await wait_any(self._health.store_ok, stop, within_s=self._settings.poll_interval_s)
                    continue
                items = await self._read()
                if items:
                    finding.set()
                    await out.put(items)
                    if n == 0 or len(items) >= self._settings.maxlot:
                        # A short batch does not mean the queue is empty: ask again at once. Only
                        # full batches (a backlog) keep the other readers going: on a trickle they
                        # would spend the request budget on near-empty GETs, ahead of approvals.
                        continue
                    await wait_any(stop, within_s=self._settings.poll_interval_s)
                    continue
                finding.clear()
                if n == 0:
                    await wait_any(stop, within_s=self._settings.poll_interval_s)
                else:
                    await wait_any(finding, stop, within_s=3600.0)  # woken by reader 0's finds
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # AuthFailed and the unforeseen end the daemon's loop
            await out.put(exc)
            return
        await out.put(_DONE)

    async def _read(self) -> list[Any]:
        """One GET; a missing configuration is recreated, a failure reads as nothing."""
        try:
            items = await self._vtex.get_feed(self._settings.maxlot)
        except NotFound:
            self.stats.poll_failures += 1
            log.error("feed_not_configured", hint="omsd recreates it")
            if self._health is not None:
                self._health.feed_config_ok = False
            try:
                async with self._recreating:  # one reader recreates it; the others then find it
                    recreated = await ensure_feed_config(self._vtex, self._settings, self._health)
                if recreated and self.on_config_recreated is not None:
                    await self.on_config_recreated("feed configuration recreated")
            except AuthFailed:
                raise
            except VtexError as exc:
                log.error("feed_config_recreate_failed", error=str(exc))
            return []
        except AuthFailed:
            raise  # fatal: the process exits non-zero and its supervisor restarts it
        except VtexError as exc:
            self.stats.poll_failures += 1
            log.warning("feed_poll_failed", error=str(exc))
            return []
        self._polled()
        return items
