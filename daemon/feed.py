"""Feed intake: poll VTEX's order feed, journal every item durably, then commit it.

The order of operations is the whole point: items and their handles are written
in one SQLite transaction that reaches disk (`synchronous=FULL`), and only then
are the handles committed to VTEX. Every item is committed, including duplicates
and items omsd cannot parse. A failed commit is retried on the next round; once a
handle is older than the visibility timeout VTEX has made its item visible again,
so the handle is dropped and dedup absorbs the redelivery.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

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
        self.stats.polls += 1
        if self._health is not None:
            self._health.poll_ok()
        if not items:
            return 0
        now = self._clock()
        intakes = [intake.feed_item(item, now) for item in items]
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
        self.stats.items += len(items)
        if self._on_journal is not None and any(not r.duplicate for r in results):
            self._on_journal()
        await self.flush_commits()
        return len(items)

    async def flush_commits(self) -> None:
        """Commit every durable handle not yet committed, in chunks."""
        while handles := await self._store.pending_acks(limit=100):
            try:
                await self._vtex.commit_feed(handles)
            except VtexError as exc:
                self.stats.commit_failures += 1
                self._metrics.feed_commit_failures.inc()
                cutoff = self._clock() - timedelta(seconds=self._settings.feed_visibility_timeout_s)
                dropped = await self._store.acks_failed(handles, str(exc), drop_before=cutoff)
                log.warning("feed_commit_failed", handles=len(handles), error=str(exc), dropped=dropped)
                return
            await self._store.acks_done(handles)
            self.stats.commits += len(handles)
            self._metrics.feed_commits.inc(len(handles))

    async def run(self, stop: asyncio.Event) -> None:
        """Poll until `stop`. Any non-empty batch is followed at once by another (a
        short batch does not mean the queue is empty); after an empty one omsd waits
        `poll_interval_s` (which does not prove the queue empty either: polling goes on)."""
        while not stop.is_set():
            if self._health is not None and not self._health.store_ok.is_set():
                # The database refuses writes: read nothing VTEX would have to redeliver.
                await wait_any(self._health.store_ok, stop, within_s=self._settings.poll_interval_s)
                continue
            try:
                delivered = await self.poll_once()
            except NotFound:
                delivered = 0
                if self._health is not None:
                    self._health.feed_config_ok = False
                try:
                    if await ensure_feed_config(self._vtex, self._settings, self._health) and self.on_config_recreated:
                        await self.on_config_recreated("feed configuration recreated")
                except AuthFailed:
                    raise
                except VtexError as exc:
                    log.error("feed_config_recreate_failed", error=str(exc))
            except AuthFailed:
                raise  # fatal: the process exits non-zero and its supervisor restarts it
            except VtexError as exc:
                self.stats.poll_failures += 1
                log.warning("feed_poll_failed", error=str(exc))
                delivered = 0
            except StoreUnwritable as exc:
                # Nothing was stored, so no handle was recorded: VTEX redelivers the items.
                log.warning("feed_intake_paused", error=exc.reason)
                delivered = 0
            if delivered:
                continue  # a short batch does not mean the queue is empty: ask again at once
            await wait_any(stop, within_s=self._settings.poll_interval_s)
        await self.flush_commits()
