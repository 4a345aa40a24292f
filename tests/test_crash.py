"""`omsd run` as a real process, killed with SIGKILL at several points and restarted
on the same database: every approval is made once and nothing is sent while held."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from omsd.sim.faults import Faults
from omsd.sim.orders import SimOrder
from omsd.sim.server import Simulator
from omsd.state.statuses import Phase
from omsd.state.store import Store
from tests.helpers import API_TOKEN, free_port, omsd_env, omsd_run, until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

HOOK_SECRET = "crash-test-hook-secret-42"


class Omsd:
    """Start, kill and restart `omsd run` on one database and port."""

    def __init__(self, env: dict[str, str], port: int, log: Path) -> None:
        self.env = env
        self.port = port
        self.log = log
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0

    async def start(self) -> None:
        self.starts += 1
        self.proc = await omsd_run(self.env, self.port, self.log)

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()

    async def terminate(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), timeout=30)


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    s = Simulator(seed=3, faults=Faults(notify_delay_s=(0.01, 0.1)), visibility_override_s=1.0, step_delay_s=0.05)
    await s.start()
    try:
        yield s
    finally:
        await s.stop()


async def post_intent(port: int, order: SimOrder) -> None:
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            f"http://127.0.0.1:{port}/v1/approvals",
            json={"marketplaceOrderId": order.marketplace_order_id, "orderId": order.order_id},
            headers={"Authorization": f"Bearer {API_TOKEN}"},
        ) as resp,
    ):
        assert resp.status == 202


async def kill_on(sim: Simulator, omsd: Omsd, signal_name: str) -> None:
    """SIGKILL omsd the moment the simulator sees the next call of this kind."""
    event = sim.signal(signal_name)
    event.clear()
    try:
        await asyncio.wait_for(event.wait(), timeout=60)
    except TimeoutError:
        raise AssertionError(f"no {signal_name} call within 60 s (start {omsd.starts})") from None
    await omsd.kill()


async def final_phases(db: Path) -> dict[str, str]:
    async with await Store.open(db) as store:
        return {o.order_id: o.phase.value for o in await store.read.list_orders(limit=1000)}


async def test_sigkill_at_several_points_loses_nothing(sim: Simulator, tmp_path: Path) -> None:
    """Killed while polling, mid-approval and mid-check, then restarted: each order ends
    where it should, VTEX applied each approval once, nothing was sent while held."""
    port = free_port()
    db = tmp_path / "omsd.db"
    omsd = Omsd(omsd_env(sim, db, port), port, tmp_path / "omsd.log")
    expected: dict[str, Phase] = {}
    orders: list[SimOrder] = []
    await omsd.start()
    for i in range(12):
        kind = i % 4
        order = sim.create(
            f"K{i}",
            held=kind in (1, 2),
            decision="reject" if kind == 2 else "authorize",
            decide_after_s=1.0 + i * 0.6,  # spread, so approvals are still being sent at every kill point
            flip_back=1 if kind == 3 else 0,
        )
        orders.append(order)
        expected[order.order_id] = Phase.REJECTED if kind == 2 else Phase.APPROVED
    for order in orders:
        await until(lambda o=order: o.status not in ("", "order-created", "order-accepted"), what="settled")  # type: ignore[misc]
        await post_intent(port, order)

    for point in ("feed_commit", "put", "get_order", "put", "feed_get"):
        await kill_on(sim, omsd, point)
        await omsd.start()

    async def all_done() -> bool:
        phases = await final_phases(db)
        return all(phases.get(oid) == phase.value for oid, phase in expected.items())

    await until(all_done, timeout=120, what="every order at its end")
    assert await omsd.terminate() == 0
    assert omsd.starts == 6
    assert sum(o.puts_while_held for o in orders) == 0
    for order in orders:
        want = 1 if expected[order.order_id] == Phase.APPROVED else 0
        assert order.approvals_applied == want, order.order_id
    assert not sim.protocol_errors


async def test_sigterm_mid_scenario_exits_cleanly_and_resumes(sim: Simulator, tmp_path: Path) -> None:
    """SIGTERM while orders are in flight (feed and hook both on): exit 0, and after a
    restart nothing is lost; no configured secret appears anywhere in the logs."""
    port = free_port()
    db = tmp_path / "omsd.db"
    env = omsd_env(sim, db, port)
    env.update({"OMSD_SOURCE": "both", "OMSD_HOOK_SECRET": HOOK_SECRET})
    omsd = Omsd(env, port, tmp_path / "omsd.log")
    await omsd.start()
    orders = [sim.create(f"T{i}", held=True, decision="authorize", decide_after_s=0.5 + 0.1 * i) for i in range(6)]
    for order in orders:
        await until(lambda o=order: o.status == "waiting-for-manual-authorization", what="held")  # type: ignore[misc]
        await post_intent(port, order)
    event = sim.signal("put")
    event.clear()
    await asyncio.wait_for(event.wait(), timeout=60)
    assert await omsd.terminate() == 0
    await omsd.start()

    async def all_approved() -> bool:
        phases = await final_phases(db)
        return all(phases.get(o.order_id) == Phase.APPROVED.value for o in orders)

    await until(all_approved, timeout=90, what="all approved after restart")
    assert await omsd.terminate() == 0
    assert [o.approvals_applied for o in orders] == [1] * len(orders)
    assert sum(o.puts_while_held for o in orders) == 0
    log: Any = (tmp_path / "omsd.log").read_text()
    assert sim.app_token not in log and API_TOKEN not in log and HOOK_SECRET not in log
    assert sim.hook_pushes  # the hook was configured and used
