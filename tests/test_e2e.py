"""omsd against the VTEX simulator over real sockets, in one process."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from omsd.daemon.intake.reads import FeedReads
from omsd.sim.clock import vtex_time
from omsd.sim.server import Simulator
from omsd.state.statuses import Phase
from omsd.state.store import Store
from tests.helpers import API_TOKEN, approve, reached, until

pytestmark = pytest.mark.e2e


async def test_feed_config_is_created_when_missing(sim: Simulator, run_daemon: Any) -> None:
    """At start-up omsd finds no feed configuration (404) and creates it from Settings."""
    assert sim.feed_config is None
    async with run_daemon(sim):
        assert sim.feed_config is not None
        assert sim.feed_config["filter"]["type"] == "FromWorkflow"
        assert "waiting-for-manual-authorization" in sim.feed_config["filter"]["status"]
        assert sim.feed_config["queue"]["visibilityTimeoutInSeconds"] == 240
    assert not sim.protocol_errors


async def test_held_then_authorized_is_approved_exactly_once(sim: Simulator, run_daemon: Any) -> None:
    """held → authorized → one approval, sent after release, confirmed by SOI002."""
    async with run_daemon(sim) as daemon:
        order = sim.create("A1", held=True, decision=None)
        await until(lambda: order.status == "waiting-for-manual-authorization", what="sim holds the order")
        status, body = await approve(daemon, "A1", order.order_id)
        assert status == 202 and body["accepted"] is True
        await until(reached(daemon, order.order_id, Phase.WAITING_RELEASE), what="omsd waits")
        assert order.puts == 0
        sim.authorize(order.order_id)
        await until(reached(daemon, order.order_id, Phase.APPROVED), what="approved")
    assert (order.puts, order.approvals_applied, order.puts_while_held) == (1, 1, 0)
    assert not sim.protocol_errors


async def test_held_then_rejected_is_never_approved(sim: Simulator, run_daemon: Any) -> None:
    """held → rejected (canceled) → the intent closes as rejected and nothing is sent."""
    async with run_daemon(sim) as daemon:
        order = sim.create("R1", held=True, decision="reject", decide_after_s=0.3)
        await until(lambda: order.status == "waiting-for-manual-authorization", what="sim holds the order")
        await approve(daemon, "R1", order.order_id)
        await until(reached(daemon, order.order_id, Phase.REJECTED), what="rejected")
        await until(lambda: order.status == "canceled")
    assert order.puts == 0


async def test_intent_without_order_id_is_linked_through_get_order(sim: Simulator, run_daemon: Any) -> None:
    """Only the marketplace id is given: omsd links it via Get order and approves."""
    async with run_daemon(sim) as daemon:
        status, body = await approve(daemon, "L1")
        assert status == 202 and body["waitingForLink"] is True
        order = sim.create("L1", held=True, decision="authorize", decide_after_s=0.3)
        await until(reached(daemon, order.order_id, Phase.APPROVED), what="approved after link")
    assert (order.puts, order.approvals_applied, order.puts_while_held) == (1, 1, 0)


async def test_eoi011_when_the_order_flips_back_to_held(sim: Simulator, run_daemon: Any) -> None:
    """The approval finds the order put back on hold: EOI011 (by notification), omsd waits
    for the next release and approves once."""
    async with run_daemon(sim) as daemon:
        order = sim.create("F1", held=False, flip_back=1, decide_after_s=0.5)
        await until(lambda: order.status == "waiting-ffmt-authorization", what="order released")
        await approve(daemon, "F1", order.order_id)
        await until(reached(daemon, order.order_id, Phase.APPROVED), what="approved after flip")
        assert daemon.store is not None
        stored = await daemon.store.read.load_order(order.order_id)
    assert stored is not None and stored.eoi011 == 1
    assert (order.puts, order.approvals_applied, order.puts_while_held) == (2, 1, 0)


async def test_eoi011_in_the_synchronous_answer(sim: Simulator, run_daemon: Any) -> None:
    """EOI011 in the PUT's own answer is handled like the notification."""
    sim.faults.eoi011_sync = True
    async with run_daemon(sim) as daemon:
        order = sim.create("F2", held=False, flip_back=1, decide_after_s=0.5)
        await until(lambda: order.status == "waiting-ffmt-authorization", what="order released")
        await approve(daemon, "F2", order.order_id)
        await until(reached(daemon, order.order_id, Phase.APPROVED), what="approved after sync EOI011")
    assert (order.puts, order.approvals_applied, order.puts_while_held) == (2, 1, 0)


async def test_duplicates_redeliveries_and_out_of_order_events(sim: Simulator, run_daemon: Any) -> None:
    """Duplicated and redelivered feed items become one journal event each; a stale
    'held' event delivered after the release never moves the order back."""
    sim.faults.duplicate_rate = 1.0
    sim.visibility_override_s = 0.2
    async with run_daemon(sim) as daemon:
        assert daemon.store is not None and daemon.poller is not None
        order = sim.create("D1", held=True, decision="authorize", decide_after_s=0.3)
        await approve(daemon, "D1", order.order_id)
        await until(reached(daemon, order.order_id, Phase.APPROVED), what="approved")
        # A stale copy of the 'held' change, delivered late, with a fresh event id.
        held_at = next(t for s, t in order.history if s == "waiting-for-manual-authorization")
        sim.queue.put(
            {
                "eventId": "STALE1",
                "domain": "Fulfillment",
                "state": "waiting-for-manual-authorization",
                "lastState": "order-accepted",
                "orderId": order.order_id,
                "lastChange": held_at,
                "currentChange": held_at,
            }
        )
        await until(lambda: not sim.queue.messages, what="feed drained")
        stored = await daemon.store.read.load_order(order.order_id)
        assert stored is not None and stored.status != "waiting-for-manual-authorization"
        journal = await daemon.store.journal.tail(1000, order_id=order.order_id, kind="status_changed")
        changes = {(json.loads(r.payload)["state"], json.loads(r.payload)["current_change"]) for r in journal}
        assert len(journal) == len(changes)  # one row per distinct change
        assert daemon.metrics.sample("omsd_duplicates_total", source="feed") > 0
    assert (order.puts, order.approvals_applied) == (1, 1)


async def test_failed_commits_are_redelivered_and_absorbed(sim: Simulator, run_daemon: Any) -> None:
    """While VTEX refuses commits, items come back after the visibility timeout; once
    commits work again the queue empties and nothing was applied twice."""
    sim.visibility_override_s = 0.2
    async with run_daemon(sim, http_retries=0) as daemon:
        assert daemon.poller is not None
        sim.faults.refuse_commits = 6
        order = sim.create("C1", held=True, decision="authorize", decide_after_s=0.5)
        await approve(daemon, "C1", order.order_id)
        await until(reached(daemon, order.order_id, Phase.APPROVED), what="approved")
        await until(lambda: not sim.queue.messages, what="queue empty")
        assert daemon.metrics.sample("omsd_feed_commit_failures_total") > 0
    assert (order.puts, order.approvals_applied) == (1, 1)


async def test_malformed_feed_items_are_kept_committed_and_skipped(sim: Simulator, run_daemon: Any) -> None:
    """Missing fields, unknown status, bad timestamp, wrong types: each is journaled as
    rejected with its reason, its handle is committed, and the loop goes on."""
    bad: list[dict[str, Any]] = [
        {"eventId": "B1", "state": "handling", "currentChange": "2026-01-01T00:00:00Z"},
        {"eventId": "B2", "orderId": "X-1", "state": "no-such-status", "currentChange": "2026-01-01T00:00:00Z"},
        {"eventId": "B3", "orderId": "X-2", "state": "handling", "currentChange": "last tuesday"},
        {"eventId": "B4", "orderId": 12345, "state": "handling", "currentChange": "2026-01-01T00:00:00Z"},
    ]
    for item in bad:
        sim.queue.put(item)
    sim.queue.put({"unexpected": "shape"})  # no handle problem: the queue adds one
    sim.feed_config = {
        "filter": {"type": "FromWorkflow", "status": ["handling"]},
        "queue": {"visibilityTimeoutInSeconds": 240, "messageRetentionPeriodInSeconds": 345600},
    }
    async with run_daemon(sim) as daemon:
        assert daemon.store is not None
        await until(lambda: not sim.queue.messages, what="every item committed")
        rows = await daemon.store.journal.tail(100, kind="rejected")
        reasons = " | ".join(r.reason or "" for r in rows)
        assert len(rows) == 5
        for fragment in ("missing field orderId", "unknown status", "currentChange", "orderId must be a string"):
            assert fragment in reasons
        order = sim.create("M1", held=False)
        sim.feed_config["filter"]["status"].append("waiting-ffmt-authorization")
        await approve(daemon, "M1", order.order_id)
        await until(reached(daemon, order.order_id, Phase.APPROVED), what="good order still approved")


async def test_bad_requests_to_our_routes_are_refused_and_kept(sim: Simulator, run_daemon: Any) -> None:
    """Bad JSON, wrong types and a wrong account get 4xx with a reason and are journaled."""
    async with run_daemon(sim) as daemon, aiohttp.ClientSession() as s:
        assert daemon.store is not None
        notify = (
            daemon.settings.notify_endpoint.get_secret_value() + "/order-integration/notification/processing-result"
        )
        auth = {"Authorization": f"Bearer {API_TOKEN}"}
        cases = [
            (s.post(notify, data="not json"), 400),
            (s.post(notify, json={"code": "SOI002"}), 400),
            (s.post(notify, params={"an": "other"}, json={"marketplaceOrderId": "1", "code": "SOI002"}), 400),
            (s.post(f"{daemon.url}/v1/approvals", json={"marketplaceOrderId": 5}, headers=auth), 400),
            (s.post(f"{daemon.url}/v1/approvals", json={"orderId": "x"}, headers=auth), 400),
            (s.post(f"{daemon.url}/v1/approvals", data="[", headers=auth), 400),
        ]
        for request, expected in cases:
            async with request as resp:
                assert resp.status == expected
                assert "error" in await resp.json()
        rows = await daemon.store.journal.tail(100, kind="rejected")
        assert len(rows) == len(cases)
        async with s.post(notify, data="x" * 100_000) as resp:
            assert resp.status == 413
        async with s.get(f"{daemon.url}/healthz") as resp:
            assert resp.status == 200


async def test_api_requires_the_bearer_token(sim: Simulator, run_daemon: Any) -> None:
    """No token or a wrong token: 401; nothing is journaled."""
    async with run_daemon(sim) as daemon:
        assert daemon.store is not None
        before = await daemon.store.journal.last_offset()
        status, _ = await approve(daemon, "Z1", token="wrong")
        assert status == 401
        async with (
            aiohttp.ClientSession() as s,
            s.post(f"{daemon.url}/v1/approvals", json={"marketplaceOrderId": "Z1"}) as resp,
        ):
            assert resp.status == 401
        assert await daemon.store.journal.last_offset() == before


async def test_api_writes_refused_without_configured_token(sim: Simulator, run_daemon: Any) -> None:
    """Without OMSD_API_TOKEN, /v1 writes are refused (403)."""
    async with run_daemon(sim, api_token=None) as daemon:
        status, body = await approve(daemon, "Z2")
        assert status == 403 and "OMSD_API_TOKEN" in body["error"]


async def test_approvals_once_under_429_5xx_and_dropped_connections(sim: Simulator, run_daemon: Any) -> None:
    """With VTEX misbehaving on every route, each order is still approved exactly once
    and nothing is sent while held."""
    sim.faults.rate_429 = 0.1
    sim.faults.retry_after_s = 0.1
    sim.faults.rate_5xx = 0.1
    sim.faults.rate_drop = 0.05
    sim.faults.notification_duplicate_rate = 0.3
    async with run_daemon(sim) as daemon:
        orders = [sim.create(f"Q{i}", held=i % 2 == 0, decision="authorize", decide_after_s=0.2) for i in range(8)]
        for o in orders:
            assert (await approve(daemon, o.marketplace_order_id, o.order_id))[0] == 202
        for o in orders:
            await until(reached(daemon, o.order_id, Phase.APPROVED), timeout=60, what=o.order_id)
    assert sim.rate_limited > 0
    assert [o.approvals_applied for o in orders] == [1] * 8
    assert sum(o.puts_while_held for o in orders) == 0


async def test_cli_approve_is_picked_up_by_the_running_daemon(sim: Simulator, run_daemon: Any, tmp_path: Any) -> None:
    """`omsd approve` writes to the journal from another connection; the daemon acts on it."""
    from omsd.daemon.cli import main

    db = tmp_path / "shared.db"
    async with run_daemon(sim, db=db) as daemon:
        order = sim.create("CLI1", held=True, decision="authorize", decide_after_s=0.3)
        import os

        os.environ["OMSD_DB"] = str(db)
        try:
            import asyncio

            code = await asyncio.to_thread(main, ["approve", "CLI1", "--order-id", order.order_id])
        finally:
            del os.environ["OMSD_DB"]
        assert code == 0
        await until(reached(daemon, order.order_id, Phase.APPROVED), what="approved via CLI intent")
    assert order.approvals_applied == 1


def test_vtex_time_has_seven_fraction_digits() -> None:
    """The simulator writes timestamps the way VTEX's feed does."""
    from datetime import UTC, datetime

    text = vtex_time(datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC))
    assert text == "2026-01-02T03:04:05.1234560Z"


async def test_a_release_taken_by_a_process_that_died_reading_the_feed_is_checked_at_once(
    sim: Simulator, run_daemon: Any, tmp_path: Path
) -> None:
    """A process died between a feed GET and journaling its items, the release among them: VTEX
    hides them for the visibility timeout (240 s). The next start finds the feed's reads still
    marked and re-checks the orders waiting for their release: the approval goes out at once,
    not after the visibility timeout or the held re-check."""
    db = tmp_path / "omsd.db"
    async with run_daemon(sim, db=db, held_recheck_s=600) as daemon:
        order = sim.create("K1", held=True, decision=None)
        await until(lambda: order.status == "waiting-for-manual-authorization", what="sim holds the order")
        await approve(daemon, "K1", order.order_id)
        await until(reached(daemon, order.order_id, Phase.WAITING_RELEASE), what="omsd waits")
    # what a SIGKILL while reading leaves behind: the mark, and items taken but never journaled
    async with await Store.open(db) as store:
        await FeedReads(store).begin()
    sim.authorize(order.order_id)
    assert sim.queue.receive(10, short=False, duplicate_rate=0.0), "the release taken by the dead process"
    async with run_daemon(sim, db=db, held_recheck_s=600) as daemon:
        await until(reached(daemon, order.order_id, Phase.APPROVED), what="approved without the release's event")
    assert (order.approvals_applied, order.puts_while_held) == (1, 0)
