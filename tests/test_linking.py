"""Lazy linking of marketplace ids, and re-checks after VTEX deleted a configuration,
end to end against the simulator."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from omsd.daemon.app import Daemon
from omsd.sim.server import Simulator
from omsd.state.statuses import HELD, Phase
from tests.helpers import approve, hooked, phase_of, reached, until

pytestmark = pytest.mark.e2e


def tracked(daemon: Daemon, order_id: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await phase_of(daemon, order_id) is not None

    return check


def get_orders(sim: Simulator) -> int:
    return sum(n for name, n in sim.calls.items() if name.startswith("get_order"))


async def test_orders_nobody_asked_for_cost_no_get_order(sim: Simulator, run_daemon: Any) -> None:
    """Orders seen in the feed without any intent are tracked without a single Get order."""
    async with run_daemon(sim, link_interval_s=0.05) as daemon:
        orders = [sim.create(f"N{i}", held=True, decision=None) for i in range(5)]
        for order in orders:
            await until(tracked(daemon, order.order_id), what="order tracked")
        await until(lambda: not sim.queue.messages, what="feed drained")
        assert daemon.processor is not None
        await daemon.processor.drain()
    assert get_orders(sim) == 0


async def test_intent_for_an_order_already_tracked_is_linked_and_approved(sim: Simulator, run_daemon: Any) -> None:
    """An intent naming only the marketplace id of an order omsd already tracks is linked by one
    lookup and approved after the release; unrelated tracked orders are not looked up first."""
    async with run_daemon(sim, link_interval_s=0.05, link_lookups_per_run=1) as daemon:
        others = [sim.create(f"U{i}", held=True, decision=None) for i in range(3)]
        order = sim.create("T1", held=True, decision=None)
        for o in [*others, order]:
            await until(lambda o=o: o.status == HELD, what="held")  # type: ignore[misc]
            await until(tracked(daemon, o.order_id), what="tracked")
        status, body = await approve(daemon, "T1")
        assert status == 202 and body["waitingForLink"] is True
        await until(reached(daemon, order.order_id, Phase.WAITING_RELEASE), what="linked")
        sim.authorize(order.order_id)
        await until(reached(daemon, order.order_id, Phase.APPROVED), what="approved")
        assert daemon.store is not None
        rows = [await daemon.store.read.load_order(o.order_id) for o in others]
    assert [r.order_id for r in rows if r is None or r.link_checked] == []
    assert (order.puts, order.approvals_applied, order.puts_while_held) == (1, 1, 0)


async def test_released_order_is_approved_once_a_deleted_hook_is_recreated(sim: Simulator, run_daemon: Any) -> None:
    """Hook only: VTEX deleted the hook configuration and pushed nothing of the release; the
    frequent check while intents wait recreates it and re-checks the waiting order at once,
    long before the held re-check."""
    settings = hooked(self_check_s=3600, waiting_self_check_s=1, held_recheck_s=3600)
    async with run_daemon(sim, **settings) as daemon:
        order = sim.create("D1", held=True, decision=None)
        await until(lambda: order.status == HELD, what="held")
        await approve(daemon, "D1", order.order_id)
        await until(reached(daemon, order.order_id, Phase.WAITING_RELEASE), what="omsd waits")
        sim.hook_config = None  # VTEX deleted it after inactivity
        sim.authorize(order.order_id)
        await until(lambda: order.status != HELD, what="released at VTEX")
        await until(reached(daemon, order.order_id, Phase.APPROVED), what="approved after the hook came back")
        assert sim.hook_config is not None
        assert daemon.metrics.sample("omsd_config_resyncs_total") >= 1
    assert (order.puts, order.approvals_applied, order.puts_while_held) == (1, 1, 0)


async def test_intents_for_orders_that_never_appear_cost_no_get_order(sim: Simulator, run_daemon: Any) -> None:
    """Many intents parked for marketplace ids no order has ask no Get order of their own:
    a tracked unlinked order is looked up once whatever the number of intents, and a real
    approval goes ahead."""
    async with run_daemon(sim, link_interval_s=0.05) as daemon:
        assert daemon.store is not None
        store = daemon.store
        order = sim.create("R1", held=True, decision=None)
        await until(tracked(daemon, order.order_id), what="tracked")
        for i in range(50):
            assert (await approve(daemon, f"GHOST{i}"))[1]["waitingForLink"] is True
        await until(
            lambda: daemon.metrics.sample("omsd_link_lookups_total", trigger="job") == 1,
            what="the one unlinked order looked up",
        )
        await until(lambda: order_linked(daemon, order.order_id), what="linked by its lookup")
        await approve(daemon, "R1", order.order_id)
        sim.authorize(order.order_id)
        await until(reached(daemon, order.order_id, Phase.APPROVED), what="approved")
        assert len(await store.read.pending_intents()) == 50
    assert daemon.metrics.sample("omsd_link_lookups_total", trigger="job") == 1
    assert order.approvals_applied == 1


async def order_linked(daemon: Any, order_id: str) -> bool:
    found = await daemon.store.read.load_order(order_id)
    return found is not None and found.marketplace_order_id is not None


async def test_released_order_is_approved_once_a_deleted_feed_is_recreated(sim: Simulator, run_daemon: Any) -> None:
    """Feed only: VTEX deleted the feed configuration and queued nothing of the release; the
    poller's 404 recreates it and the waiting order is re-checked at once."""
    async with run_daemon(sim, self_check_s=3600, held_recheck_s=3600) as daemon:
        order = sim.create("D2", held=True, decision=None)
        await until(lambda: order.status == HELD, what="held")
        await approve(daemon, "D2", order.order_id)
        await until(reached(daemon, order.order_id, Phase.WAITING_RELEASE), what="omsd waits")
        sim.feed_config = None  # VTEX deleted it after inactivity
        sim.authorize(order.order_id)
        await until(reached(daemon, order.order_id, Phase.APPROVED), what="approved after the feed came back")
        assert sim.feed_config is not None
    assert (order.puts, order.approvals_applied, order.puts_while_held) == (1, 1, 0)


async def test_self_check_that_recreates_the_feed_rechecks_waiting_orders(sim: Simulator, run_daemon: Any) -> None:
    """The scheduled self-check, finding the feed configuration gone, re-checks every order
    waiting for a release (and only those)."""
    async with run_daemon(sim, **hooked(source="both", poll_interval_s=3600, self_check_s=3600)) as daemon:
        assert daemon.setup is not None and daemon.store is not None
        order = sim.create("S1", held=True, decision=None)
        idle = sim.create("S2", held=True, decision=None)
        await until(lambda: order.status == HELD and idle.status == HELD, what="held")
        await approve(daemon, "S1", order.order_id)
        await until(reached(daemon, order.order_id, Phase.WAITING_RELEASE), what="omsd waits")
        sim.feed_config = None
        await daemon.setup.check()
        assert sim.feed_config is not None
        store = daemon.store

        async def rechecked() -> bool:
            causes = [h.cause for h in await store.read.history(order.order_id)]
            return any("resync: feed configuration recreated" in c for c in causes)

        await until(rechecked, what="the waiting order re-checked")
        assert daemon.metrics.sample("omsd_config_resyncs_total") == 1
