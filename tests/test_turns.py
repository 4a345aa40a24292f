"""Turns across a fleet's accounts: a busy account yields after every batch to any account waiting."""

from __future__ import annotations

import asyncio
import functools
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from omsd.daemon.intake import entries
from omsd.daemon.ops.turns import Turns
from omsd.daemon.pipeline.processor import Processor
from omsd.state.models import Policy
from omsd.state.store import NewEntry, Store
from tests.helpers import until


async def test_turns_go_first_come_first_served_and_a_holder_asks_again_behind() -> None:
    """While `busy` holds the turn, `quiet` asks: the turn passes to `quiet` before `busy` gets another."""
    turns = Turns(1)
    order: list[str] = []
    busy_in = asyncio.Event()
    release = asyncio.Event()

    async def busy() -> None:
        async with turns.turn("busy"):
            order.append("busy")
            busy_in.set()
            await release.wait()
        async with turns.turn("busy"):
            order.append("busy")

    async def quiet() -> None:
        async with turns.turn("quiet"):
            order.append("quiet")

    b = asyncio.create_task(busy())
    await busy_in.wait()
    q = asyncio.create_task(quiet())
    await until(lambda: turns.waiting == 1, what="quiet waits")
    release.set()
    await asyncio.gather(b, q)
    assert order == ["busy", "quiet", "busy"]
    assert list(turns.history) == order


async def test_a_cancelled_waiter_gives_up_its_place_and_a_granted_one_passes_the_turn_on() -> None:
    """Cancelling a waiter neither loses the turn nor blocks those behind it."""
    turns = Turns(1)
    held = asyncio.Event()
    release = asyncio.Event()

    async def holder() -> None:
        async with turns.turn("a"):
            held.set()
            await release.wait()

    async def waiter(name: str) -> str:
        async with turns.turn(name):
            return name

    h = asyncio.create_task(holder())
    await held.wait()
    cancelled = asyncio.create_task(waiter("b"))
    last = asyncio.create_task(waiter("c"))
    await until(lambda: turns.waiting == 2)
    cancelled.cancel()
    release.set()
    assert await last == "c"
    await h
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert await waiter("d") == "d"  # the turn is free again


def _status_rows(n: int, start: int = 0) -> list[NewEntry]:
    """`n` status changes of distinct orders, as the hook journals them."""
    at = datetime(2026, 11, 1, tzinfo=UTC)
    rows = []
    for i in range(start, start + n):
        push = {
            "Domain": "Fulfillment",
            "OrderId": f"BKL{i:06d}-01",
            "State": "ready-for-handling",
            "LastState": "waiting-for-authorization",
            "LastChange": (at + timedelta(seconds=i)).isoformat(),
            "CurrentChange": (at + timedelta(seconds=i, milliseconds=5)).isoformat(),
            "Origin": {"Account": "shop", "Key": "k"},
        }
        entry = entries.hook_item(push, at).entry
        assert entry is not None
        rows.append(entry)
    return rows


async def test_a_quiet_accounts_batch_is_applied_before_a_busy_accounts_next(tmp_path: Path) -> None:
    """Two processors sharing the turns, one with a backlog: once the quiet one has a row, it is
    applied before the busy one starts another batch, and the busy backlog is not drained yet."""
    turns = Turns(1)
    (tmp_path / "busy").mkdir()
    (tmp_path / "quiet").mkdir()
    async with (
        await Store.open(tmp_path / "busy" / "omsd.db") as busy,
        await Store.open(tmp_path / "quiet" / "omsd.db") as quiet,
    ):
        await busy.journal.append(_status_rows(3000), now=datetime.now(UTC))
        last = (await busy.read.stats())["last_offset"]
        p_busy = Processor(busy, Policy(), batch_size=100, max_batch_size=100)
        p_quiet = Processor(quiet, Policy(), batch_size=100, max_batch_size=100)
        p_busy.turn = functools.partial(turns.turn, "busy")
        p_quiet.turn = functools.partial(turns.turn, "quiet")
        stop = asyncio.Event()
        tasks = [asyncio.create_task(p.run(stop, poll_s=3600)) for p in (p_busy, p_quiet)]
        try:
            await until(lambda: p_busy.offset >= 200, what="busy under way")
            await quiet.journal.append(_status_rows(1, start=9000), now=datetime.now(UTC))
            granted = turns.granted
            p_quiet.wake.set()
            await until(lambda: p_quiet.offset >= 1, what="quiet applied")
            after = list(turns.history)[-(turns.granted - granted) :]
            assert after.index("quiet") <= 1  # at most the batch busy had begun before quiet asked
            assert p_busy.offset < last
        finally:
            stop.set()
            await asyncio.gather(*tasks)
