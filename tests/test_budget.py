"""Priorities inside the one request budget: the arbiter's order, its minimum shares, the gate."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from omsd.daemon.pipeline.effects import FETCH_PRIORITY
from omsd.daemon.vtex.budget import Arbiter, Priority, PriorityGate
from omsd.daemon.vtex.client import VtexClient
from tests.helpers import settings as make_settings
from tests.helpers import until

C, A, IN, B = Priority.COMMIT, Priority.APPROVAL, Priority.INTAKE, Priority.BACKGROUND
CH, SP = Priority.CHECK, Priority.SPECULATIVE


def drain(arbiter: Arbiter[str]) -> list[str]:
    out: list[str] = []
    while (item := arbiter.pop()) is not None:
        out.append(item)
    return out


def test_strict_priority_without_shares() -> None:
    """Without minimum shares, commits go first, then approval PUTs, the release path's Get
    orders, feed reads, speculative checks and the rest, FIFO within."""
    arb: Arbiter[str] = Arbiter(shares={})
    for name, p in [("b1", B), ("s1", SP), ("k1", CH), ("i1", IN), ("a1", A), ("c1", C), ("b2", B), ("a2", A)]:
        arb.push(p, name)
    assert drain(arb) == ["c1", "a1", "a2", "k1", "i1", "s1", "b1", "b2"]


def test_intake_keeps_its_share_under_a_flood_of_approvals() -> None:
    """With approvals always waiting, feed reads still get one grant in four."""
    arb: Arbiter[str] = Arbiter()
    for n in range(40):
        arb.push(A, f"a{n}")
    for n in range(10):
        arb.push(IN, f"i{n}")
    first = [arb.pop() for _ in range(20)]
    assert sum(1 for x in first if x and x.startswith("i")) == 5
    assert first[3] == "i0"


def test_background_is_late_but_never_starved() -> None:
    """A background call waiting behind an endless stream of approvals is served within twenty grants."""
    arb: Arbiter[str] = Arbiter()
    arb.push(B, "b0")
    served: list[str] = []
    for n in range(25):
        arb.push(A, f"a{n}")
        served.append(arb.pop() or "")
    assert "b0" in served[:20] and served[0] == "a0"


def test_speculative_checks_are_late_but_never_starved() -> None:
    """A speculative check waiting behind an endless stream of release-path Get orders and feed
    reads is served within twenty-one grants (its one in twenty, once a feed read due at the
    same grant went first); the feed reads keep their one in four."""
    arb: Arbiter[str] = Arbiter()
    arb.push(SP, "s0")
    served: list[str] = []
    for n in range(25):
        arb.push(CH, f"k{n}")
        arb.push(IN, f"i{n}")
        served.append(arb.pop() or "")
    assert "s0" in served[:21] and served[0] == "k0"
    assert sum(1 for x in served[:20] if x.startswith("i")) == 5


def test_a_quiet_class_banks_no_credit() -> None:
    """A class that had nobody waiting does not jump ahead later on credit it never used."""
    arb: Arbiter[str] = Arbiter()
    for n in range(30):
        arb.push(A, f"a{n}")
        arb.pop()
    arb.push(A, "a-next")
    arb.push(IN, "i0")
    assert arb.pop() == "a-next"


async def test_gate_grants_turns_in_priority_order() -> None:
    """Callers queued at the gate while it is held pass in class order, one at a time."""
    gate = PriorityGate(shares={})
    order: list[str] = []
    release = asyncio.Event()

    async def call(name: str, p: Priority, hold: asyncio.Event | None = None) -> None:
        async with gate.turn(p):
            order.append(name)
            if hold is not None:
                await hold.wait()

    first = asyncio.create_task(call("first", B, release))
    await until(lambda: order == ["first"], what="the first turn")
    others = [asyncio.create_task(call(n, p)) for n, p in [("b", B), ("i", IN), ("a", A), ("c", C)]]
    await asyncio.sleep(0)
    release.set()
    await asyncio.gather(first, *others)
    assert order == ["first", "c", "a", "i", "b"]


async def test_a_cancelled_waiter_does_not_block_the_gate() -> None:
    """A caller cancelled while waiting for its turn leaves the gate usable by the next."""
    gate = PriorityGate()
    release = asyncio.Event()
    done: list[str] = []

    async def hold() -> None:
        async with gate.turn(B):
            await release.wait()

    async def call(name: str) -> None:
        async with gate.turn(A):
            done.append(name)

    holder = asyncio.create_task(hold())
    await asyncio.sleep(0)
    doomed, kept = asyncio.create_task(call("doomed")), asyncio.create_task(call("kept"))
    await asyncio.sleep(0)
    doomed.cancel()
    release.set()
    await asyncio.gather(holder, kept)
    assert done == ["kept"]


def test_fetches_on_the_release_path_go_after_approvals_and_before_the_feed() -> None:
    """A pre-approval or after-refusal Get order, or the link lookup of an intent parked on the
    order's derived id, goes on the release path (after the PUTs, before feed reads); a
    speculative check after feed reads; the rest as background."""
    assert FETCH_PRIORITY == {
        "pre_approval": CH,
        "after_refusal": CH,
        "link_intent": CH,
        "speculative": SP,
        "link": B,
        "confirm": B,
    }
    assert A < CH < IN < SP < B


class Recorder:
    """A loopback VTEX that records the order in which calls arrive."""

    def __init__(self) -> None:
        self.arrivals: list[str] = []

    async def order(self, request: web.Request) -> web.Response:
        self.arrivals.append("get:" + request.match_info["order_id"])
        return web.json_response({"orderId": request.match_info["order_id"]})

    async def approve(self, request: web.Request) -> web.Response:
        body: Any = await request.json()
        self.arrivals.append("put:" + body["marketplaceOrderId"])
        return web.json_response({"code": "SOI003", "success": True})


@pytest.fixture
async def recorder() -> AsyncIterator[tuple[Recorder, str]]:
    rec = Recorder()
    app = web.Application()
    app.router.add_get("/api/oms/pvt/orders/{order_id}", rec.order)
    app.router.add_put("/api/order-integration/orders/status", rec.approve)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield rec, f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def test_an_approval_goes_before_a_queued_backlog(recorder: tuple[Recorder, str]) -> None:
    """With the budget saturated by queued background Get orders, an approval PUT is sent next."""
    rec, base = recorder
    async with aiohttp.ClientSession() as session:
        c = VtexClient(make_settings(vtex_base_url=base, rate_limit_per_s=2, rate_adapt=False), session)
        backlog = [asyncio.create_task(c.get_order(f"B-{n}")) for n in range(40)]
        await until(lambda: len(rec.arrivals) >= 2, what="the first second's slots used")
        queued = len(rec.arrivals)
        put = asyncio.create_task(c.approve("M-1"))
        await put
        for task in backlog:
            task.cancel()
        await asyncio.gather(*backlog, return_exceptions=True)
    # one background call may already hold its turn at the throttle; nothing else goes first
    assert "put:M-1" in rec.arrivals[queued : queued + 2]
