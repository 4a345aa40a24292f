"""Liveness of the pure machine: once VTEX has released an order, omsd approves it soon.

A small model of VTEX plays against `decide`. VTEX moves the order through its statuses;
every change reaches omsd as a feed or hook event, in any order and possibly twice; omsd's
Get orders and approval PUTs are answered truthfully, but each answer (and each
notification) is delivered whenever the scheduler picks it, so it may arrive after newer
events. Bogus events dated far in the future may show up too.

The intent may come before VTEX has the order at all: Get order then answers 404, and
an approval PUT `EOI008`.

A first, free phase may fire any timer. Then VTEX releases the order for good, and from
there on the scheduler only fires timers whose delay is at most the short knobs (retry,
creating re-check, EOI008): the slow held re-check and the confirm timeout never fire.
The properties: the approval PUT still goes out; until it does the order is never
parked without work in flight or a short timer; and once omsd has seen the release, no
retry timer has to fire for it (the model's VTEX answers every call, so a wait for a
re-check after a 404 or an `EOI008` is all a retry timer could be for).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from omsd.state.apply import View, read
from omsd.state.apply import apply as apply_rows
from omsd.state.batch import JournalRow
from omsd.state.events import (
    AnyEntry,
    ApprovalAnswered,
    Event,
    IntentReceived,
    IntentRecorded,
    OrderFetched,
    OrderFetchFailed,
    ResultNotified,
    StatusChanged,
    TimerFired,
    current_version,
)
from omsd.state.machine import decide
from omsd.state.models import Effect, FetchOrder, Order, Policy, is_superseded
from omsd.state.statuses import TERMINAL_PHASES, Phase
from tests.machine_helpers import FAR_FUTURE, FREE, HELD, MKT, OID, at

POLICY = Policy(
    held_recheck_s=600,
    confirm_timeout_s=120,
    retry_base_s=1,
    retry_cap_s=10,
    max_attempts=100,
    eoi008_recheck_s=5,
    max_eoi008=100,
    creating_recheck_s=5,
)
SHORT_S = max(POLICY.retry_cap_s, POLICY.eoi008_recheck_s, POLICY.creating_recheck_s)
assert min(POLICY.held_recheck_s, POLICY.confirm_timeout_s) > SHORT_S

CREATED, ACCEPTED = "order-created", "order-accepted"
# VTEX's seller flow as the model plays it (doc §4): created, accepted, then held or
# waiting for the marketplace; a release leads to either UNCONFIRMED reading; a released
# order may be held again.
NEXT: dict[str | None, tuple[str, ...]] = {
    None: (CREATED,),
    CREATED: (ACCEPTED,),
    ACCEPTED: (HELD, FREE),
    HELD: (FREE, ACCEPTED),
    FREE: (HELD,),
}
RELEASED = (FREE, ACCEPTED)  # the statuses a released (or never-held) order waits in


def _fetched(seq: int, truth: str, truth_at: datetime | None, now: datetime) -> OrderFetched:
    """What VTEX's Get order answers about the order, as the machine receives it."""
    return OrderFetched(
        order_id=OID, seq=seq, status=truth, marketplace_order_id=MKT, last_change=truth_at, fetched_at=now
    )


@dataclass
class World:
    """VTEX's truth, what is on the wire, and omsd's order."""

    now: datetime = field(default_factory=lambda: at(100))
    truth: str | None = None
    truth_at: datetime | None = None
    order: Order | None = None
    wire: list[Event] = field(default_factory=list)  # status events, answers, notifications
    outbox: list[Effect] = field(default_factory=list)  # effects omsd asked for, not yet performed
    timer_set_at: dict[int, datetime] = field(default_factory=dict)
    divergent: bool = False  # a price divergence: VTEX holds the order after order-accepted
    held_once: bool = False
    intent_sent: bool = False
    released: bool = False  # VTEX released the order for good (the second phase)
    release_seen: bool = False  # ... and omsd applied that release event
    approved: bool = False  # VTEX took an approval PUT
    fired_after_release: list[str] = field(default_factory=list)  # timers fired once the release was seen
    trace: list[str] = field(default_factory=list)

    def tick(self, seconds: float = 1) -> None:
        self.now += timedelta(seconds=seconds)

    def move(self, state: str, source: str) -> StatusChanged:
        """VTEX changes the order's status; the change goes on the wire."""
        self.tick()
        event = StatusChanged(
            order_id=OID,
            source="hook" if source == "hook" else "feed",
            state=state,
            last_state=self.truth,
            current_change=self.now,
        )
        self.truth, self.truth_at = state, self.now
        self.held_once = self.held_once or state == HELD
        self.wire.append(event)
        self.trace.append(f"VTEX -> {state}")
        return event

    def apply(self, event: Event) -> None:
        self.tick()
        before = self.order
        decision = decide(self.order, event, self.now, POLICY)
        self.order = decision.order
        self.outbox.extend(decision.effects)
        timer = self.order.timer
        if timer is not None and (before is None or before.timer is None or before.timer.token != timer.token):
            self.timer_set_at[timer.token] = self.now
        self.trace.append(f"{event.kind} {_brief(event)} -> {self.order.phase} [{decision.cause}]")

    def next_statuses(self) -> tuple[str, ...]:
        if self.divergent and not self.held_once and self.truth == ACCEPTED:
            return (HELD,)
        return NEXT[self.truth]

    def put_result(self) -> str:
        """What VTEX makes of an approval PUT now (doc §3.4, §3.5)."""
        if self.truth == HELD or (self.divergent and not self.held_once):
            return "EOI011"  # held, or divergent and the hold has not come yet
        if self.truth in (None, CREATED):
            return "EOI008"
        return "SOI002"

    def perform(self, effect: Effect, enqueue: bool) -> None:
        """omsd's runner performs an effect (unless superseded); VTEX answers truthfully."""
        if is_superseded(self.order, effect.seq):
            self.trace.append(f"superseded {effect.kind} {effect.seq}")
            return
        self.tick()
        if isinstance(effect, FetchOrder):
            if self.truth is None:
                self.wire.append(OrderFetchFailed(order_id=OID, seq=effect.seq, error="HTTP 404", not_found=True))
                self.trace.append(f"Get order {effect.seq} answered 404")
                return
            self.wire.append(_fetched(effect.seq, self.truth, self.truth_at, self.now))
            self.trace.append(f"Get order {effect.seq} answered {self.truth}")
            return
        code = self.put_result()
        self.trace.append(f"PUT {effect.seq}: {code}")
        self.approved = self.approved or code == "SOI002"
        sync = "SOI003" if enqueue else code
        self.wire.append(ApprovalAnswered(order_id=OID, seq=effect.seq, code=sync, http_status=200))
        if enqueue:
            self.wire.append(
                ResultNotified(
                    order_id=OID, marketplace_order_id=MKT, code=code, flow="ApproveOrder", authenticated=True
                )
            )

    def timer_delay_s(self) -> float | None:
        timer = self.order.timer if self.order else None
        if timer is None:
            return None
        return (timer.due_at - self.timer_set_at.get(timer.token, self.now)).total_seconds()

    def fire_timer(self) -> None:
        assert self.order is not None and self.order.timer is not None
        timer = self.order.timer
        if self.release_seen:
            self.fired_after_release.append(timer.reason)
        self.now = max(self.now, timer.due_at)
        self.apply(TimerFired(order_id=OID, token=timer.token, reason=timer.reason))

    def busy(self) -> bool:
        """The order has work in flight or a short timer (or waits for VTEX's result of a PUT)."""
        o = self.order
        if o is None or not o.has_intent or o.phase in TERMINAL_PHASES:
            return True
        delay = self.timer_delay_s()
        short_timer = delay is not None and delay <= SHORT_S
        return o.inflight is not None or short_timer or o.phase == Phase.AWAITING_RESULT

    def deliver(self, index: int) -> None:
        event = self.wire.pop(index % len(self.wire))
        self.apply(event)
        if self.released and isinstance(event, StatusChanged) and event.current_change == self.truth_at:
            self.release_seen = True


def _brief(event: Event | AnyEntry) -> str:
    for name in ("state", "status", "code", "reason"):
        value = getattr(event, name, None)
        if value is not None:
            return f"{name}={value}"
    return ""


INTENT = IntentRecorded(order_id=OID, marketplace_order_id=MKT, source="api")


def _step(world: World, data: st.DataObject, slow_timers: bool) -> bool:
    """One step picked by the scheduler: deliver something on the wire (first phase: or
    deliver it twice), perform an effect, or fire the timer. False when nothing can happen."""
    actions: list[tuple[str, int]] = [("deliver", i) for i in range(len(world.wire))]
    actions += [("perform", i) for i in range(len(world.outbox))]
    delay = world.timer_delay_s()
    if delay is not None and (slow_timers or delay <= SHORT_S):
        actions.append(("timer", 0))
    if slow_timers:
        actions += [("dup", i) for i in range(len(world.wire))]
    if not actions:
        return False
    kind, i = data.draw(st.sampled_from(actions))
    if kind == "deliver":
        world.deliver(i)
    elif kind == "dup":
        world.apply(world.wire[i])
    elif kind == "perform":
        world.perform(world.outbox.pop(i), data.draw(st.booleans(), label="enqueue"))
    else:
        world.fire_timer()
    return True


def _first_phase(world: World, data: st.DataObject) -> None:
    """VTEX moves the order a few times while omsd works; any timer may fire. Now and then
    a bogus event dated far in the future shows up."""
    intent_round = data.draw(st.integers(0, 8), label="intent round")
    for round_ in range(data.draw(st.integers(1, 8), label="rounds")):
        if round_ == intent_round:
            world.intent_sent = True
            world.wire.append(INTENT)
            # omsd may act on the intent before VTEX's next change (in round 0: before the
            # order exists, so Get order answers 404)
            for _ in range(data.draw(st.integers(0, 6), label="steps before the change")):
                if world.approved or not _step(world, data, slow_timers=True):
                    break
        world.move(data.draw(st.sampled_from(world.next_statuses())), data.draw(st.sampled_from(["feed", "hook"])))
        if data.draw(st.integers(0, 5), label="bogus event") == 0:
            bogus = data.draw(st.sampled_from([HELD, FREE, ACCEPTED]))
            world.wire.append(StatusChanged(order_id=OID, source="hook", state=bogus, current_change=FAR_FUTURE))
        for _ in range(data.draw(st.integers(0, 10), label="steps")):
            if world.approved or not _step(world, data, slow_timers=True):
                break


def _release(world: World, data: st.DataObject) -> None:
    """VTEX releases the order for good (or it waits, never held, for the marketplace)."""
    if not world.intent_sent:
        world.intent_sent = True
        world.wire.append(INTENT)
    while world.truth not in RELEASED or (world.divergent and not world.held_once):
        nexts = world.next_statuses()
        options = [s for s in nexts if s in RELEASED] or list(nexts)
        world.move(data.draw(st.sampled_from(options)), data.draw(st.sampled_from(["feed", "hook"])))
    world.released = True
    if not any(isinstance(e, StatusChanged) and e.current_change == world.truth_at for e in world.wire):
        # The status is the release already; its event was applied before.
        world.release_seen = True


def _run(data: st.DataObject, parked: bool, release_path: bool = False) -> World:
    """Play the first phase, then the release and a fair schedule without slow timers.
    With `parked`, check after every step that a seen release keeps the order busy;
    with `release_path`, that the Get order it waits for then is on the release path;
    without either, check that the approval goes out."""
    world = World(divergent=data.draw(st.booleans(), label="divergent"))
    _first_phase(world, data)
    if world.approved:
        return world  # VTEX took an approval before the release: nothing left to show
    _release(world, data)
    for _ in range(100):
        if world.approved:
            return world
        if parked:
            assert not world.release_seen or world.busy(), "order parked after the release:\n" + _story(world)
        # (an order never held that rests in order-accepted shows nothing omsd can tell from
        # being created: its checks stay speculative, and it is tried after one re-check)
        if release_path and world.release_seen and world.order is not None and (world.held_once or world.truth == FREE):
            inflight = world.order.inflight
            assert inflight is None or inflight.purpose != "speculative", "a speculative check:\n" + _story(world)
        if not _step(world, data, slow_timers=False):
            assert parked, "nothing left to happen but no approval went out:\n" + _story(world)
            return world
    raise AssertionError("no approval after 100 steps (a hot loop?):\n" + _story(world))


def _story(world: World) -> str:
    return "\n".join(world.trace[-40:]) + f"\norder: {world.order!r}"


# A failing example is found at once, but shrinking these long runs can outlast the suite's
# per-test timeout, which would turn a clear counterexample into a "flaky" error.
@pytest.mark.timeout(600)
@settings(max_examples=600, deadline=None)
@given(st.data())
def test_a_released_order_is_approved_without_the_slow_recheck(data: st.DataObject) -> None:
    """Once VTEX releases an order for good, the approval PUT goes out without the held re-check."""
    assert _run(data, parked=False).approved


@pytest.mark.timeout(600)
@settings(max_examples=600, deadline=None)
@given(st.data())
def test_a_seen_release_is_never_parked(data: st.DataObject) -> None:
    """After omsd saw the release, the order always has a call in flight or a short timer
    (or waits for VTEX's result of a PUT it made) until the approval goes out."""
    _run(data, parked=True)


@pytest.mark.timeout(600)
@settings(max_examples=600, deadline=None)
@given(st.data())
def test_a_seen_release_is_checked_on_the_release_path(data: st.DataObject) -> None:
    """After omsd saw the release (from the hold, or to a status past creation), the Get order
    the order waits for is never a speculative one (which waits behind the release path): a
    speculative check asked before (an intent before any status, a creation or held re-check)
    is replaced by one on the release path."""
    _run(data, parked=True, release_path=True)


@pytest.mark.timeout(600)
@settings(max_examples=600, deadline=None)
@given(st.data())
def test_a_seen_release_waits_for_no_retry_timer(data: st.DataObject) -> None:
    """An intent that came before its order (Get order 404, EOI008) or any other wait for a
    re-check: once omsd has applied the release, the approval goes out without a retry timer
    firing (the release, or any newer status, ends the wait at once)."""
    world = _run(data, parked=False)
    assert "retry" not in world.fired_after_release, _story(world)


# ---- an intent that names only the marketplace id -----------------------------------------
# The connector names only the marketplace id; VTEX's events name only its order id, which
# derives from it (`MKP-123-01` for `123`). omsd parks the intent until a Get order links the
# two. The model plays the processor: each journal row is applied over the view the store
# would give (`state.apply`), the effects are performed truthfully in any order, and the
# background link job never runs, nor the slow timers.

LINK_PATH = (CREATED, ACCEPTED, HELD, FREE)


@dataclass
class Store:
    """What the processor's view would hold, VTEX's truth, and the wire."""

    now: datetime = field(default_factory=lambda: at(100))
    truth: str | None = None
    truth_at: datetime | None = None
    order: Order | None = None
    parked: dict[str, tuple[str, int]] = field(default_factory=dict)
    wire: list[AnyEntry] = field(default_factory=list)
    outbox: list[Effect] = field(default_factory=list)
    offset: int = 0
    timer_set_at: dict[int, datetime] = field(default_factory=dict)
    intent_sent: bool = False
    approved: bool = False
    trace: list[str] = field(default_factory=list)

    def view(self) -> View:
        o = self.order
        orders = {OID: o} if o is not None else {}
        linked = {MKT: o} if o is not None and o.marketplace_order_id == MKT else {}
        derived = {MKT: o} if o is not None and o.marketplace_order_id is None else {}
        return View(orders=orders, by_marketplace_id=linked, parked=dict(self.parked), derived=derived)

    def apply(self, entry: AnyEntry) -> None:
        self.now += timedelta(seconds=1)
        self.offset += 1
        payload = entry.model_dump_json()
        order_id = getattr(entry, "order_id", None)
        row = JournalRow(
            self.offset, entry.kind, "test", order_id, payload, None, self.now, current_version(entry.kind)
        )
        before = self.order
        batch = apply_rows([(row, read(row))], self.view(), POLICY)
        self.order = batch.orders.get(OID, self.order)
        for mkt in batch.remove_pending:
            self.parked.pop(mkt, None)
        self.parked.update(batch.add_pending)
        self.outbox.extend(batch.effects)
        timer = self.order.timer if self.order else None
        if timer is not None and (before is None or before.timer is None or before.timer.token != timer.token):
            self.timer_set_at[timer.token] = self.now
        phase = self.order.phase if self.order else None
        self.trace.append(f"{entry.kind} {_brief(entry)} -> {phase} parked={sorted(self.parked)}")

    def move(self) -> None:
        """VTEX's next status; its event goes on the wire (by hook and by feed: twice)."""
        self.now += timedelta(seconds=1)
        nxt = LINK_PATH[LINK_PATH.index(self.truth) + 1] if self.truth else LINK_PATH[0]
        event = StatusChanged(order_id=OID, source="hook", state=nxt, last_state=self.truth, current_change=self.now)
        self.truth, self.truth_at = nxt, self.now
        self.wire += [event, event.model_copy(update={"source": "feed"})]
        self.trace.append(f"VTEX -> {nxt}")

    def perform(self, effect: Effect) -> None:
        if is_superseded(self.order, effect.seq):
            return
        self.now += timedelta(seconds=1)
        if isinstance(effect, FetchOrder):
            if self.truth is None:
                self.wire.append(OrderFetchFailed(order_id=OID, seq=effect.seq, error="HTTP 404", not_found=True))
                return
            self.wire.append(_fetched(effect.seq, self.truth, self.truth_at, self.now))
            self.trace.append(f"Get order {effect.seq} ({effect.purpose}): {self.truth}")
            return
        code = "EOI011" if self.truth == HELD else "EOI008" if self.truth in (None, CREATED) else "SOI002"
        self.approved = self.approved or code == "SOI002"
        self.trace.append(f"PUT {effect.seq}: {code}")
        self.wire.append(ApprovalAnswered(order_id=OID, seq=effect.seq, code=code, http_status=200))

    def short_timer(self) -> bool:
        timer = self.order.timer if self.order else None
        if timer is None:
            return False
        return (timer.due_at - self.timer_set_at.get(timer.token, self.now)).total_seconds() <= SHORT_S


@pytest.mark.timeout(600)
@settings(max_examples=400, deadline=None)
@given(st.data())
def test_a_parked_intent_is_approved_without_the_link_job(data: st.DataObject) -> None:
    """An intent by marketplace id, before or after its order's events, in any interleaving with
    them and with the answers: once VTEX released the order, the approval goes out without the
    background link job and without a slow timer (the order whose id derives from the parked id
    is looked up at once)."""
    store = Store()
    for _ in range(300):
        if store.approved:
            return
        actions: list[tuple[str, int]] = [("deliver", i) for i in range(len(store.wire))]
        actions += [("perform", i) for i in range(len(store.outbox))]
        if store.truth != FREE:
            actions.append(("vtex", 0))
        if not store.intent_sent:
            actions.append(("intent", 0))
        if store.short_timer():
            actions.append(("timer", 0))
        assert actions, "nothing left to happen but no approval went out:\n" + "\n".join(store.trace[-40:])
        kind, i = data.draw(st.sampled_from(actions))
        if kind == "deliver":
            store.apply(store.wire.pop(i))
        elif kind == "perform":
            store.perform(store.outbox.pop(i))
        elif kind == "vtex":
            store.move()
        elif kind == "intent":
            store.intent_sent = True
            store.wire.append(IntentReceived(marketplace_order_id=MKT, source="api"))
        else:
            assert store.order is not None and store.order.timer is not None
            timer = store.order.timer
            store.now = max(store.now, timer.due_at)
            store.apply(TimerFired(order_id=OID, token=timer.token, reason=timer.reason))
    raise AssertionError("no approval after 300 steps:\n" + "\n".join(store.trace[-40:]))
