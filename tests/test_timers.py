"""Timers fire when due (the alarm), not at the next tick of the `timers` job."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

from omsd.daemon.pipeline.timers import Alarm
from omsd.sim.server import Simulator
from omsd.state.statuses import Phase
from tests.helpers import approve, reached, until


async def test_alarm_fires_at_the_earliest_time_set() -> None:
    """A later time set afterwards does not postpone an earlier one."""
    alarm, stop, fired = Alarm(), asyncio.Event(), asyncio.Event()

    async def fire() -> None:
        fired.set()

    task = asyncio.create_task(alarm.run(fire, stop))
    now = datetime.now(UTC)
    alarm.set_at(now + timedelta(milliseconds=20))
    alarm.set_at(now + timedelta(hours=1))
    try:
        await asyncio.wait_for(fired.wait(), timeout=10)
    finally:
        stop.set()
        await task


async def test_alarm_set_while_idle_wakes_it() -> None:
    """An alarm with nothing to do sleeps long, and setting it wakes it at once."""
    alarm, stop, fired = Alarm(), asyncio.Event(), asyncio.Event()

    async def fire() -> None:
        fired.set()

    task = asyncio.create_task(alarm.run(fire, stop))
    await asyncio.sleep(0)  # the loop is now waiting with nothing set
    alarm.set_at(datetime.now(UTC))
    try:
        await asyncio.wait_for(fired.wait(), timeout=10)
    finally:
        stop.set()
        await task


async def test_a_retry_timer_fires_when_due(sim: Simulator, run_daemon: Any) -> None:
    """A short re-check timer fires when due (the alarm is the only timer mechanism)."""
    async with run_daemon(sim, eoi008_recheck_s=0.05) as daemon:
        order_id = "MKP-T1-01"  # the id the simulator will give marketplace order T1
        await approve(daemon, "T1", order_id)  # VTEX does not know it yet: Get order 404, re-check timer
        await until(reached(daemon, order_id, Phase.RETRY_WAIT), what="waiting to re-check")
        order = sim.create("T1")
        assert order.order_id == order_id
        await until(reached(daemon, order_id, Phase.APPROVED), timeout=20, what="approved after the re-check")
