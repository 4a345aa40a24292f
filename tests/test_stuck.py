"""An event that cannot be applied (`decide` raised) is never skipped: its order is stuck,
visibly, its later events wait in order, and a retry applies them once the cause is fixed."""

from __future__ import annotations

import asyncio
import json
import tempfile
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from omsd.daemon.ops.health import STUCK_ALARM
from omsd.daemon.ops.metrics import Metrics
from omsd.daemon.pipeline.processor import Processor
from omsd.daemon.tools import retry
from omsd.sim.server import Simulator
from omsd.state import apply as apply_module
from omsd.state.apply import View, apply, read
from omsd.state.events import AnyEntry, Event
from omsd.state.machine import decide as real
from omsd.state.models import Order, Policy
from omsd.state.statuses import STUCK, Phase
from omsd.state.store import NewEntry, Store
from tests.helpers import RunDaemon, approve, reached, run_cli, until
from tests.machine_helpers import FREE, HELD, OID, T0, intent, order, resync, status
from tests.store_helpers import NOW, entry
from tests.test_apply import rows

OVERFLOWING = Policy(held_recheck_s=1e12)  # a held re-check past year 9999: `decide` raises OverflowError


def held_tracked() -> View:
    """An order omsd follows, seen held, with no intent yet."""
    return View(orders={OID: order(status=HELD)})


def test_an_event_that_cannot_be_applied_leaves_its_order_stuck() -> None:
    """The intent for a held order whose re-check overflows is not skipped: the order keeps its
    state, is marked stuck on that row, and the history and a note say so."""
    batch = apply([(r, read(r)) for r in rows(intent())], held_tracked(), OVERFLOWING)
    stuck = batch.orders[OID]
    assert stuck.stuck is not None and stuck.stuck.offset == 1 and stuck.stuck.kind == "intent_recorded"
    assert "OverflowError" in stuck.stuck.error and not stuck.stuck.new
    assert stuck.phase == Phase.TRACKING and not stuck.has_intent  # the state from before the event
    assert [n.event for n in batch.notes] == ["event_not_applied"]
    [history] = batch.history
    assert history.to_phase == STUCK and "not applied" in history.cause
    assert batch.effects == []


def test_later_events_of_a_stuck_order_are_held_not_applied() -> None:
    """Events after the one that failed wait: none changes the order (no status moves ahead of
    the failed event), each is counted and written to the history."""
    batch = apply([(r, read(r)) for r in rows(intent(), status(FREE, t=20))], held_tracked(), OVERFLOWING)
    stuck = batch.orders[OID]
    assert stuck.stuck is not None and stuck.stuck.held == 1
    assert stuck.status == HELD  # the release waits behind the intent
    assert [h.cause.split(":")[0] for h in batch.history] == [
        "event intent_recorded not applied",
        "event status_changed held",
    ]


def test_a_stuck_order_that_did_not_exist_is_marked_new(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first event of an order fails: the order exists (stuck), marked new, so that a retry
    applies that event to no order, as the first time."""

    def bug(order: Order | None, event: Event, now: Any, policy: Policy) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(apply_module, "decide", bug)
    batch = apply([(r, read(r)) for r in rows(status(HELD))], View(), Policy())
    stuck = batch.orders[OID].stuck
    assert stuck is not None and stuck.new and stuck.error == "RuntimeError: a bug"


# ---- on a real store: the processor -----------------------------------------------------------


@pytest.fixture
async def store(tmp_path: Path) -> Any:
    async with await Store.open(tmp_path / "omsd.db") as s:
        yield s


async def journal(store: Store, *events: AnyEntry) -> None:
    await store.journal.append([entry(e) for e in events], now=NOW)


def processor(store: Store, policy: Policy, counts: list[int] | None = None) -> Processor:
    p = Processor(store, policy, clock=lambda: NOW, metrics=Metrics())
    if counts is not None:
        p.on_stuck = counts.append
    return p


async def test_a_stuck_order_is_counted_listed_and_performs_nothing(store: Store) -> None:
    """Stuck: listed by phase `stuck`, counted (metric, alarm count), and its pending Get order is
    not performed while its later events wait."""
    counts: list[int] = []
    bad = processor(store, OVERFLOWING, counts)
    await journal(store, status(HELD, t=1))
    await bad.drain()
    await journal(store, intent(), status(FREE, t=20))
    await bad.drain()
    assert await store.read.count_orders(STUCK) == 1 and counts[-1] == 1
    assert bad._metrics.sample("omsd_events_not_applied_total") == 1
    [listed] = await store.read.list_orders(STUCK)
    assert listed.stuck is not None and listed.stuck.held == 1
    assert await store.outbox.claim(10, now=NOW) == []
    assert bad.offset == await store.journal.last_offset()  # the processor moved on


async def test_a_retry_applies_the_held_events_in_order_once_the_cause_is_fixed(store: Store) -> None:
    """`omsd retry` (a resync) with the cause fixed: the failed intent and the release held behind
    it are applied in order, then the resync; the order checks with Get order."""
    bad = processor(store, OVERFLOWING)
    await journal(store, status(HELD, t=1), intent(), status(FREE, t=20))
    await bad.drain()
    [stuck] = await retry.targets(store, None, STUCK)
    await retry.retry(store, [stuck], NOW)
    counts: list[int] = []
    fixed = processor(store, Policy(), counts)
    await fixed.drain()
    after = await store.read.load_order(OID)
    assert after is not None and after.stuck is None
    assert after.has_intent and after.status == FREE and after.phase == Phase.CHECKING
    assert await store.read.count_orders(STUCK) == 0 and counts[-1] == 0
    [fetch] = await store.outbox.claim(10, now=NOW)
    assert fetch.effect.kind == "fetch_order"
    causes = [h.cause for h in await store.read.history(OID)]
    assert "not applied" in causes[1] and "held" in causes[2]  # the record of the wait...
    assert causes[-1].endswith("confirming with Get order")  # ...then the release, applied after the intent


async def test_a_retry_that_fails_again_changes_nothing(store: Store) -> None:
    """The cause not fixed: the order stays stuck on the same row, nothing is rewritten."""
    bad = processor(store, OVERFLOWING)
    await journal(store, status(HELD, t=1), intent())
    await bad.drain()
    history = await store.read.history(OID)
    assert await bad.retry_stuck() == 0
    assert await store.read.history(OID) == history
    assert await store.read.count_orders(STUCK) == 1


async def test_stuck_orders_are_retried_when_the_processor_starts(store: Store) -> None:
    """A start (where a fixed setting takes effect) applies the held events of every stuck order."""
    bad = processor(store, OVERFLOWING)
    await journal(store, status(HELD, t=1), intent())
    await bad.drain()
    fixed = processor(store, Policy())
    stop = asyncio.Event()
    task = asyncio.create_task(fixed.run(stop, poll_s=0.05))
    try:
        await until(lambda: _count(store, STUCK, 0), what="the stuck order applied at start")
    finally:
        stop.set()
        await task
    after = await store.read.load_order(OID)
    assert after is not None and after.phase == Phase.WAITING_RELEASE and after.has_intent


@pytest.mark.parametrize("how", ["omsd retry", "start"])
async def test_unsticking_tells_the_connector_how_the_order_ended(
    store: Store, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """The held events applied by a retry (`omsd retry`, or the processor's start) write their outcomes too:
    the intent gets its terminal event."""

    def cancel_bug(order: Order | None, event: Event, now: Any, policy: Policy) -> Any:
        if event.kind == "status_changed" and getattr(event, "state", None) == "canceled":
            raise RuntimeError("a bug in decide")
        return real(order, event, now, policy)

    monkeypatch.setattr(apply_module, "decide", cancel_bug)
    await journal(store, status(HELD, t=1), intent(), status("canceled", t=2))
    await processor(store, Policy()).drain()
    assert [o.type for o in await store.outcomes.after(0, 10)] == ["intent.accepted"]
    monkeypatch.setattr(apply_module, "decide", real)  # fixed
    fixed = processor(store, Policy())
    fixed.offset = await store.read.processor_offset()
    if how == "omsd retry":
        await retry.retry(store, await retry.targets(store, None, STUCK), NOW)
        await fixed.drain()
    else:
        assert await fixed.retry_stuck() == 1
    after = await store.read.load_order(OID)
    assert after is not None and after.phase == Phase.REJECTED and after.stuck is None
    assert [(o.seq, o.type) for o in await store.outcomes.after(0, 10)] == [
        (1, "intent.accepted"),
        (2, "intent.canceled"),
    ]


async def test_a_replay_says_it_tells_the_connector_nothing_of_stuck_orders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`omsd replay` rebuilds a stuck order to its end but derives no outcome: it warns, and names `omsd retry`."""
    db = tmp_path / "omsd.db"
    async with await Store.open(db) as s:
        await journal(s, status(HELD, t=1), intent())
        await processor(s, OVERFLOWING).drain()
    monkeypatch.setenv("OMSD_DB", str(db))
    capsys.readouterr()
    assert await run_cli("replay") == 0
    err = capsys.readouterr().err
    assert "1 order was stuck" in err and "omsd retry --all-stuck" in err


async def _count(store: Store, phase: str, n: int) -> bool:
    return await store.read.count_orders(phase) == n


# ---- the daemon --------------------------------------------------------------------------------


@pytest.fixture
def buggy_intents(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """`decide` raises for approval intents while the list holds True (a bug, fixed by clearing it)."""
    broken = [True]

    def decide(order: Order | None, event: Event, now: Any, policy: Policy) -> Any:
        if broken and event.kind == "intent_recorded":
            raise RuntimeError("a bug in decide")
        return real(order, event, now, policy)

    monkeypatch.setattr(apply_module, "decide", decide)
    return broken


async def test_the_daemon_shows_a_stuck_order_and_approves_it_after_the_fix(
    sim: Simulator, run_daemon: RunDaemon, buggy_intents: list[bool], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """An intent `decide` cannot apply: 202, then the order is stuck: /readyz 503 with the alarm,
    `omsd_orders{phase="stuck"}`, `omsd stuck` lists it, no approval goes out, the release waits
    behind it. The bug fixed, `omsd retry` applies both in order and the order is approved once."""
    async with run_daemon(sim) as daemon:
        order = sim.create("ST1", held=True, decision=None)
        await until(lambda: order.status == HELD, what="sim holds the order")
        await until(reached(daemon, order.order_id, Phase.TRACKING), what="omsd follows it")
        code, _ = await approve(daemon, "ST1", order.order_id)
        assert code == 202
        await until(lambda: STUCK_ALARM in daemon.health.alarms, what="the alarm")
        async with aiohttp.ClientSession() as http, http.get(f"{daemon.url}/readyz") as resp:
            assert resp.status == 503 and any(STUCK_ALARM in p for p in (await resp.json())["problems"])
            async with http.get(f"{daemon.url}/metrics") as m:
                text = await m.text()
        assert 'omsd_orders{phase="stuck"} 1.0' in text and "omsd_events_not_applied_total 1.0" in text
        sim.authorize(order.order_id)
        await until(lambda: held_events(daemon, order.order_id), what="the release waits behind the intent")
        monkeypatch.setenv("OMSD_DB", str(daemon.settings.db))
        assert await run_cli("stuck", "--json") == 0
        assert order.puts == 0
        buggy_intents.clear()
        assert await run_cli("retry", order.order_id) == 0
        await until(reached(daemon, order.order_id, Phase.APPROVED), what="approved after the retry")
        await until(lambda: STUCK_ALARM not in daemon.health.alarms, what="the alarm cleared")
    assert (order.puts, order.approvals_applied, order.puts_while_held) == (1, 1, 0)


async def held_events(daemon: Any, order_id: str) -> bool:
    stored = await daemon.store.read.load_order(order_id)
    return bool(stored and stored.stuck and stored.stuck.held)


async def test_omsd_stuck_lists_the_row_and_error(
    store: Store, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`omsd stuck --json`: the order, the row it is stuck on, its kind, the error, what waits."""
    await journal(store, status(HELD, t=1), intent(), status(FREE, t=20))
    await processor(store, OVERFLOWING).drain()
    monkeypatch.setenv("OMSD_DB", str(store.path))
    capsys.readouterr()
    assert await run_cli("stuck", "--json") == 0
    [line] = capsys.readouterr().out.splitlines()
    view = json.loads(line)
    assert (view["order_id"], view["offset"], view["kind"], view["held"]) == (OID, 2, "intent_recorded", 1)
    assert view["error"].startswith("OverflowError")


# ---- properties --------------------------------------------------------------------------------

STEP = st.one_of(
    st.tuples(st.just("status"), st.sampled_from([HELD, FREE, "canceled", "ready-for-handling"]), st.integers(0, 60)),
    st.tuples(st.just("intent")),
    st.tuples(st.just("resync")),
)


def event_of(step: tuple[Any, ...]) -> AnyEntry:
    if step[0] == "status":
        return status(step[1], t=step[2])
    return intent() if step[0] == "intent" else resync()


async def play(db: Path, events: list[AnyEntry], failing: set[int], chunk: int) -> tuple[Store, Processor]:
    """Journal the events (row N received at T0 + N s), applied `chunk` rows per processor turn
    by a `decide` that raises for the rows in `failing`."""
    store = await Store.open(db)

    def buggy(order: Order | None, event: Event, now: datetime, policy: Policy) -> Any:
        if int((now - T0).total_seconds()) in failing:
            raise RuntimeError("a bug")
        return real(order, event, now, policy)

    p = processor(store, Policy())
    setattr(apply_module, "decide", buggy)  # noqa: B010 - the module's name, patched for this play
    try:
        for n, event in enumerate(events, start=1):
            received = T0 + timedelta(seconds=n)
            await store.journal.append([NewEntry.of(event, source="test", received_at=received)], now=received)
            if n % chunk == 0:
                await p.drain()
        await p.drain()
    finally:
        setattr(apply_module, "decide", real)  # noqa: B010
    return store, p


@settings(max_examples=60, deadline=None)
@given(steps=st.lists(STEP, min_size=1, max_size=12), failing=st.sets(st.integers(1, 12)), chunk=st.integers(1, 5))
async def test_nothing_is_skipped_and_a_retry_gives_what_no_failure_would_have(
    steps: list[tuple[Any, ...]], failing: set[int], chunk: int
) -> None:
    """Safety: from the first event `decide` cannot apply, the order does not change and none of
    its effects is performed. Liveness: once the cause is gone, a retry applies every held
    event in order, and the order, and the outcome stream, are exactly what applying the
    journal without failure gives."""
    events = [event_of(s) for s in steps]
    with tempfile.TemporaryDirectory() as tmp:
        reference, _ = await play(Path(tmp) / "ref.db", events, set(), chunk)
        broken, p = await play(Path(tmp) / "broken.db", events, failing, chunk)
        try:
            stuck = await broken.read.load_order(OID)
            first = min((n for n in failing if n <= len(events)), default=None)
            if first is not None:
                assert stuck is not None and stuck.stuck is not None and stuck.stuck.offset == first
                assert await broken.outbox.claim(100, now=NOW) == []
                before_failure, _ = await play(Path(tmp) / "prefix.db", events[: first - 1], set(), chunk)
                async with before_failure:
                    expected = await before_failure.read.load_order(OID)
                assert (None if stuck.stuck.new else stuck.model_copy(update={"stuck": None})) == expected
            await p.retry_stuck()
            assert await broken.read.load_order(OID) == await reference.read.load_order(OID)
            assert await broken.outcomes.after(0, 100) == await reference.outcomes.after(0, 100)
        finally:
            await broken.close()
            await reference.close()
