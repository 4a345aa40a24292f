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
and an occasional message delivered to two of them is absorbed by dedup.

The first reader polls in rounds (`_lead`); the others read only while batches come
back full, i.e. while a backlog drains, one more for each full batch (`_helper`). A
round ends when an empty answer is confirmed: SQS short polling samples some of its servers, so an empty answer can
come while items wait, and asking again finds them; an empty answer is asked again
after `RECHECK_S`, up to `feed_empty_rechecks` times in a row and `ROUND_RECHECKS`
times a round. An idle feed costs 1 + `feed_empty_rechecks` GETs per
`poll_interval_s` (docs/design.md, "Feed polling").
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from omsd.state.store import Store, StoreUnwritable

from ..config.settings import Settings
from ..ops.health import Health
from ..ops.logs import get_logger
from ..ops.metrics import Metrics
from ..ops.replica import ReplicaUnavailable
from ..ops.waiting import wait_any
from ..vtex.client import VtexApi
from ..vtex.errors import AuthFailed, NotFound, VtexError
from . import entries

log = get_logger("omsd.feed")

# VTEX publishes no maximum number of handles per commit (../shared/vtex/README.md §1.3);
# 100 is ten full batches, a request body of a few kilobytes.
COMMIT_MAX = 100
# Batches read but not yet journaled. While the database is busy (the processor and the
# effect runner write to it too) readers go on filling this, and the writer journals it
# all in its next transaction: the slower each fsync, the more it carries.
QUEUED_BATCHES = 32
COMMITS_IN_FLIGHT = 4
# An empty answer is asked again this soon (AWS: a repeated short-poll receive samples other
# servers and returns the messages an empty one missed).
RECHECK_S = 0.1
# At most this many rechecks in a polling round (or `feed_empty_rechecks`, if more; a full batch
# gives them back): on a trickle a recheck mostly finds the events that arrived since, and must
# not keep the reader asking.
ROUND_RECHECKS = 4
# Journaled handles wait this long at most for more to join their POST, unless a POST's
# worth waits or the first reader's round ends: one commit per round, not one per GET, also
# when a saturated budget makes GETs slow. Far inside the visibility timeout (at least 10 s).
# A steady stream of events never ends the round (each answer has items), so this is what
# holds a handle: at 5 s, event → commit was p50 3.3 s, p99 8.5 s at 3 orders/s; at 1 s a
# commit a second carries the ~20 handles that came (commits go first in the budget).
COMMIT_LINGER_S = 1.0
Wait = Callable[..., Awaitable[None]]  # wait_any's shape: (*events, within_s)
_DONE = object()  # a reader's last word to the writer


@dataclass(slots=True)
class _Pipeline:
    """What the readers, the writer and the committer of one `run` share."""

    stop: asyncio.Event
    batches: asyncio.Queue[object]
    go: list[asyncio.Event] = field(default_factory=list)  # one per other reader: set while it should read
    wanted: int = 0  # other readers asked to read: one more per full batch, none after a short one
    journaled: asyncio.Event = field(default_factory=asyncio.Event)  # handles journaled since the last commit round
    commit_now: asyncio.Event = field(default_factory=asyncio.Event)  # a POST's worth waits, or a round ended
    written: asyncio.Event = field(default_factory=asyncio.Event)  # the writer is done: one last commit round
    unflushed: int = 0  # handles journaled since the last commit round began
    journaling: bool = False  # the writer is writing batches (their handles are not counted yet)
    round_over: bool = False  # the first reader's round ended: commit whatever waits

    def full_batch(self) -> None:
        """A full batch: one more reader joins (a backlog ramps up to every reader)."""
        self.wanted = min(self.wanted + 1, len(self.go))
        for go in self.go[: self.wanted]:
            go.set()

    def short_batch(self) -> None:
        """A short or empty batch: the other readers stop after their GET in flight."""
        self.wanted = 0
        for go in self.go:
            go.clear()

    def waiting(self) -> bool:
        """Handles journaled, or about to be, that no commit round has taken yet."""
        return bool(self.unflushed) or self.journaling or not self.batches.empty()


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
        wait: Wait = wait_any,
        commit_linger_s: float = COMMIT_LINGER_S,
        durable: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._store = store
        self._vtex = vtex
        self._settings = settings
        self._on_journal = on_journal
        self._clock = clock
        self._metrics = metrics or Metrics()
        self._health = health
        self._wait = wait  # every wait of the readers and the committer (a test records them)
        self._commit_linger_s = commit_linger_s
        # Replicated durability (`Replica.synced`): a handle is committed only once the journal
        # rows behind it are on the replica; ReplicaUnavailable keeps the handles for a later round.
        self._durable = durable
        # Told when VTEX answers 404: it has no feed configuration (deleted after inactivity).
        self.on_missing: Callable[[], Awaitable[None]] | None = None
        # With the hook as well (`OMSD_SOURCE=both`) the hook pushes a change before the feed
        # delivers it, which makes the feed's copy a duplicate: told the change time of the
        # oldest new one, which the hook has not pushed (yet), each time the feed delivers some.
        self.on_hook_missed: Callable[[datetime], None] | None = None

    def _polled(self) -> None:
        if self._health is not None:
            self._health.poll_ok()

    async def _journal(self, batches: list[list[Any]]) -> int:
        """Journal the items of several batches, and their handles, in one durable transaction.
        Returns how many handles are now waiting to be committed."""
        now = self._clock()
        intakes = [entries.feed_item(item, now) for items in batches for item in items]
        acks = [i.handle for i in intakes if i.handle is not None]
        results = await self._store.journal.append([i.entry for i in intakes], acks=acks, now=now)
        for item, result in zip(intakes, results, strict=True):
            if result.duplicate:
                self._metrics.duplicates.labels(source="feed").inc()
            elif item.accepted:
                self._metrics.events_in.labels(source="feed").inc()
            else:
                self._metrics.rejected.labels(source="feed").inc()
                log.warning("feed_item_rejected", offset=result.offset, reason=item.entry.reason)
        if self._on_journal is not None and any(not r.duplicate for r in results):
            self._on_journal()
        if self.on_hook_missed is not None:
            new = [i.changed_at for i, r in zip(intakes, results, strict=True) if not r.duplicate and i.changed_at]
            if new:
                self.on_hook_missed(min(new))
        return len(acks)

    async def flush_commits(self, *, everything: bool = True) -> int:
        """Commit every durable handle not yet committed: up to COMMIT_MAX per request,
        COMMITS_IN_FLIGHT requests at once. A failure stops the round (retried later).
        Not `everything` (a backlog flows): only full requests go, the oldest handles
        first; fewer than COMMIT_MAX wait for the next round (a backlog fills it within
        a fraction of a second; the round's end, the linger and the stop take the rest).
        Each request spends a call of the budget that a GET of ten items could have had:
        at 100 calls/s a partial commit after each POST's worth was 295 commits for 20,000
        handles instead of 200; and at 20 calls/s, one commit per batch was 1,677 commits
        for 2,002 GETs. Returns how many handles it left for the next round that way."""
        while handles := await self._store.journal.pending_acks(limit=COMMIT_MAX * COMMITS_IN_FLIGHT):
            if not everything:
                whole = len(handles) // COMMIT_MAX * COMMIT_MAX
                if not whole:
                    return len(handles)
                handles = handles[:whole]
            if self._durable is not None:
                try:
                    await self._durable()  # one sync covers every handle read above
                except ReplicaUnavailable as exc:
                    log.warning("feed_commit_paused", handles=len(handles), error=f"replica not current: {exc}")
                    return 0
            chunks = [handles[i : i + COMMIT_MAX] for i in range(0, len(handles), COMMIT_MAX)]
            if not all(await asyncio.gather(*(self._commit(chunk) for chunk in chunks))):
                return 0
        return 0

    async def _commit(self, handles: list[str]) -> bool:
        try:
            await self._vtex.commit_feed(handles)
        except VtexError as exc:
            self._metrics.feed_commit_failures.inc()
            cutoff = self._clock() - timedelta(seconds=self._settings.feed_visibility_timeout_s)
            dropped = await self._store.journal.acks_failed(handles, str(exc), drop_before=cutoff)
            log.warning("feed_commit_failed", handles=len(handles), error=str(exc), dropped=dropped)
            return False
        await self._store.journal.acks_done(handles)
        self._metrics.feed_commits.inc(len(handles))
        return True

    async def run(self, stop: asyncio.Event) -> None:
        """Read with `feed_concurrency` readers, journal here, commit in a task, until `stop`."""
        readers = self._settings.feed_concurrency
        p = _Pipeline(stop, asyncio.Queue(maxsize=QUEUED_BATCHES), go=[asyncio.Event() for _ in range(readers - 1)])
        tasks = [asyncio.create_task(self._reader(n, p), name=f"feed-reader-{n}") for n in range(readers)]
        tasks.append(asyncio.create_task(self._committer(p), name="feed-committer"))
        try:
            await self._writer(p, readers)
            p.written.set()
            await tasks[-1]
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _writer(self, p: _Pipeline, readers: int) -> None:
        """Journal what the readers deliver, every batch waiting in one transaction, until
        every reader is done; raise what a reader or the committer raised."""
        while readers:
            got = [await p.batches.get()]
            while not p.batches.empty():
                got.append(p.batches.get_nowait())
            for item in got:
                if isinstance(item, BaseException):
                    raise item
            readers -= sum(1 for item in got if item is _DONE)
            ready = [item for item in got if isinstance(item, list)]
            if not ready:
                continue
            p.journaling = True
            try:
                p.unflushed += await self._journal(ready)
            except StoreUnwritable as exc:
                # Nothing was stored, so no handle was recorded: VTEX redelivers the items.
                log.warning("feed_intake_paused", error=exc.reason)
                continue
            finally:
                p.journaling = False
            p.journaled.set()
            if p.unflushed >= COMMIT_MAX:
                p.commit_now.set()

    async def _committer(self, p: _Pipeline) -> None:
        """Commit durable handles once they are journaled (and retry failed ones every poll
        interval), while the writer journals the next batches; a last round once it is done.
        Journaled handles wait up to COMMIT_LINGER_S for more to join their POST."""
        try:
            while True:
                await self._wait(p.journaled, p.written, within_s=self._settings.poll_interval_s)
                if p.journaled.is_set():
                    await self._wait(p.commit_now, p.written, within_s=self._commit_linger_s)
                last = p.written.is_set()
                # A POST's worth journaled while the round goes on: whole POSTs only. Anything
                # else (the round's end, the linger, a retry, the stop): whatever waits.
                flowing = p.commit_now.is_set() and not p.round_over and not last
                p.journaled.clear()
                p.commit_now.clear()
                p.unflushed = 0
                p.round_over = False
                try:
                    if left := await self.flush_commits(everything=not flowing):
                        # they wait as if just journaled: for the next POST's worth, the round's end, the linger
                        p.unflushed = max(p.unflushed, left)
                        p.journaled.set()
                except StoreUnwritable as exc:
                    log.warning("feed_commit_paused", error=exc.reason)
                if last:
                    return
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            if p.written.is_set():
                raise  # the writer is done: run() awaits this task and sees it
            await p.batches.put(exc)

    async def _reader(self, n: int, p: _Pipeline) -> None:
        """Reader `n`: GET batches and hand them to the writer (`_lead` or `_helper`)."""
        try:
            await (self._lead(p) if n == 0 else self._helper(p, p.go[n - 1]))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # AuthFailed and the unforeseen end the daemon's loop
            await p.batches.put(exc)
            return
        await p.batches.put(_DONE)

    async def _lead(self, p: _Pipeline) -> None:
        """The first reader polls in rounds. A non-empty answer is followed at once (a short
        batch does not mean the queue is empty). An empty one is asked again after RECHECK_S,
        up to `feed_empty_rechecks` times in a row, and ROUND_RECHECKS times a round in all,
        so a trickle cannot keep it asking; a full batch (a backlog) gives those back. An
        empty answer with no recheck left ends the round: its handles are committed and the
        reader sleeps until `poll_interval_s` after the round began, so rounds start every
        `poll_interval_s` (rechecks do not stretch the interval an event may wait)."""
        s = self._settings
        in_a_row = in_round = 0
        began: datetime | None = None
        while not p.stop.is_set():
            if await self._paused(p.stop):
                continue
            began = began or self._clock()
            items = await self._read()
            if items:
                in_a_row = 0
                if len(items) >= s.maxlot:
                    in_round = 0
                await self._hand_over(p, items)
                continue
            p.short_batch()
            if in_a_row < s.feed_empty_rechecks and in_round < max(ROUND_RECHECKS, s.feed_empty_rechecks):
                in_a_row += 1
                in_round += 1
                await self._wait(p.stop, within_s=RECHECK_S)
                continue
            in_a_row = in_round = 0
            if p.waiting():
                p.round_over = True
                p.commit_now.set()
            spent = (self._clock() - began).total_seconds()
            began = None
            await self._wait(p.stop, within_s=min(s.poll_interval_s, max(0.0, s.poll_interval_s - spent)))

    async def _helper(self, p: _Pipeline, go: asyncio.Event) -> None:
        """The other readers read only while batches come back full (a backlog drains), one
        more for each full batch; on a trickle or an idle feed they wait and cost nothing."""
        while not p.stop.is_set():
            await self._wait(go, p.stop, within_s=3600.0)
            if not go.is_set() or await self._paused(p.stop):
                continue
            items = await self._read()
            if items:
                await self._hand_over(p, items)
            else:
                p.short_batch()

    async def _hand_over(self, p: _Pipeline, items: list[Any]) -> None:
        """Give a batch to the writer; a full one says a backlog may wait (one more reader)."""
        if len(items) >= self._settings.maxlot:
            p.full_batch()
        else:
            p.short_batch()
        await p.batches.put(items)

    async def _paused(self, stop: asyncio.Event) -> bool:
        """While the database refuses writes, or (replicated durability) the replica is
        behind, read nothing VTEX would have to redeliver: wait (up to a poll interval)
        and say so."""
        health = self._health
        if health is None or health.intake_problem is None:
            return False
        waiting_for = health.store_ok if not health.store_ok.is_set() else health.replica_ok
        await self._wait(waiting_for, stop, within_s=self._settings.poll_interval_s)
        return True

    async def _read(self) -> list[Any]:
        """One GET; a missing configuration is recreated, a failure reads as nothing."""
        try:
            items = await self._vtex.get_feed(self._settings.maxlot)
        except NotFound:
            log.error("feed_not_configured", hint="omsd recreates it")
            if self.on_missing is not None:
                await self.on_missing()
            return []
        except AuthFailed:
            raise  # fatal: the process exits non-zero and its supervisor restarts it
        except VtexError as exc:
            log.warning("feed_poll_failed", error=str(exc))
            return []
        self._polled()
        return items
