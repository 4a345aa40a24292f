"""The feed poller with a recording fake VTEX: journal first, then commit, everything."""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from omsd.daemon.config.settings import Settings
from omsd.daemon.intake import feed
from omsd.daemon.intake.feed import FeedPoller
from omsd.daemon.ops.health import Health
from omsd.daemon.ops.metrics import Metrics
from omsd.daemon.ops.waiting import wait_any
from omsd.daemon.vtex.configuration import VtexSetup
from omsd.daemon.vtex.errors import AuthFailed, NotFound
from omsd.daemon.vtex.fake import FakeVtex
from omsd.daemon.vtex.models import FeedConfig
from omsd.state.store import Store
from tests.helpers import FakeClock, feed_until, until
from tests.helpers import settings as base_settings

ITEM = {
    "eventId": "E1",
    "handle": "h1",
    "domain": "Fulfillment",
    "state": "waiting-for-manual-authorization",
    "lastState": "order-accepted",
    "orderId": "MKP-1-01",
    "lastChange": "2026-01-01T00:00:00.0000000Z",
    "currentChange": "2026-01-01T00:00:01.0000000Z",
}


class DurableFeed(FakeVtex):
    """The shipped fake; on each commit it notes what is durable in the database file."""

    def __init__(self, db: Path, batches: list[list[Any]]) -> None:
        super().__init__(batches)
        self.db = db
        self.durable_at_commit: list[int] = []
        self.polls = 0
        self.config_reads = 0

    async def get_feed(self, maxlot: int) -> list[Any]:
        self.polls += 1
        return await super().get_feed(maxlot)

    async def commit_feed(self, handles: list[str]) -> None:
        conn = sqlite3.connect(self.db)  # another connection: sees only committed data
        self.durable_at_commit.append(conn.execute("SELECT COUNT(*) FROM journal").fetchone()[0])
        conn.close()
        await super().commit_feed(handles)

    async def get_feed_config(self) -> FeedConfig | None:
        self.config_reads += 1
        return await super().get_feed_config()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return base_settings(db=tmp_path / "db")


async def test_items_are_durable_before_their_handles_are_committed(settings: Settings) -> None:
    """The commit to VTEX happens only after the journal rows reached the database."""
    async with await Store.open(settings.db) as store:
        vtex = DurableFeed(settings.db, [[ITEM, {**ITEM, "eventId": "E2", "handle": "h2", "state": "canceled"}]])
        await feed_until(FeedPoller(store, vtex, settings), lambda: len(vtex.committed) == 2, "two commits")
    assert vtex.committed == ["h1", "h2"]
    assert vtex.durable_at_commit == [2]


async def test_duplicates_and_rejected_items_are_committed_too(settings: Settings) -> None:
    """A redelivered item (new handle) and an unparseable item are both committed."""
    async with await Store.open(settings.db) as store:
        batches = [[ITEM], [{**ITEM, "handle": "h1-again"}, {"handle": "bad", "state": "teleported"}]]
        vtex = DurableFeed(settings.db, batches)
        metrics = Metrics()
        poller = FeedPoller(store, vtex, settings, metrics=metrics)
        await feed_until(poller, lambda: len(vtex.committed) == 3, "three commits")
        assert vtex.committed == ["h1", "h1-again", "bad"]
        counted = [
            metrics.sample(f"omsd_{n}_total", source="feed") for n in ("events_in", "duplicates", "rejected_input")
        ]
        assert counted == [1, 1, 1]
        assert await store.journal.last_offset() == 2


async def test_a_failed_commit_is_retried_next_round(settings: Settings) -> None:
    """The handle stays recorded and is committed by the next round."""
    async with await Store.open(settings.db) as store:
        vtex = DurableFeed(settings.db, [[ITEM]])
        vtex.fail_commits = 1
        metrics = Metrics()
        poller = FeedPoller(store, vtex, settings.model_copy(update={"poll_interval_s": 0.05}), metrics=metrics)
        await feed_until(poller, lambda: vtex.committed == ["h1"], "the handle committed")
        assert vtex.count("commit_feed") == 2 and metrics.sample("omsd_feed_commit_failures_total") == 1
        assert await store.journal.pending_acks() == []


async def test_missing_feed_config_is_created_from_settings(settings: Settings) -> None:
    """No configuration → POST with FromWorkflow, every filterable status, 240 s, 345600 s."""
    vtex = DurableFeed(settings.db, [])
    recreated: list[str] = []

    async def on_recreated(reason: str) -> None:
        recreated.append(reason)

    metrics = Metrics()
    now = [datetime(2026, 1, 1, tzinfo=UTC)]
    setup = VtexSetup(
        vtex, settings, Health(settings, metrics), metrics, on_recreated=on_recreated, clock=lambda: now[0]
    )
    assert await setup.confirm_until(asyncio.Event())
    [body] = vtex.saved_feed
    assert body["filter"]["type"] == "FromWorkflow" and len(body["filter"]["status"]) == 30
    assert body["queue"] == {"visibilityTimeoutInSeconds": 240, "MessageRetentionPeriodInSeconds": 345600}
    assert recreated == []  # created at start-up: nothing was missed
    vtex.feed_config = FeedConfig(raw=body)
    await setup.check()
    assert len(vtex.saved_feed) == 1
    vtex.feed_config = None
    await setup.feed_missing()  # within a request's timeout of the check: that GET may predate it
    assert len(vtex.saved_feed) == 1
    now[0] += timedelta(seconds=settings.http_timeout_s)
    await setup.feed_missing()
    assert len(vtex.saved_feed) == 2 and recreated == ["feed configuration recreated"]


async def test_a_short_batch_is_followed_at_once_and_an_empty_one_waits(settings: Settings) -> None:
    """One item (of maxlot 10) does not mean the queue is empty: omsd asks again at once;
    after an empty batch (no rechecks here) it waits poll_interval_s (an hour) before asking again."""
    slow = settings.model_copy(update={"poll_interval_s": 3600.0, "feed_concurrency": 1, "feed_empty_rechecks": 0})
    async with await Store.open(settings.db) as store:
        vtex = DurableFeed(settings.db, [[ITEM], [{**ITEM, "eventId": "E2", "handle": "h2", "state": "canceled"}]])
        stop = asyncio.Event()
        task = asyncio.create_task(FeedPoller(store, vtex, slow).run(stop))
        await until(lambda: vtex.polls >= 3, timeout=10, what="three polls without waiting")
        await asyncio.sleep(0)
        assert vtex.polls == 3  # the third came back empty: now it waits
        stop.set()
        await task
    assert vtex.committed == ["h1", "h2"]


async def test_a_poisoned_item_is_rejected_committed_and_the_loop_goes_on(settings: Settings) -> None:
    """An overflowing date and a lone surrogate in orderId (VTEX would redeliver them on
    every restart) become rejected entries, their handles are committed, and the poller
    goes on to the next batch instead of ending the daemon."""
    import asyncio

    from tests.helpers import until

    poison = [
        {**ITEM, "eventId": "P1", "handle": "p1", "currentChange": "0001-01-01T00:00:00+14:00"},
        {**ITEM, "eventId": "P2", "handle": "p2", "orderId": "MKP-\ud800-01"},
        {**ITEM, "eventId": "P3", "handle": "p3", "orderId": "9" * 60_000},
    ]
    async with await Store.open(settings.db) as store:
        vtex = DurableFeed(settings.db, [poison, [ITEM]])
        metrics = Metrics()
        poller = FeedPoller(store, vtex, settings, metrics=metrics)
        stop = asyncio.Event()
        task = asyncio.create_task(poller.run(stop))
        await until(lambda: "h1" in vtex.committed or task.done(), timeout=10, what="the good item committed")
        stop.set()
        await task
        assert vtex.committed == ["p1", "p2", "p3", "h1"]
        assert metrics.sample("omsd_rejected_input_total", source="feed") == 3
        assert metrics.sample("omsd_events_in_total", source="feed") == 1
        rejected = await store.journal.tail(10, kind="rejected")
        assert [r.reason is not None for r in rejected] == [True] * 3
        assert [r.order_id for r in rejected] == ["MKP-1-01", None, None]  # only a well-formed id is kept


@pytest.mark.parametrize(
    "body", [b"\xff\xfe[not utf-8]", b"[" * 5000 + b"]" * 5000], ids=["not utf-8", "nested 5000 deep"]
)
async def test_a_poisoned_feed_response_is_no_crash(body: bytes) -> None:
    """A feed answer that is not UTF-8 or nests too deep for the JSON parser escaped the
    client as UnicodeDecodeError/RecursionError and would end the poller: now it reads as
    a response without items (the poller asks again)."""
    import aiohttp

    from omsd.daemon.vtex.client import VtexClient
    from tests.http_mock import aioresponses

    settings = Settings(
        account="shop", app_key="k", app_token="t", connector_name="c", connector_endpoint="https://omsd.example.com"
    )
    async with aiohttp.ClientSession() as session:
        client = VtexClient(settings, session)
        with aioresponses() as m:
            m.get(
                "https://shop.vtexcommercestable.com.br/api/orders/feed?maxlot=10",
                body=body,
                content_type="application/json",
            )
            assert await client.get_feed(10) == []


def batch(first: int, size: int = 10) -> list[Any]:
    return [
        {**ITEM, "eventId": f"E{n}", "handle": f"h{n}", "orderId": f"MKP-{n}-01"} for n in range(first, first + size)
    ]


class ConcurrentFeed(DurableFeed):
    """Answers the first `alone` batches at once, then holds every non-empty GET until `width`
    GETs are in flight at once; records commit sizes."""

    def __init__(self, db: Path, batches: list[list[Any]], width: int, alone: int = 0) -> None:
        super().__init__(db, batches)
        self.width = width
        self.alone = alone
        self.in_flight = 0
        self.all_in = asyncio.Event()
        self.commit_sizes: list[int] = []

    async def get_feed(self, maxlot: int) -> list[Any]:
        self.polls += 1
        if not self.batches:
            return []
        items = self.batches.pop(0)
        if self.alone > 0:
            self.alone -= 1
            return items
        self.in_flight += 1
        if self.in_flight >= self.width:
            self.all_in.set()
        await self.all_in.wait()
        return items

    async def commit_feed(self, handles: list[str]) -> None:
        self.commit_sizes.append(len(handles))
        await super().commit_feed(handles)


async def test_concurrent_reads_are_journaled_in_one_transaction_and_committed_in_one_request(
    settings: Settings,
) -> None:
    """Each full batch brings one more reader in: after two, three GETs are in flight at once
    (the fake answers none of them before), the five batches reach the database in at most
    three transactions, and once the round ends all 50 handles are committed in a single POST,
    after they are durable."""
    three = settings.model_copy(update={"poll_interval_s": 3600.0, "feed_concurrency": 3})
    ticks = iter(range(1000))
    clock = lambda: datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=next(ticks))  # noqa: E731
    async with await Store.open(settings.db) as store:
        vtex = ConcurrentFeed(settings.db, [batch(n * 10) for n in range(5)], width=3, alone=2)
        stop = asyncio.Event()
        task = asyncio.create_task(FeedPoller(store, vtex, three, clock=clock, commit_linger_s=3600.0).run(stop))
        await until(lambda: len(vtex.committed) == 50 or task.done(), timeout=10, what="50 handles committed")
        stop.set()
        await task
        rows = await store.journal.after(0, 100)
    assert len(rows) == 50 and len({row.received_at for row in rows}) <= 3  # a transaction, a receipt time
    assert vtex.commit_sizes == [50]
    assert vtex.durable_at_commit == [50]


async def test_every_commit_follows_the_durability_of_its_items_under_concurrency(settings: Settings) -> None:
    """With four readers and many batches, each commit finds at least every handle committed so
    far, itself included, already journaled; no commit carries more than 100 handles."""
    four = settings.model_copy(update={"poll_interval_s": 3600.0, "feed_concurrency": 4})
    async with await Store.open(settings.db) as store:
        vtex = ConcurrentFeed(settings.db, [batch(n * 10) for n in range(40)], width=1)
        stop = asyncio.Event()
        task = asyncio.create_task(FeedPoller(store, vtex, four).run(stop))
        await until(lambda: len(vtex.committed) == 400 or task.done(), timeout=20, what="400 handles committed")
        stop.set()
        await task
    totals = [sum(vtex.commit_sizes[: i + 1]) for i in range(len(vtex.commit_sizes))]
    assert all(durable >= total for durable, total in zip(vtex.durable_at_commit, totals, strict=True))
    assert max(vtex.commit_sizes) <= 100 and sorted(vtex.committed) == sorted(f"h{n}" for n in range(400))


async def test_a_fatal_error_in_a_reader_ends_the_loop(settings: Settings) -> None:
    """AuthFailed in any reader ends run() with that error (the supervisor restarts omsd)."""

    class Refusing(DurableFeed):
        async def get_feed(self, maxlot: int) -> list[Any]:
            raise AuthFailed("GET /api/orders/feed: HTTP 401", 401, None)

    async with await Store.open(settings.db) as store:
        with pytest.raises(AuthFailed):
            await asyncio.wait_for(FeedPoller(store, Refusing(settings.db, []), settings).run(asyncio.Event()), 10)


async def test_a_failed_commit_is_retried_while_the_feed_is_idle(settings: Settings) -> None:
    """In the running loop, a handle whose commit failed is committed again though no new item arrives."""
    quick = settings.model_copy(update={"poll_interval_s": 0.05})
    async with await Store.open(settings.db) as store:
        vtex = DurableFeed(settings.db, [[ITEM]])
        vtex.fail_commits = 1
        stop = asyncio.Event()
        task = asyncio.create_task(FeedPoller(store, vtex, quick).run(stop))
        await until(lambda: vtex.committed == ["h1"] or task.done(), timeout=10, what="the retried commit")
        stop.set()
        await task
        assert await store.journal.pending_acks() == []


async def test_readers_that_all_find_the_feed_missing_recreate_it_once(settings: Settings) -> None:
    """Four readers (a backlog brought them in) answered 404 at once: the configuration is
    read and POSTed once; the others find it confirmed since their 404 and read nothing."""

    class Missing(DurableFeed):
        """A backlog (three full batches), then the configuration is gone for four GETs at once."""

        async def get_feed(self, maxlot: int) -> list[Any]:
            self.polls += 1
            if self.polls <= 3:
                return batch(self.polls * 10)  # full batches: one more reader each
            if self.polls > 7:
                return []
            self.in_flight += 1
            await until(lambda: self.in_flight >= 4, timeout=10, what="four GETs in flight")
            raise NotFound("GET /api/orders/feed: HTTP 404", 404, None)  # answered before any recreation

        async def get_feed_config(self) -> FeedConfig | None:
            self.config_reads += 1
            return self.feed_config

        async def save_feed_config(self, body: Any) -> None:
            await asyncio.sleep(0)
            self.saved_feed.append(dict(body))
            self.feed_config = FeedConfig(raw=dict(body))

    four = settings.model_copy(update={"poll_interval_s": 3600.0, "feed_concurrency": 4})
    async with await Store.open(settings.db) as store:
        vtex = Missing(settings.db, [])
        stop = asyncio.Event()
        poller = FeedPoller(store, vtex, four)
        metrics = Metrics()
        setup = VtexSetup(vtex, four, Health(four, metrics), metrics)
        handled = 0

        async def missing() -> None:
            nonlocal handled
            await setup.feed_missing()
            handled += 1

        poller.on_missing = missing
        task = asyncio.create_task(poller.run(stop))
        await until(lambda: handled >= 4 or task.done(), timeout=10, what="every reader handled its 404")
        stop.set()
        await task
    assert len(vtex.saved_feed) == 1 and vtex.config_reads == 1


class TrickleFeed(DurableFeed):
    """A feed that always has one item for the next GET (a trickle, never a backlog);
    records how many GETs were in flight at once for each GET."""

    def __init__(self, db: Path, items: int) -> None:
        super().__init__(db, [])
        self.left = items
        self.in_flight = 0
        self.overlap: list[int] = []

    async def get_feed(self, maxlot: int) -> list[Any]:
        self.polls += 1
        self.in_flight += 1
        try:
            await asyncio.sleep(0)  # let other readers' GETs start meanwhile
            self.overlap.append(self.in_flight)
            if self.left <= 0:
                return []
            self.left -= 1
            n = self.left
            return [{**ITEM, "eventId": f"T{n}", "handle": f"t{n}", "orderId": f"V-{n}-01"}]
        finally:
            self.in_flight -= 1


async def test_on_a_trickle_only_one_reader_keeps_polling(settings: Settings) -> None:
    """Short batches keep the first reader asking, and never wake the others: on a trickle
    eight readers spun on near-empty GETs and spent the request budget ahead of approvals
    (release → PUT p50 10.4 s against 5.8 s; then woken by every find, 108 of 226 GETs came
    back empty). Only full batches (a backlog) bring the other readers in."""
    eight = settings.model_copy(update={"poll_interval_s": 3600.0, "feed_concurrency": 8})
    async with await Store.open(settings.db) as store:
        vtex = TrickleFeed(settings.db, items=200)
        stop = asyncio.Event()
        task = asyncio.create_task(FeedPoller(store, vtex, eight).run(stop))
        await until(lambda: len(vtex.committed) == 200 or task.done(), timeout=20, what="200 handles committed")
        stop.set()
        await task
    assert max(vtex.overlap) == 1  # one GET at a time, from the start


class Sampling(DurableFeed):
    """An SQS short poll: `answers` in order (an empty one while items wait, as SQS may give),
    then nothing; records each GET and, per GET, how many handles were committed before it."""

    def __init__(self, db: Path, answers: list[list[Any]]) -> None:
        super().__init__(db, answers)
        self.committed_before: list[int] = []

    async def get_feed(self, maxlot: int) -> list[Any]:
        self.committed_before.append(len(self.committed))
        return await super().get_feed(maxlot)


# The first reader's sleep at a round's end: the poll interval (an hour here) less the round's
# own real time, a few milliseconds.
ROUND_END = pytest.approx(3600.0, abs=1.0)


def lead_waits(stop: asyncio.Event, limit: int, clock: FakeClock | None = None) -> tuple[list[float], feed.Wait]:
    """Record how long the first reader waits each time (its waits include `stop`), without
    waiting (but moving `clock`, when given, by each wait); `stop` is set after `limit` of
    them. The committer's waits pass through."""
    waits: list[float] = []
    real = wait_any

    async def recorded(*events: asyncio.Event, within_s: float) -> None:
        if stop not in events:
            await real(*events, within_s=within_s)
            return
        waits.append(within_s)
        if clock is not None:
            clock.now += within_s
        if len(waits) >= limit:
            stop.set()
        await asyncio.sleep(0)

    return waits, recorded


async def test_an_empty_answer_is_asked_again_soon_and_finds_what_was_waiting(settings: Settings) -> None:
    """SQS short polling may answer empty while messages wait; asked again ~100 ms later it
    returns them: the item is journaled and committed without waiting the poll interval (an hour)."""
    slow = settings.model_copy(update={"poll_interval_s": 3600.0, "feed_concurrency": 1})
    async with await Store.open(settings.db) as store:
        vtex = Sampling(settings.db, [[], [ITEM]])
        stop = asyncio.Event()
        task = asyncio.create_task(FeedPoller(store, vtex, slow).run(stop))
        await until(lambda: vtex.committed == ["h1"] or task.done(), timeout=10, what="the item behind an empty GET")
        stop.set()
        await task
    assert vtex.committed == ["h1"]


@pytest.mark.parametrize("rechecks", [0, 2, 3])
async def test_an_idle_feed_is_asked_k_more_times_then_once_per_interval(settings: Settings, rechecks: int) -> None:
    """An empty answer is confirmed by OMSD_FEED_EMPTY_RECHECKS more GETs, each after ~100 ms;
    then the first reader sleeps the poll interval, and the next round does the same: an idle
    feed costs 1 + K GETs per poll interval."""
    quiet = settings.model_copy(
        update={"poll_interval_s": 3600.0, "feed_concurrency": 1, "feed_empty_rechecks": rechecks}
    )
    async with await Store.open(settings.db) as store:
        vtex = Sampling(settings.db, [])
        stop, clock = asyncio.Event(), FakeClock()
        waits, wait = lead_waits(stop, limit=2 * (rechecks + 1), clock=clock)
        await asyncio.wait_for(FeedPoller(store, vtex, quiet, clock=clock.wall, wait=wait).run(stop), 10)
    # rounds start an interval apart: the sleep is what the rechecks left of it
    round_ = [feed.RECHECK_S] * rechecks + [pytest.approx(3600.0 - rechecks * feed.RECHECK_S)]
    assert waits == round_ * 2
    assert vtex.polls == len(waits)


async def test_any_answer_with_items_gives_the_rechecks_in_a_row_back(settings: Settings) -> None:
    """Mid-drain, SQS answers empty now and then while items wait: each empty answer gets its
    K rechecks again after any answer with items, so one round drains it all; only K + 1
    empty answers in a row end the round."""
    quiet = settings.model_copy(update={"poll_interval_s": 3600.0, "feed_concurrency": 1, "feed_empty_rechecks": 2})
    one = [batch(n, size=1) for n in range(3)]
    async with await Store.open(settings.db) as store:
        # item, empty, item, empty, item, empty, then empty for good
        vtex = Sampling(settings.db, [one[0], [], one[1], [], one[2], []])
        stop = asyncio.Event()
        waits, wait = lead_waits(stop, limit=5)
        await asyncio.wait_for(FeedPoller(store, vtex, quiet, wait=wait).run(stop), 10)
    assert waits == [feed.RECHECK_S] * 4 + [ROUND_END]
    assert vtex.polls == 8


async def test_a_round_makes_a_bounded_number_of_rechecks_so_a_trickle_cannot_keep_the_reader_busy(
    settings: Settings,
) -> None:
    """On a trickle each recheck finds the one event that arrived since; after ROUND_RECHECKS
    of them the next empty answer ends the round (the reader sleeps the poll interval)."""
    quiet = settings.model_copy(update={"poll_interval_s": 3600.0, "feed_concurrency": 1, "feed_empty_rechecks": 2})
    trickle = [answer for n in range(feed.ROUND_RECHECKS + 2) for answer in (batch(n, size=1), [])]
    async with await Store.open(settings.db) as store:
        vtex = Sampling(settings.db, trickle)
        stop = asyncio.Event()
        waits, wait = lead_waits(stop, limit=feed.ROUND_RECHECKS + 1)
        await asyncio.wait_for(FeedPoller(store, vtex, quiet, wait=wait).run(stop), 10)
    assert waits == [feed.RECHECK_S] * feed.ROUND_RECHECKS + [ROUND_END]
    assert vtex.polls == 2 * (feed.ROUND_RECHECKS + 1)


async def test_a_full_batch_gives_the_rechecks_back(settings: Settings) -> None:
    """While a backlog drains (full batches), an empty answer is a sample, not the end: a full
    batch restores the round's rechecks, so a long drain with scattered empty answers goes on."""
    quiet = settings.model_copy(update={"poll_interval_s": 3600.0, "feed_concurrency": 1, "feed_empty_rechecks": 1})
    drain = [answer for n in range(feed.ROUND_RECHECKS + 2) for answer in (batch(n * 10), [])]
    async with await Store.open(settings.db) as store:
        vtex = Sampling(settings.db, drain)
        stop = asyncio.Event()
        waits, wait = lead_waits(stop, limit=feed.ROUND_RECHECKS + 3)
        await asyncio.wait_for(FeedPoller(store, vtex, quiet, wait=wait).run(stop), 10)
    assert waits == [feed.RECHECK_S] * (feed.ROUND_RECHECKS + 2) + [ROUND_END]
    assert len(vtex.committed) == 10 * (feed.ROUND_RECHECKS + 2)


class OneAtATime(Sampling):
    """Answers GETs only once every item given so far is journaled, so each batch gets a
    transaction of its own; `last_get_when` (if set) decides when the GET after `answers` returns."""

    def __init__(self, db: Path, answers: list[list[Any]], last_get_when: Any = None) -> None:
        super().__init__(db, answers)
        self.given = 0
        self.last_get_when = last_get_when

    def journaled(self) -> int:
        conn = sqlite3.connect(self.db)
        try:
            return int(conn.execute("SELECT COUNT(*) FROM journal").fetchone()[0])
        finally:
            conn.close()

    async def get_feed(self, maxlot: int) -> list[Any]:
        await until(lambda: self.journaled() >= self.given, timeout=10, what="the last batch journaled")
        if not self.batches and self.last_get_when is not None:
            await until(self.last_get_when, timeout=10, what="the GET's gate")
        items = await super().get_feed(maxlot)
        self.given += len(items)
        return items


async def test_the_handles_of_a_round_are_committed_in_one_post_when_it_ends(settings: Settings) -> None:
    """Three short batches journaled one by one are committed together once the round ends
    (the feed confirmed empty), not one POST per batch: on a trickle commits would cost as
    many requests as GETs."""
    quiet = settings.model_copy(update={"poll_interval_s": 3600.0, "feed_concurrency": 1, "feed_empty_rechecks": 1})
    one = [batch(n, size=1) for n in range(3)]
    async with await Store.open(settings.db) as store:
        vtex = OneAtATime(settings.db, one)
        stop = asyncio.Event()
        task = asyncio.create_task(FeedPoller(store, vtex, quiet, commit_linger_s=3600.0).run(stop))
        await until(lambda: len(vtex.committed) == 3 or task.done(), timeout=10, what="three handles committed")
        stop.set()
        await task
    assert vtex.durable_at_commit == [3]


async def test_a_full_post_of_handles_is_committed_without_waiting_for_the_round(settings: Settings) -> None:
    """Once 100 handles (one POST's worth) wait, they are committed at once, while the
    round goes on: a backlog's handles do not wait for its end."""
    quiet = settings.model_copy(update={"poll_interval_s": 3600.0, "feed_concurrency": 1})
    async with await Store.open(settings.db) as store:
        vtex = OneAtATime(settings.db, [batch(n * 10) for n in range(10)])
        vtex.last_get_when = lambda: len(vtex.committed) >= 100  # the round goes on until they are committed
        stop = asyncio.Event()
        task = asyncio.create_task(FeedPoller(store, vtex, quiet, commit_linger_s=3600.0).run(stop))
        await until(lambda: len(vtex.committed) == 100 or task.done(), timeout=10, what="100 handles committed")
        stop.set()
        await task
    assert vtex.durable_at_commit == [100]


async def test_a_flowing_backlog_is_committed_in_whole_posts(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While batches keep coming, handles go a whole POST (100) at a time, oldest first, and
    the few left over wait for the next one or the round's end: a POST of ten handles after
    each POST's worth spent a call of the budget that a GET of ten items could have had."""
    monkeypatch.setattr(feed, "COMMIT_LINGER_S", 3600.0)
    quiet = settings.model_copy(update={"poll_interval_s": 3600.0, "feed_concurrency": 1})
    sizes: list[int] = []

    class Recording(OneAtATime):
        async def commit_feed(self, handles: list[str]) -> None:
            sizes.append(len(handles))
            await super().commit_feed(handles)

    async with await Store.open(settings.db) as store:
        vtex = Recording(settings.db, [batch(n * 10) for n in range(25)])
        pending_acks = store.journal.pending_acks

        async def once_more_came(limit: int = 100) -> list[str]:  # the committer looks when 110 wait
            wanted = min(len(vtex.committed) + 110, 250)
            await until(lambda: vtex.journaled() >= wanted, timeout=10, what="another batch journaled")
            return await pending_acks(limit)

        monkeypatch.setattr(store.journal, "pending_acks", once_more_came)
        stop = asyncio.Event()
        task = asyncio.create_task(FeedPoller(store, vtex, quiet).run(stop))
        await until(lambda: len(vtex.committed) == 250 or task.done(), timeout=10, what="250 handles committed")
        stop.set()
        await task
    assert sizes == [100, 100, 50]
    assert vtex.committed == [f"h{n}" for n in range(250)]


async def test_a_round_that_ends_while_its_last_batch_is_being_written_still_commits_it(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The round ends (empty answer) while the writer is still journaling its last batch:
    that batch's handles are committed as the round's, not left for the commit linger."""
    quiet = settings.model_copy(update={"poll_interval_s": 3600.0, "feed_concurrency": 1, "feed_empty_rechecks": 0})
    writing, round_over = asyncio.Event(), asyncio.Event()

    class WhileWriting(DurableFeed):
        answered_empty = False

        async def get_feed(self, maxlot: int) -> list[Any]:
            self.polls += 1
            if self.polls == 1:
                return [ITEM]
            await writing.wait()  # the empty answer comes while the item is being journaled
            self.answered_empty = True  # the reader ends its round in this same step
            return []

    async with await Store.open(settings.db) as store:
        append = store.journal.append

        async def slow_append(*args: Any, **kw: Any) -> Any:
            writing.set()
            await round_over.wait()
            return await append(*args, **kw)

        monkeypatch.setattr(store.journal, "append", slow_append)
        vtex = WhileWriting(settings.db, [])
        stop = asyncio.Event()
        task = asyncio.create_task(FeedPoller(store, vtex, quiet, commit_linger_s=3600.0).run(stop))
        await until(lambda: vtex.answered_empty or task.done(), timeout=10, what="the round's end")
        round_over.set()
        await until(lambda: vtex.committed == ["h1"] or task.done(), timeout=10, what="the handle committed")
        stop.set()
        await task
    assert vtex.committed == ["h1"]


async def test_one_full_batch_brings_in_one_more_reader_not_all(settings: Settings) -> None:
    """A full batch may be all there was (a trickle that piled up over a poll interval): it
    brings in one more reader, not every reader (which cost seven GETs, mostly empty, per
    round on a saturated budget); each further full batch brings in one more."""
    eight = settings.model_copy(update={"poll_interval_s": 3600.0, "feed_concurrency": 8})

    class OneFull(DurableFeed):
        def __init__(self, db: Path) -> None:
            super().__init__(db, [])
            self.readers: set[str] = set()

        async def get_feed(self, maxlot: int) -> list[Any]:
            self.polls += 1
            task = asyncio.current_task()
            self.readers.add(task.get_name() if task is not None else "?")
            first = self.polls == 1
            await asyncio.sleep(0.01)  # a GET takes time: readers woken meanwhile ask too
            return batch(0) if first else []

    async with await Store.open(settings.db) as store:
        vtex = OneFull(settings.db)
        stop = asyncio.Event()
        task = asyncio.create_task(FeedPoller(store, vtex, eight).run(stop))
        await until(lambda: (vtex.polls >= 5 and len(vtex.committed) == 10) or task.done(), timeout=10, what="a round")
        stop.set()
        await task
    assert vtex.readers == {"feed-reader-0", "feed-reader-1"}
    assert vtex.polls == 5  # the full batch, an empty answer and 2 rechecks; one GET of the reader it brought in


@pytest.mark.parametrize("everything", [False, True])
async def test_handles_journaled_during_a_commit_wait_for_the_next_round(settings: Settings, everything: bool) -> None:
    """A commit round sends what was pending when it began; handles journaled while its POST
    was in flight (fewer than a POST's worth) wait for the next round, unless it is the last."""
    async with await Store.open(settings.db) as store:
        poller = FeedPoller(store, DurableFeed(settings.db, []), settings)
        await poller._journal([batch(n * 10) for n in range(10)])

        class Meanwhile(DurableFeed):
            async def commit_feed(self, handles: list[str]) -> None:
                await super().commit_feed(handles)
                if len(self.committed) == 100:
                    await poller._journal([batch(1000)])  # a batch journaled while the POST was out

        vtex = Meanwhile(settings.db, [])
        poller._vtex = vtex
        await poller.flush_commits(everything=everything)
        assert len(vtex.committed) == (110 if everything else 100)
        assert len(await store.journal.pending_acks()) == (0 if everything else 10)


async def test_the_feed_tells_which_changes_the_hook_had_not_pushed(settings: Settings) -> None:
    """With the hook as well, each round's new feed events (those the hook had not pushed, or
    they would be duplicates) are reported by their oldest change time; duplicates are not."""
    async with await Store.open(settings.db) as store:
        later = {**ITEM, "eventId": "E2", "handle": "h2", "currentChange": "2026-01-01T00:00:09.0000000Z"}
        vtex = FakeVtex([[later, ITEM], [{**ITEM, "handle": "h1-again"}]])
        poller = FeedPoller(store, vtex, settings)
        missed: list[datetime] = []
        poller.on_hook_missed = missed.append
        await feed_until(poller, lambda: len(vtex.committed) == 3, what="both batches committed")
    assert missed == [datetime(2026, 1, 1, 0, 0, 1, tzinfo=UTC)]
