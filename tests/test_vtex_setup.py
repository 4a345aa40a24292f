"""VTEX's configurations read sparingly, a dropped hook noticed from the feed, and what the VTEX
client learned kept across a restart (daemon/vtex/configuration.py, daemon/vtex/memory.py)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from omsd.daemon.ops.health import Health
from omsd.daemon.ops.metrics import Metrics
from omsd.daemon.vtex.budget import Priority
from omsd.daemon.vtex.client import Learned, VtexClient
from omsd.daemon.vtex.configuration import HOOK_GRACE_S, VtexSetup
from omsd.daemon.vtex.memory import VtexMemory
from omsd.daemon.vtex.models import (
    ApprovalResponse,
    FeedConfig,
    HookConfig,
    OrderSnapshot,
    feed_config_body,
    hook_config_body,
)
from omsd.state.store import Store
from tests.helpers import HOOK_SECRET, FakeClock, until
from tests.helpers import settings as make_settings
from tests.http_mock import aioresponses

BASE = "https://shop.vtexcommercestable.com.br"
SETTINGS = make_settings(source="both", hook_secret=HOOK_SECRET)
NOW = datetime(2026, 1, 1, tzinfo=UTC)


class ConfigVtex:
    """VTEX's two configurations, counting the reads and the saves."""

    def __init__(self, feed: bool = True, hook: bool = True) -> None:
        self.feed = FeedConfig(raw=feed_config_body(SETTINGS)) if feed else None
        self.hook = HookConfig(raw=hook_config_body(SETTINGS)) if hook else None
        self.reads: list[str] = []
        self.saves: list[str] = []

    async def get_feed_config(self) -> FeedConfig | None:
        self.reads.append("feed")
        return self.feed

    async def save_feed_config(self, body: Any) -> None:
        self.saves.append("feed")
        self.feed = FeedConfig(raw=dict(body))

    async def get_hook_config(self) -> HookConfig | None:
        self.reads.append("hook")
        return self.hook

    async def save_hook_config(self, body: Any) -> None:
        self.saves.append("hook")
        self.hook = HookConfig(raw=dict(body))

    async def get_feed(self, maxlot: int) -> list[Any]:
        raise NotImplementedError

    async def commit_feed(self, handles: list[str]) -> None:
        raise NotImplementedError

    async def get_order(self, order_id: str, *, priority: Priority = Priority.BACKGROUND) -> OrderSnapshot:
        raise NotImplementedError

    async def approve(self, marketplace_order_id: str) -> ApprovalResponse:
        raise NotImplementedError

    def paused_s(self, call: str) -> float:
        return 0.0


def setup_for(vtex: ConfigVtex, **kw: Any) -> tuple[VtexSetup, Health]:
    metrics = Metrics()
    health = Health(SETTINGS, metrics)
    return VtexSetup(vtex, SETTINGS, health, metrics, **kw), health


async def test_a_restart_within_a_minute_of_a_confirmation_reads_nothing() -> None:
    """Start-up confirms both configurations without a read when the last run confirmed them less
    than a minute ago; older confirmations are read again."""
    now = datetime.now(UTC)
    vtex = ConfigVtex()
    setup, health = setup_for(vtex)
    setup.restore_checked({"feed": now - timedelta(seconds=50), "hook": now - timedelta(seconds=50)})
    assert await setup.confirm_until(asyncio.Event())
    assert vtex.reads == [] and health.feed_config_ok and health.hook_config_ok
    again, _ = setup_for(vtex)
    again.restore_checked({"feed": now - timedelta(seconds=70), "hook": now - timedelta(seconds=70)})
    assert await again.confirm_until(asyncio.Event())
    assert vtex.reads == ["feed", "hook"]


async def run_setup(setup: VtexSetup) -> tuple[asyncio.Event, asyncio.Task[None]]:
    stop = asyncio.Event()
    return stop, asyncio.create_task(setup.run(stop))


async def test_a_hook_silent_since_a_change_the_feed_delivered_is_recreated() -> None:
    """VTEX dropped the hook configuration: the feed delivers a change the hook never pushed, and
    the hook has pushed nothing since: the configuration is checked and recreated."""
    vtex = ConfigVtex(hook=False)
    setup, _ = setup_for(vtex)
    stop, task = await run_setup(setup)
    setup.hook_missed(datetime.now(UTC) - timedelta(seconds=HOOK_GRACE_S + 1))
    await until(lambda: vtex.saves == ["hook"], what="the hook recreated")
    stop.set()
    await task


async def test_a_change_younger_than_the_grace_is_judged_when_the_grace_is_over() -> None:
    """A change the hook may still push is given its grace, then judged."""
    vtex = ConfigVtex(hook=False)
    setup, _ = setup_for(vtex)
    stop, task = await run_setup(setup)
    setup.hook_missed(datetime.now(UTC) - timedelta(seconds=HOOK_GRACE_S - 0.2))
    await until(lambda: vtex.saves == ["hook"], what="the hook recreated after the grace")
    stop.set()
    await task


async def test_a_hook_that_pushed_since_the_change_is_not_read() -> None:
    """A push came after the change the hook missed: the hook works (one push lost or late)."""
    vtex = ConfigVtex()
    setup, health = setup_for(vtex)
    stop, task = await run_setup(setup)
    changed = datetime.now(UTC) - timedelta(seconds=HOOK_GRACE_S + 5)
    health.push_ok()
    setup.hook_missed(changed)
    await until(lambda: setup._missed_since is None, what="the change judged")
    stop.set()
    await task
    assert vtex.reads == []


async def test_missed_changes_check_the_hook_at_most_once_a_minute() -> None:
    """While VTEX still has the hook configuration, more missed changes read it no more than
    once a minute."""
    vtex = ConfigVtex()
    setup, _ = setup_for(vtex)
    stop, task = await run_setup(setup)
    setup.hook_missed(datetime.now(UTC) - timedelta(seconds=HOOK_GRACE_S + 1))
    await until(lambda: vtex.reads == ["hook"], what="one check")
    setup.hook_missed(datetime.now(UTC) - timedelta(seconds=HOOK_GRACE_S + 1))
    setup.hook_missed(datetime.now(UTC) - timedelta(seconds=HOOK_GRACE_S + 2))
    stop.set()
    await task
    assert vtex.reads == ["hook"]


# ---- what a restart keeps ----------------------------------------------------------------------


class Sleeps:
    """A fake clock and sleep; a wait longer than `block_over_s` never ends (the run is stopped in it)."""

    def __init__(self, block_over_s: float = 3600.0) -> None:
        self.now = 1000.0
        self.calls: list[float] = []
        self.block_over_s = block_over_s

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        if seconds > self.block_over_s:
            await asyncio.Event().wait()
        self.now += seconds

    def clock(self) -> float:
        return self.now


async def test_the_learned_rate_and_an_open_retry_after_survive_a_restart(tmp_path: Path) -> None:
    """A run cut its rate (three 429s in a row) and a Retry-After window is still open when it
    stops: the next run starts at the cut rate, waits the window out before its first call to
    that route, and does not read the configurations confirmed a moment ago."""
    settings = make_settings(rate_limit_per_s=50)
    async with await Store.open(tmp_path / "db") as store, aiohttp.ClientSession() as session:
        sleeps = Sleeps(block_over_s=10)
        with aioresponses() as m:
            for _ in range(3):
                m.get(f"{BASE}/api/oms/pvt/orders/X", status=429, headers={"Retry-After": "1"})
            m.get(f"{BASE}/api/oms/pvt/orders/X", status=429, headers={"Retry-After": "30"})
            m.get(f"{BASE}/api/oms/pvt/orders/X", payload={"orderId": "X"})
            first = VtexClient(settings, session, sleep=sleeps, clock=sleeps.clock)
            vtex = ConfigVtex()
            setup, _ = setup_for(vtex)
            memory = VtexMemory(store, first, setup)
            assert await setup.confirm_until(asyncio.Event())
            with pytest.raises(TimeoutError):  # the run ends inside the 30 s window
                await asyncio.wait_for(first.get_order("X"), timeout=0.5)
            await memory.save()
        learned = first.learned()
        assert learned.rate == pytest.approx(35.0) and "/api/oms/pvt/orders/{order_id}" in learned.pauses_s

        later = Sleeps()
        second = VtexClient(settings, session, sleep=later, clock=later.clock)
        again_vtex = ConfigVtex()
        again, _ = setup_for(again_vtex)
        await VtexMemory(store, second, again).restore()
        assert second.learned().rate == pytest.approx(35.0) and second.learned().limit_rate == pytest.approx(50.0)
        assert await again.confirm_until(asyncio.Event())
        assert again_vtex.reads == []
        with aioresponses() as m:
            m.get(f"{BASE}/api/oms/pvt/orders/Y", payload={"orderId": "Y"})
            await second.get_order("Y")
        assert later.calls and 25 < later.calls[0] <= 30  # the rest of the window, then the call


async def test_an_unreadable_memory_is_ignored(tmp_path: Path) -> None:
    """A record that does not read (hand-edited, truncated) costs only re-learning: the client
    starts at the configured rate and the configurations are read."""
    settings = make_settings(rate_limit_per_s=50)
    async with await Store.open(tmp_path / "db") as store, aiohttp.ClientSession() as session:
        await store.learned.put({"rate": '{"rate": "fast", "pauses": 3}', "configuration": "[not an object"}, now=NOW)
        client = VtexClient(settings, session)
        vtex = ConfigVtex()
        setup, _ = setup_for(vtex)
        await VtexMemory(store, client, setup).restore()
        assert client.learned().rate == 50.0
        assert await setup.confirm_until(asyncio.Event())
        assert vtex.reads == ["feed", "hook"]


async def test_the_evidence_of_use_survives_a_restart_aged_by_the_time_down(tmp_path: Path) -> None:
    """Since when the rate held, and when the answers that show it used came, are kept: a start
    two seconds later goes on from them, each two seconds older (the time down had no calls)."""
    settings = make_settings(rate_limit_per_s=50)
    async with await Store.open(tmp_path / "db") as store, aiohttp.ClientSession() as session:
        clock = FakeClock()
        first = VtexClient(settings, session, clock=clock)
        first.restore(Learned(10.0, 20.0))  # a rate cut in an earlier run, just now
        for _ in range(5):
            clock.now += 0.2
            first._rate.on_success(clock.now)
        quiet_for, ages = first.learned().evidence or (0.0, ())
        assert quiet_for == pytest.approx(1.0) and len(ages) == 5
        await VtexMemory(store, first, setup_for(ConfigVtex())[0], clock=lambda: NOW).save()

        later = FakeClock()
        second = VtexClient(settings, session, clock=later)
        down = NOW + timedelta(seconds=2)
        await VtexMemory(store, second, setup_for(ConfigVtex())[0], clock=lambda: down).restore()
        quiet_again, ages_again = second.learned().evidence or (0.0, ())
        assert quiet_again == pytest.approx(3.0, abs=0.01)
        assert sorted(ages_again) == pytest.approx(sorted(a + 2.0 for a in ages), abs=0.06)
