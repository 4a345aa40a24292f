"""`omsd replay`: rebuilding from the journal carries on every piece of open work."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path

import pytest

from omsd.daemon.cli import main
from omsd.daemon.processor import Processor
from omsd.state.events import IntentReceived
from omsd.state.models import Policy
from omsd.state.statuses import Phase
from omsd.state.store import NewEntry, Store
from tests.machine_helpers import FREE, HELD, MKT, OID
from tests.test_store import NOW, answer_fetch, entry, status_entry


async def _linking_order(db: Path) -> None:
    """An order whose link lookup (Get order) is pending, with an intent parked on its marketplace id."""
    async with await Store.open(db) as store:
        await store.append(
            [entry(IntentReceived(marketplace_order_id=MKT, source="api")), status_entry(HELD, 1)], now=NOW
        )
        await Processor(store, Policy()).drain()
        assert [p[0] for p in await store.pending_intents()] == [MKT]
        assert await store.outbox_counts() == {"pending": 1}


def _pending_effects(db: Path) -> list[tuple[str, int, str]]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return list(conn.execute("SELECT order_id, seq, kind FROM outbox WHERE state = 'pending' ORDER BY id"))


async def test_replay_keeps_a_pending_link_lookup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Get order pending at replay time is issued again, so the parked intent is still released."""
    db = tmp_path / "o.db"
    monkeypatch.setenv("OMSD_DB", str(db))
    await _linking_order(db)
    assert await asyncio.to_thread(main, ["replay"]) == 0
    assert _pending_effects(db) == [(OID, 1, "fetch_order")]
    async with await Store.open(db) as store:
        await answer_fetch(store, FREE, t=2)
        await Processor(store, Policy()).drain()
        order = await store.load_order(OID)
        assert order is not None and order.has_intent and order.phase == Phase.CHECKING
        assert await store.pending_intents() == []
