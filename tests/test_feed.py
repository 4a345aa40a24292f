"""The feed poller with a recording fake VTEX: journal first, then commit, everything."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from omsd.daemon.budget import Priority
from omsd.daemon.errors import AuthFailed, NotFound, VtexUnavailable
from omsd.daemon.feed import FeedPoller
from omsd.daemon.settings import Settings
from omsd.daemon.vtex import ApprovalResponse, FeedConfig, HookConfig, OrderSnapshot
from omsd.daemon.vtexconfig import ensure_feed_config
from omsd.state.store import Store
from tests.helpers import until

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


class FakeVtex:
    """Records calls; on each commit, checks what is durable in the database file."""

    def __init__(self, db: Path, batches: list[list[Any]]) -> None:
        self.db = db
        self.batches = batches
        self.committed: list[str] = []
        self.durable_at_commit: list[int] = []
        self.fail_commits = 0
        self.config: FeedConfig | None = None
        self.saved: list[dict[str, Any]] = []
        self.polls = 0
        self.config_reads = 0

    async def get_feed(self, maxlot: int) -> list[Any]:
        self.polls += 1
        return self.batches.pop(0) if self.batches else []

    async def commit_feed(self, handles: list[str]) -> None:
        conn = sqlite3.connect(self.db)  # another connection: sees only committed data
        self.durable_at_commit.append(conn.execute("SELECT COUNT(*) FROM journal").fetchone()[0])
        conn.close()
        if self.fail_commits:
            self.fail_commits -= 1
            raise VtexUnavailable("POST /api/orders/feed: HTTP 503")
        self.committed.extend(handles)

    async def get_feed_config(self) -> FeedConfig | None:
        return self.config

    async def save_feed_config(self, body: Any) -> None:
        self.saved.append(dict(body))

    async def get_hook_config(self) -> HookConfig | None:
        raise NotImplementedError

    async def save_hook_config(self, body: Any) -> None:
        raise NotImplementedError

    async def get_order(self, order_id: str, *, priority: Priority = Priority.BACKGROUND) -> OrderSnapshot:
        raise NotImplementedError

    async def approve(self, marketplace_order_id: str) -> ApprovalResponse:
        raise NotImplementedError


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        account="shop",
        app_key="k",
        app_token="t",
        connector_name="c",
        connector_endpoint="https://omsd.example.com",
        db=tmp_path / "db",
    )


async def test_items_are_durable_before_their_handles_are_committed(settings: Settings) -> None:
    """The commit to VTEX happens only after the journal rows reached the database."""
    async with await Store.open(settings.db) as store:
        vtex = FakeVtex(settings.db, [[ITEM, {**ITEM, "eventId": "E2", "handle": "h2", "state": "canceled"}]])
        await FeedPoller(store, vtex, settings).poll_once()
    assert vtex.committed == ["h1", "h2"]
    assert vtex.durable_at_commit == [2]


async def test_duplicates_and_rejected_items_are_committed_too(settings: Settings) -> None:
    """A redelivered item (new handle) and an unparseable item are both committed."""
    async with await Store.open(settings.db) as store:
        batches = [[ITEM], [{**ITEM, "handle": "h1-again"}, {"handle": "bad", "state": "teleported"}]]
        vtex = FakeVtex(settings.db, batches)
        poller = FeedPoller(store, vtex, settings)
        await poller.poll_once()
        await poller.poll_once()
        assert vtex.committed == ["h1", "h1-again", "bad"]
        assert (poller.stats.accepted, poller.stats.duplicates, poller.stats.rejected) == (1, 1, 1)
        assert await store.last_offset() == 2


async def test_a_failed_commit_is_retried_next_round(settings: Settings) -> None:
    """The handle stays recorded and is committed by the next round."""
    async with await Store.open(settings.db) as store:
        vtex = FakeVtex(settings.db, [[ITEM]])
        vtex.fail_commits = 1
        poller = FeedPoller(store, vtex, settings)
        await poller.poll_once()
        assert vtex.committed == [] and await store.pending_acks() == ["h1"]
        await poller.poll_once()
        assert vtex.committed == ["h1"] and await store.pending_acks() == []


async def test_missing_feed_config_is_created_from_settings(settings: Settings) -> None:
    """No configuration → POST with FromWorkflow, every filterable status, 240 s, 345600 s."""
    vtex = FakeVtex(settings.db, [])
    assert await ensure_feed_config(vtex, settings)
    [body] = vtex.saved
    assert body["filter"]["type"] == "FromWorkflow" and len(body["filter"]["status"]) == 30
    assert body["queue"] == {"visibilityTimeoutInSeconds": 240, "MessageRetentionPeriodInSeconds": 345600}
    vtex.config = FeedConfig(raw=body)
    assert not await ensure_feed_config(vtex, settings)
    assert len(vtex.saved) == 1


async def test_a_short_batch_is_followed_at_once_and_an_empty_one_waits(settings: Settings) -> None:
    """One item (of maxlot 10) does not mean the queue is empty: omsd asks again at once;
    after an empty batch it waits poll_interval_s (an hour here) before asking again."""
    import asyncio

    from tests.helpers import until

    slow = settings.model_copy(update={"poll_interval_s": 3600.0, "feed_concurrency": 1})
    async with await Store.open(settings.db) as store:
        vtex = FakeVtex(settings.db, [[ITEM], [{**ITEM, "eventId": "E2", "handle": "h2", "state": "canceled"}]])
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
        vtex = FakeVtex(settings.db, [poison, [ITEM]])
        poller = FeedPoller(store, vtex, settings)
        stop = asyncio.Event()
        task = asyncio.create_task(poller.run(stop))
        await until(lambda: "h1" in vtex.committed or task.done(), timeout=10, what="the good item committed")
        stop.set()
        await task
        assert vtex.committed == ["p1", "p2", "p3", "h1"]
        assert (poller.stats.rejected, poller.stats.accepted) == (3, 1)
        rejected = await store.journal_tail(10, kind="rejected")
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

    from omsd.daemon.vtex import VtexClient
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


class ConcurrentFeed(FakeVtex):
    """Holds every non-empty GET until `width` GETs are in flight at once; records commit sizes."""

    def __init__(self, db: Path, batches: list[list[Any]], width: int) -> None:
        super().__init__(db, batches)
        self.width = width
        self.in_flight = 0
        self.all_in = asyncio.Event()
        self.commit_sizes: list[int] = []

    async def get_feed(self, maxlot: int) -> list[Any]:
        self.polls += 1
        if not self.batches:
            return []
        items = self.batches.pop(0)
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
    """Three GETs are in flight at once; their 30 items reach the database together, and only
    then are all 30 handles committed in a single POST."""
    three = settings.model_copy(update={"poll_interval_s": 3600.0, "feed_concurrency": 3})
    async with await Store.open(settings.db) as store:
        vtex = ConcurrentFeed(settings.db, [batch(0), batch(10), batch(20)], width=3)
        stop = asyncio.Event()
        task = asyncio.create_task(FeedPoller(store, vtex, three).run(stop))
        await until(lambda: len(vtex.committed) == 30 or task.done(), timeout=10, what="30 handles committed")
        stop.set()
        await task
    assert vtex.commit_sizes == [30]
    assert vtex.durable_at_commit == [30]


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

    class Refusing(FakeVtex):
        async def get_feed(self, maxlot: int) -> list[Any]:
            raise AuthFailed("GET /api/orders/feed: HTTP 401", 401, None)

    async with await Store.open(settings.db) as store:
        with pytest.raises(AuthFailed):
            await asyncio.wait_for(FeedPoller(store, Refusing(settings.db, []), settings).run(asyncio.Event()), 10)


async def test_a_failed_commit_is_retried_while_the_feed_is_idle(settings: Settings) -> None:
    """In the running loop, a handle whose commit failed is committed again though no new item arrives."""
    quick = settings.model_copy(update={"poll_interval_s": 0.05})
    async with await Store.open(settings.db) as store:
        vtex = FakeVtex(settings.db, [[ITEM]])
        vtex.fail_commits = 1
        stop = asyncio.Event()
        task = asyncio.create_task(FeedPoller(store, vtex, quick).run(stop))
        await until(lambda: vtex.committed == ["h1"] or task.done(), timeout=10, what="the retried commit")
        stop.set()
        await task
        assert await store.pending_acks() == []


async def test_readers_that_all_find_the_feed_missing_recreate_it_once(settings: Settings) -> None:
    """Four readers answered 404 at once: the configuration is POSTed once, the others find it."""

    class Missing(FakeVtex):
        async def get_feed(self, maxlot: int) -> list[Any]:
            self.polls += 1
            await asyncio.sleep(0)  # let every reader ask before anyone recreates
            if self.config is None:
                raise NotFound("GET /api/orders/feed: HTTP 404", 404, None)
            return []

        async def get_feed_config(self) -> FeedConfig | None:
            self.config_reads += 1
            return self.config

        async def save_feed_config(self, body: Any) -> None:
            await asyncio.sleep(0)
            self.saved.append(dict(body))
            self.config = FeedConfig(raw=dict(body))

    four = settings.model_copy(update={"poll_interval_s": 3600.0, "feed_concurrency": 4})
    async with await Store.open(settings.db) as store:
        vtex = Missing(settings.db, [])
        stop = asyncio.Event()
        task = asyncio.create_task(FeedPoller(store, vtex, four).run(stop))
        await until(lambda: vtex.config_reads >= 4 or task.done(), timeout=10, what="every reader checked the config")
        stop.set()
        await task
    assert len(vtex.saved) == 1


class TrickleFeed(FakeVtex):
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
    """Short batches keep the first reader asking at once, but not the others: on a trickle
    eight readers spun on near-empty GETs and spent the request budget ahead of approvals
    (release → PUT p50 10.4 s against 5.8 s). Full batches (a backlog) still use them all."""
    eight = settings.model_copy(update={"poll_interval_s": 3600.0, "feed_concurrency": 8})
    async with await Store.open(settings.db) as store:
        vtex = TrickleFeed(settings.db, items=200)
        stop = asyncio.Event()
        task = asyncio.create_task(FeedPoller(store, vtex, eight).run(stop))
        await until(lambda: len(vtex.committed) == 200 or task.done(), timeout=20, what="200 handles committed")
        stop.set()
        await task
    assert max(vtex.overlap[-100:]) == 1  # one GET at a time once the trickle is established
