"""The outcome stream: stored in the processor's transaction, read by `after`, long polled,
streamed as Server-Sent Events, 410 Gone past the retention, and the relay's bookkeeping."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from omsd.daemon.cli import main
from omsd.daemon.ops.replica import publish
from omsd.daemon.ops.waiting import Watermark
from omsd.daemon.pipeline.processor import Processor
from omsd.state.events import AnyEntry, IntentRecorded, StatusChanged
from omsd.state.models import Policy
from omsd.state.store import NewEntry, Store
from tests.api_helpers import AUTH, Api
from tests.helpers import until
from tests.machine_helpers import FREE, HELD, MKT, at, intent, status
from tests.store_helpers import NOW, entry


async def held_then_canceled(store: Store, mark: Watermark | None = None) -> None:
    """An intent on a held order that VTEX then cancels: intent.accepted, intent.canceled."""
    await store.journal.append([entry(status(HELD, t=1)), entry(intent()), entry(status("canceled", t=2))], now=NOW)
    await Processor(store, Policy(), on_outcomes=mark.advance if mark else None).drain()


async def get(api: Api, path: str, **kw: Any) -> tuple[int, Any]:
    resp = await api.client.get(path, headers=kw.pop("headers", AUTH), **kw)
    return resp.status, await resp.json()


# ---- the store ----------------------------------------------------------------------------
async def test_outcomes_are_written_with_the_state_change_and_read_in_order(store: Store) -> None:
    """The processor's commit writes the batch's outcomes; `after` reads them by seq, by type, by order."""
    await held_then_canceled(store)
    rows = await store.outcomes.after(0, 10)
    assert [(r.seq, r.type) for r in rows] == [(1, "intent.accepted"), (2, "intent.canceled")]
    assert [r.type for r in await store.outcomes.after(1, 10)] == ["intent.canceled"]
    assert [r.type for r in await store.outcomes.after(0, 10, types=["intent.canceled"])] == ["intent.canceled"]
    assert len(await store.outcomes.after(0, 10, order=MKT)) == 2 and await store.outcomes.after(0, 10, order="X") == []
    assert await store.outcomes.bounds() == (0, 2)


async def test_deriving_again_never_rewrites_the_stream(store: Store) -> None:
    """After a reset the processor applies the same rows again: the same ids, nothing added."""
    await held_then_canceled(store)
    before = await store.outcomes.after(0, 10)
    await store.derived.reset(now=NOW)
    await Processor(store, Policy()).drain()
    assert await store.outcomes.after(0, 10) == before


async def test_deriving_again_leaves_no_gap_in_the_seqs(store: Store) -> None:
    """Outcomes derived again (ids already written) take no seq: the next new outcome follows the last one."""
    await held_then_canceled(store)
    await store.derived.reset(now=NOW)
    await Processor(store, Policy()).drain()  # the same two outcomes again: written already
    other: list[AnyEntry] = [
        StatusChanged(order_id="B-2-01", source="feed", state=HELD, current_change=at(1)),
        IntentRecorded(order_id="B-2-01", marketplace_order_id="2", source="api"),
    ]
    await store.journal.append([entry(e) for e in other], now=NOW)
    await Processor(store, Policy()).drain()
    assert [r.seq for r in await store.outcomes.after(0, 10)] == [1, 2, 3]
    assert await store.outcomes.bounds() == (0, 3)


async def test_retention_keeps_what_a_relay_still_owes_and_reports_the_oldest(store: Store) -> None:
    """Outcomes older than the cutoff go, except those a relay endpoint has not delivered;
    `bounds` then says where a reader may resume without a gap."""
    await store.outcomes.endpoint("webhook")  # created at the current end: nothing owed yet
    await held_then_canceled(store)
    await store.outcomes.take("webhook", 10, NOW)
    assert await store.outcomes.prune(NOW + timedelta(days=1)) == 0  # both pending for the relay
    await store.outcomes.delivered("webhook", [1])
    assert await store.outcomes.prune(NOW + timedelta(days=1)) == 1
    assert await store.outcomes.bounds() == (1, 2)


async def test_retention_keeps_what_a_relay_gave_up_on_for_its_retry(store: Store) -> None:
    """A given-up delivery keeps its outcome (and every later one) through the retention: `omsd relay retry`
    sends it, and the order's later events follow it."""
    await store.outcomes.endpoint("webhook")
    await held_then_canceled(store)
    await store.outcomes.take("webhook", 10, NOW)
    await store.outcomes.failed("webhook", 1, next_at=None, error="HTTP 500")  # given up
    [second] = await store.outcomes.due("webhook", NOW, 10)
    await store.outcomes.delivered("webhook", [second.outcome.seq])
    assert await store.outcomes.prune(NOW + timedelta(days=60)) == 0
    assert await store.outcomes.retry("webhook", NOW) == 1
    [again] = await store.outcomes.due("webhook", NOW, 10)
    assert (again.outcome.seq, again.outcome.type) == (1, "intent.accepted")


async def test_retention_removes_only_a_prefix_of_the_stream(store: Store) -> None:
    """Outcomes are pruned as a prefix of seqs, never from the middle: an old outcome after a newer one (rows
    ingested with their own time, a clock stepped back) stays while the newer one before it does."""
    await held_then_canceled(store)  # seqs 1, 2 at NOW
    old: list[AnyEntry] = [
        StatusChanged(order_id="B-2-01", source="feed", state=HELD, current_change=at(1)),
        IntentRecorded(order_id="B-2-01", marketplace_order_id="2", source="api"),
    ]
    long_ago = NOW - timedelta(days=40)
    await store.journal.append([NewEntry.of(e, source="test", received_at=long_ago) for e in old], now=NOW)
    await Processor(store, Policy()).drain()  # seq 3, happened 40 days ago
    assert (await store.outcomes.after(2, 10))[0].occurred_at == long_ago
    assert await store.outcomes.prune(NOW - timedelta(days=30)) == 0
    assert [r.seq for r in await store.outcomes.after(0, 10)] == [1, 2, 3]
    assert await store.outcomes.prune(NOW + timedelta(days=1)) == 3  # all older: all go


async def test_a_relay_takes_a_window_and_sends_each_order_in_order(store: Store) -> None:
    """Deliveries are taken up to the window; only the oldest pending one of an order is due."""
    await store.outcomes.endpoint("webhook")
    await held_then_canceled(store)
    assert await store.outcomes.take("webhook", 1, NOW) == 1  # the window holds one
    assert await store.outcomes.take("webhook", 1, NOW) == 0
    assert await store.outcomes.take("webhook", 10, NOW) == 1
    [due] = await store.outcomes.due("webhook", NOW, 10)  # the second waits behind the first
    assert due.outcome.type == "intent.accepted"
    await store.outcomes.failed("webhook", due.outcome.seq, next_at=NOW + timedelta(seconds=5), error="HTTP 500")
    assert await store.outcomes.due("webhook", NOW, 10) == []  # the order waits for its first
    [again] = await store.outcomes.due("webhook", NOW + timedelta(seconds=5), 10)
    assert again.attempts == 1
    await store.outcomes.delivered("webhook", [again.outcome.seq])
    [second] = await store.outcomes.due("webhook", NOW, 10)
    assert second.outcome.type == "intent.canceled"


async def test_a_relay_retry_sends_what_waits_for_a_retry_now(store: Store) -> None:
    """`retry` makes due now the deliveries waiting out a backoff too (the receiver was fixed, or moved to a new
    OMSD_RELAY_URL), not only the given-up ones."""
    await store.outcomes.endpoint("webhook")
    await held_then_canceled(store)
    await store.outcomes.take("webhook", 10, NOW)
    await store.outcomes.failed("webhook", 1, next_at=NOW + timedelta(hours=16), error="HTTP 503")
    assert await store.outcomes.due("webhook", NOW, 10) == []
    assert await store.outcomes.retry("webhook", NOW) == 0  # none given up
    assert [d.outcome.seq for d in await store.outcomes.due("webhook", NOW, 10)] == [1]


async def test_deliveries_keyed_by_an_older_omsd_are_keyed_again(store: Store) -> None:
    """`rekey` (the relay's start) keys deliveries taken by an older omsd (VTEX id first) by marketplace id, so
    they wait in one line with the order's others."""
    await store.outcomes.endpoint("webhook")
    await held_then_canceled(store)
    await store.outcomes.take("webhook", 10, NOW)
    async with store.db.tx() as conn:
        await conn.execute("UPDATE relay_deliveries SET order_key = 'MKP-OLD-01' WHERE seq = 2")
    assert len(await store.outcomes.due("webhook", NOW, 10)) == 2
    await store.outcomes.rekey("webhook")
    assert [d.outcome.seq for d in await store.outcomes.due("webhook", NOW, 10)] == [1]


# ---- the pull API ---------------------------------------------------------------------------
async def test_events_after_a_seq_with_where_to_resume(api: Api) -> None:
    """GET /v1/events: the outcomes after `after`, and `next` past every one looked at."""
    await held_then_canceled(api.ctx.store, api.ctx.outcome_mark)
    status_, body = await get(api, "/v1/events?after=0")
    assert status_ == 200 and [e["type"] for e in body["events"]] == ["intent.accepted", "intent.canceled"]
    first = body["events"][0]
    assert set(first) == {"seq", "id", "type", "occurred_at", "order_id", "marketplace_order_id", "data"}
    assert body["next"] == 2
    _, filtered = await get(api, "/v1/events?after=0&type=intent.canceled")
    assert [e["seq"] for e in filtered["events"]] == [2] and filtered["next"] == 2
    _, limited = await get(api, "/v1/events?after=0&limit=1")
    assert [e["seq"] for e in limited["events"]] == [1] and limited["next"] == 1
    _, none = await get(api, "/v1/events?after=0&order=OTHER-1")
    assert none == {"events": [], "next": 2}  # every outcome looked at: resume past them


async def test_only_published_outcomes_are_served(api: Api) -> None:
    """An outcome committed but not yet published (under replicated durability: not yet on
    the replica) is not shown: a restore could give its seq to another event."""
    await held_then_canceled(api.ctx.store)
    api.ctx.outcome_mark.advance(1)
    _, body = await get(api, "/v1/events?after=0")
    assert [e["seq"] for e in body["events"]] == [1] and body["next"] == 1
    resp = await api.client.get("/v1/events/stream", headers=AUTH)
    lines: list[str] = []
    while not any(line.startswith("data:") for line in lines):
        lines.append((await asyncio.wait_for(resp.content.readline(), timeout=10)).decode().rstrip("\r\n"))
    api.ctx.outcome_mark.advance(2)
    while not any(line.startswith("id: 2") for line in lines):
        lines.append((await asyncio.wait_for(resp.content.readline(), timeout=10)).decode().rstrip("\r\n"))
    resp.close()
    assert [line for line in lines if line.startswith("id:")] == ["id: 1", "id: 2"]


async def test_under_replicated_durability_an_outcome_is_published_once_on_the_replica() -> None:
    """`publish` moves the readers' mark to what the processor committed only after a sync
    covering it returned (a sync that began after the commit)."""
    committed, published, stop = Watermark(), Watermark(), asyncio.Event()
    syncs: list[asyncio.Event] = []

    async def durable() -> None:
        synced = asyncio.Event()
        syncs.append(synced)
        await synced.wait()

    task = asyncio.create_task(publish(committed, published, durable, stop))
    committed.advance(3)
    await until(lambda: len(syncs) == 1, what="a sync asked for")
    committed.advance(5)  # committed during the sync: not covered by it
    assert published.value == 0
    syncs[0].set()
    await until(lambda: published.value == 3, what="published up to what the first sync covered")
    await until(lambda: len(syncs) == 2, what="a second sync for the rest")
    assert published.value == 3
    syncs[1].set()
    await until(lambda: published.value == 5, what="the rest published")
    stop.set()
    await asyncio.wait_for(task, timeout=5)


async def test_a_long_poll_answers_as_soon_as_an_outcome_commits(api: Api) -> None:
    """With `wait`, the request is held until the processor commits an outcome after `after`."""
    poll = asyncio.create_task(get(api, "/v1/events?after=0&wait=30"))
    await asyncio.sleep(0)
    assert not poll.done()
    await held_then_canceled(api.ctx.store, api.ctx.outcome_mark)
    status_, body = await asyncio.wait_for(poll, timeout=10)
    assert status_ == 200 and body["events"][0]["type"] == "intent.accepted"


async def test_a_long_poll_with_nothing_new_ends_empty_at_its_wait(api: Api) -> None:
    """Nothing after `after` within `wait`: an empty answer whose `next` is `after`."""
    status_, body = await get(api, "/v1/events?after=0&wait=0.05")
    assert (status_, body) == (200, {"events": [], "next": 0})


async def test_an_after_older_than_the_retention_is_gone(api: Api) -> None:
    """410 Gone with the oldest seq kept, never a silent jump."""
    store = api.ctx.store
    await held_then_canceled(store)
    await store.outcomes.prune(NOW + timedelta(days=1))
    await store.journal.append([entry(status(FREE, t=3))], now=NOW)
    status_, body = await get(api, "/v1/events?after=0")
    assert status_ == 410 and body["oldest"] == 3 and body["resume_after"] == 2
    assert (await get(api, "/v1/events?after=2"))[0] == 200


@pytest.mark.parametrize("route", ["/v1/events?after=3", "/v1/events/stream?after=3"])
async def test_an_after_past_the_end_is_gone(api: Api, route: str) -> None:
    """An `after` past the last seq ever written (a cursor from before a restore to an older copy) is 410 Gone
    with `last`, not an empty 200 that would skip the events later given those seqs."""
    await held_then_canceled(api.ctx.store, api.ctx.outcome_mark)
    status_, body = await get(api, route)
    assert status_ == 410 and (body["last"], body["resume_after"], body["oldest"]) == (2, 2, 1)
    assert "past the end" in body["error"]
    assert (await get(api, "/v1/events?after=2"))[0] == 200


@pytest.mark.parametrize(
    "query",
    [
        *("after=-1", "after=x", "limit=0", "limit=1001", "wait=61", "wait=nan", "type=bogus", "order=a%20b", "lots=1"),
        *("limit=%C2%B2", "limit=%E2%91%A0", "limit=%D9%A3", "limit=%EF%BC%91"),  # ², ①, Arabic 3, fullwidth 1
    ],
)
@pytest.mark.parametrize("route", ["/v1/events", "/v1/events/stream"])
async def test_bad_queries_are_400_with_the_reason(api: Api, query: str, route: str) -> None:
    """A bad parameter is a 400 that names it; nothing is read."""
    status_, body = await get(api, f"{route}?{query}")
    assert status_ == 400 and body["error"]


async def test_events_need_the_bearer_token(api: Api) -> None:
    """Without the token: 401 (the outcomes carry order data)."""
    status_, _ = await get(api, "/v1/events", headers={})
    assert status_ == 401


async def test_the_stream_sends_events_and_resumes_from_last_event_id(api: Api) -> None:
    """GET /v1/events/stream: `id:` is the seq, `event:` the type; Last-Event-ID resumes after it."""
    await held_then_canceled(api.ctx.store, api.ctx.outcome_mark)
    resp = await api.client.get("/v1/events/stream", headers={**AUTH, "Last-Event-ID": "1"})
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
    lines: list[str] = []
    while not any(line.startswith("data:") for line in lines):
        lines.append((await asyncio.wait_for(resp.content.readline(), timeout=10)).decode().rstrip("\r\n"))
    resp.close()
    fields = dict(line.split(": ", 1) for line in lines if ": " in line)
    assert fields["id"] == "2" and fields["event"] == "intent.canceled"
    assert json.loads(fields["data"])["seq"] == 2


# ---- the command line -------------------------------------------------------------------------
def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(list(args), clock=lambda: NOW)
    return code, capsys.readouterr().out


@pytest.fixture
def db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "cli.db"
    monkeypatch.setenv("OMSD_DB", str(path))

    async def build() -> None:
        async with await Store.open(path) as s:
            await s.outcomes.endpoint("webhook")
            await held_then_canceled(s)
            await s.outcomes.take("webhook", 10, NOW)

    asyncio.run(build())
    return path


def test_omsd_events_prints_the_stream(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`omsd events --json`: the same events as the API; --after, --type and --order select."""
    code, out = cli(capsys, "events", "--json")
    assert code == 0 and [json.loads(line)["type"] for line in out.splitlines()] == [
        "intent.accepted",
        "intent.canceled",
    ]
    _, after = cli(capsys, "events", "--after", "1", "--json")
    assert [json.loads(line)["seq"] for line in after.splitlines()] == [2]
    _, typed = cli(capsys, "events", "--type", "intent.accepted")
    assert typed.split("\t")[2] == "intent.accepted" and len(typed.splitlines()) == 1
    assert cli(capsys, "events", "--order", "NONE-1")[1] == ""


def test_omsd_events_refuses_an_after_past_the_end(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`omsd events --after N` past the last seq says so (exit 1), as the API answers 410."""
    assert cli(capsys, "events", "--after", "2")[0] == 0
    assert main(["events", "--after", "3"]) == 1
    assert "past the end" in capsys.readouterr().err


def test_omsd_relay_status_retry_and_replay(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """status shows pending and given up; replay rewinds the cursor; retry makes given-up ones due."""
    _, out = cli(capsys, "relay", "status", "--json")
    [status_] = [json.loads(line) for line in out.splitlines()]
    assert status_["endpoint"] == "webhook" and status_["pending"] == 2 and status_["disabled"] is None

    async def give_up_and_disable() -> None:
        async with await Store.open(db) as s:
            await s.outcomes.failed("webhook", 1, next_at=None, error="HTTP 500")
            await s.outcomes.disable("webhook", "HTTP 410", NOW)

    asyncio.run(give_up_and_disable())
    _, out = cli(capsys, "relay", "status", "--json")
    assert json.loads(out)["given_up"] == 1 and json.loads(out)["disabled"] == "HTTP 410"
    code, out = cli(capsys, "relay", "retry")
    assert code == 0 and "1 given-up deliveries due again" in out
    _, out = cli(capsys, "relay", "status", "--json")
    assert json.loads(out)["disabled"] is None and json.loads(out)["given_up"] == 0
    assert cli(capsys, "relay", "replay", "--from", "1")[0] == 0
    _, out = cli(capsys, "relay", "status", "--json")
    assert json.loads(out)["taken_to_seq"] == 0
    assert cli(capsys, "relay", "replay")[0] == 2  # --from is required
    assert main(["relay", "replay", "--from", "4"]) == 1  # past the next event (3): it would skip events
    assert "past the end" in capsys.readouterr().err
    _, out = cli(capsys, "relay", "status", "--json")
    assert json.loads(out)["taken_to_seq"] == 0  # unchanged
    assert cli(capsys, "relay", "replay", "--from", "3")[0] == 0  # from the next event on
    assert cli(capsys, "relay", "status", "--endpoint", "vtex")[0] == 1  # never configured here


def test_omsd_relay_status_shows_the_last_delivery_error(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`relay status` shows why the oldest failing delivery failed (a certificate refused, say); none when none."""
    _, out = cli(capsys, "relay", "status", "--json")
    assert json.loads(out)["last_error"] is None

    async def refused() -> None:
        async with await Store.open(db) as s:
            await s.outcomes.failed("webhook", 1, next_at=NOW, error="ClientConnectorCertificateError")

    asyncio.run(refused())
    _, out = cli(capsys, "relay", "status", "--json")
    assert json.loads(out)["last_error"] == "ClientConnectorCertificateError"
    _, table = cli(capsys, "relay", "status")
    assert "ClientConnectorCertificateError" in table


def test_omsd_relay_reports_and_drops_deliveries_whose_event_is_gone(
    db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A delivery whose outcome an older retention removed: `relay status` counts it, `relay retry` drops it."""

    async def prune_under_it() -> None:
        async with await Store.open(db) as s, s.db.tx() as conn:
            await conn.execute("DELETE FROM outcomes WHERE seq = 1")

    asyncio.run(prune_under_it())
    _, out = cli(capsys, "relay", "status", "--json")
    assert json.loads(out)["events_gone"] == 1 and json.loads(out)["pending"] == 2
    code, out = cli(capsys, "relay", "retry")
    assert code == 0 and "1 whose events an older retention removed dropped" in out
    _, out = cli(capsys, "relay", "status", "--json")
    assert json.loads(out)["events_gone"] == 0 and json.loads(out)["pending"] == 1
