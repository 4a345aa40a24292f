"""Approval intents: `omsd approve` and `POST /v1/approvals` take and refuse the same ids, and
an intent that contradicts what omsd knows of an order never touches that order."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from omsd.daemon.pipeline.processor import Processor
from omsd.state.events import IntentRecorded
from omsd.state.models import Order, Policy
from omsd.state.store import NewEntry, Store
from tests.api_helpers import AUTH, Api
from tests.helpers import run_cli
from tests.store_helpers import NOW, entry

BAD_IDS = {
    "newline": "x\ny",
    "not ASCII": "é",
    "a leading dash": "-x",
    "space and !": "bad id!",
    "200 characters": "1" * 200,
    "empty": "",
}


@pytest.fixture
async def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Store]:
    """conftest's store, also named by OMSD_DB for the CLI (conftest's `api` serves this one)."""
    monkeypatch.setenv("OMSD_DB", str(tmp_path / "intents.db"))
    async with await Store.open(tmp_path / "intents.db") as s:
        yield s


async def _post(api: Api, body: dict[str, Any]) -> tuple[int, Any]:
    resp = await api.client.post("/v1/approvals", json=body, headers=AUTH)
    return resp.status, await resp.json()


@pytest.mark.parametrize("bad", BAD_IDS.values(), ids=BAD_IDS.keys())
@pytest.mark.parametrize("field", ["marketplaceOrderId", "orderId"])
async def test_the_command_refuses_what_the_api_refuses(
    api: Api, store: Store, capsys: pytest.CaptureFixture[str], bad: str, field: str
) -> None:
    """`omsd approve` with an id the API answers 400: exit 2, the API's reason, nothing journaled."""
    body = {"marketplaceOrderId": "M-1", "orderId": "V-1-01", field: bad}
    status, answer = await _post(api, body)
    assert status == 400
    before = await store.journal.last_offset()  # the API kept the bad body as `rejected`
    args = ["approve", f"--order-id={body['orderId']}", "--", body["marketplaceOrderId"]]
    assert await run_cli(*args) == 2
    assert capsys.readouterr().err == f"omsd: {answer['error']}\n"
    assert await store.journal.last_offset() == before


async def test_the_command_takes_what_the_api_takes(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    """Good ids are journaled; with no daemon on the database the message says who will act."""
    assert await run_cli("approve", "M.1_a-2", "--order-id", "MKP-M.1_a-2-01") == 0
    out = capsys.readouterr().out
    assert "no daemon runs on this database" in out
    [row] = await store.journal.tail(1)
    assert row.kind == "intent_recorded" and row.order_id == "MKP-M.1_a-2-01"


async def _linked_order(store: Store) -> Order:
    """MKP-1002-01, known under marketplace id 1002 (an intent with both ids, applied)."""
    await store.journal.append([entry_for("1002", "MKP-1002-01")], now=NOW)
    await Processor(store, Policy()).drain()
    order = await store.read.load_order("MKP-1002-01")
    assert order is not None and order.marketplace_order_id == "1002"
    return order


def entry_for(mkt: str, order_id: str) -> NewEntry:
    return entry(IntentRecorded(order_id=order_id, marketplace_order_id=mkt, source="api"))


async def test_the_api_refuses_ids_that_contradict_a_known_order(api: Api, store: Store) -> None:
    """{"marketplaceOrderId": "1001", "orderId": "MKP-1002-01"} for an order known under 1002: 409
    naming both, kept as rejected, and the order's record is exactly as it was."""
    order = await _linked_order(store)
    history = await store.read.history(order.order_id)
    status, answer = await _post(api, {"marketplaceOrderId": "1001", "orderId": "MKP-1002-01"})
    assert status == 409
    assert answer["error"] == "orderId MKP-1002-01 belongs to marketplaceOrderId 1002, not 1001"
    [kept] = await store.journal.tail(1, kind="rejected")
    assert kept.reason == answer["error"]
    assert await store.read.load_order(order.order_id) == order
    assert await store.read.history(order.order_id) == history


async def test_the_command_refuses_them_too(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    """`omsd approve 1001 --order-id MKP-1002-01`: exit 1, the same reason, nothing journaled."""
    await _linked_order(store)
    offset = await store.journal.last_offset()
    assert await run_cli("approve", "1001", "--order-id", "MKP-1002-01") == 1
    assert "belongs to marketplaceOrderId 1002, not 1001" in capsys.readouterr().err
    assert await store.journal.last_offset() == offset


async def test_a_contradiction_known_only_once_journaled_leaves_the_order_alone(store: Store) -> None:
    """An intent journaled before its order was linked elsewhere (a race, an old journal): the
    processor refuses it and writes nothing to the order it names."""
    order = await _linked_order(store)
    history = await store.read.history(order.order_id)
    await store.journal.append([entry_for("1001", "MKP-1002-01")], now=NOW)
    await Processor(store, Policy()).drain()
    assert await store.read.load_order(order.order_id) == order
    assert await store.read.history(order.order_id) == history
