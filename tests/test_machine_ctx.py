"""`decide` builds one Order per decision, and its Decision without validating again: the same results."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from omsd.state import machine
from omsd.state.events import Event
from omsd.state.machine import decide
from omsd.state.models import Decision, Order, Policy
from tests.machine_helpers import (
    FREE,
    HELD,
    answered,
    at,
    fetch_failed,
    fetched,
    intent,
    notified,
    resync,
    status,
    timer,
)

POLICY = Policy(max_attempts=3, max_eoi008=2)
STATES = st.sampled_from([HELD, FREE, "order-accepted", "ready-for-handling", "canceled", "payment-pending"])
CODES = st.sampled_from(["SOI002", "SOI003", "EOI000", "EOI001", "EOI008", "EOI009", "EOI011"])
STEP = st.one_of(
    st.tuples(st.just("status"), STATES, st.integers(0, 60)),
    st.tuples(st.just("intent")),
    st.tuples(st.just("answer"), STATES, CODES, st.booleans()),
    st.tuples(st.just("notify"), CODES),
    st.tuples(st.just("timer")),
    st.tuples(st.just("resync")),
)


class _CopyPerSet(machine._Ctx):
    """The reference: a new Order on every `set`, as pydantic's `model_copy` makes it."""

    def set(self, **changes: object) -> None:
        self.order = self.order.model_copy(update=changes)


def _next_event(o: Order | None, step: tuple[Any, ...]) -> Event | None:
    kind = step[0]
    if kind == "status":
        return status(step[1], step[2])
    if kind == "intent":
        return intent()
    if kind == "answer" and o is not None and o.inflight is not None:
        seq = o.inflight.seq
        if o.inflight.kind == "fetch":
            return fetched(step[1], seq=seq, t=50) if step[3] else fetch_failed(seq)
        return answered(step[2], seq=seq)
    if kind == "notify":
        return notified(step[1])
    if kind == "timer" and o is not None and o.timer is not None:
        return timer(o.timer.token, o.timer.reason)
    return resync() if kind == "resync" else None


@settings(max_examples=300, deadline=None)
@given(st.lists(STEP, max_size=30))
def test_one_build_per_decision_equals_one_copy_per_set(steps: list[tuple[Any, ...]]) -> None:
    """On any event sequence the fast context gives the reference's Decision, fields set included."""
    fast: Order | None = None
    slow: Order | None = None
    for i, step in enumerate(steps):
        event = _next_event(fast, step)
        if event is None:
            continue
        got = decide(fast, event, at(100 + i), POLICY)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(machine, "_Ctx", _CopyPerSet)
            want = decide(slow, event, at(100 + i), POLICY)
        assert got == want
        assert got.order.model_fields_set == want.order.model_fields_set
        fast, slow = got.order, want.order


@settings(max_examples=200, deadline=None)
@given(st.lists(STEP, max_size=30))
def test_a_decision_built_without_validation_equals_the_validated_one(steps: list[tuple[Any, ...]]) -> None:
    """`decide` builds its Decision without validating again: the validated model's, fields set included."""
    order: Order | None = None
    for i, step in enumerate(steps):
        event = _next_event(order, step)
        if event is None:
            continue
        got = decide(order, event, at(100 + i), POLICY)
        want = Decision(order=got.order, effects=got.effects, cause=got.cause)
        assert got == want
        assert got.model_fields_set == want.model_fields_set
        assert got.model_dump_json() == want.model_dump_json()
        order = got.order
