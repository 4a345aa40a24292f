"""omsd as a service: the order hook, both sources, self-management, health, metrics."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from omsd.daemon.app import Daemon
from omsd.sim.server import Simulator
from omsd.state.statuses import Phase
from tests.helpers import HOOK_SECRET, approve, hooked, reached, until

pytestmark = pytest.mark.e2e


async def post_hook(daemon: Daemon, body: Any, secret: str | None = HOOK_SECRET, raw: str | None = None) -> Any:
    headers = {"X-Omsd-Hook-Secret": secret} if secret is not None else {}
    async with aiohttp.ClientSession() as s:
        kwargs: dict[str, Any] = {"data": raw} if raw is not None else {"json": body}
        async with s.post(f"{daemon.url}/vtex/hook", headers=headers, **kwargs) as resp:
            return resp.status, await resp.json()


def push(order_id: str = "MKP-9-01", account: str = "simstore", **kw: Any) -> dict[str, Any]:
    body = {
        "Domain": "Fulfillment",
        "OrderId": order_id,
        "State": "waiting-for-manual-authorization",
        "LastState": "order-accepted",
        "LastChange": "2026-01-01T00:00:00.0000000Z",
        "CurrentChange": "2026-01-01T00:00:01.0000000Z",
        "Origin": {"Account": account, "Key": "vtexappkey-simstore-SIM"},
    }
    body.update(kw)
    return body


async def test_hook_source_configures_the_hook_and_approves(sim: Simulator, run_daemon: Any) -> None:
    """With OMSD_SOURCE=hook omsd creates the hook (answering VTEX's ping) and approves
    from pushes alone; the feed is not read."""
    async with run_daemon(sim, **hooked()) as daemon:
        assert sim.hook_config is not None
        assert sim.hook_config["hook"]["url"] == f"{daemon.url}/vtex/hook"
        assert sim.hook_config["hook"]["headers"] == {"X-Omsd-Hook-Secret": HOOK_SECRET}
        assert sim.hook_pings == [200]
        order = sim.create("HK1", held=True, decision="authorize", decide_after_s=0.3)
        await until(lambda: order.status == "waiting-for-manual-authorization")
        await approve(daemon, "HK1", order.order_id)
        await until(reached(daemon, order.order_id, Phase.APPROVED), what="approved from pushes")
    assert sim.calls.get("feed_get", 0) == 0
    assert (order.puts, order.approvals_applied, order.puts_while_held) == (1, 1, 0)


async def test_hook_pushes_without_current_change_are_used(sim: Simulator, run_daemon: Any) -> None:
    """Pushes shaped like VTEX's guide example (no LastState, no CurrentChange) work."""
    sim.faults.hook_without_current_change = True
    async with run_daemon(sim, **hooked()) as daemon:
        order = sim.create("HK2", held=True, decision="authorize", decide_after_s=0.3)
        await until(lambda: order.status == "waiting-for-manual-authorization")
        await approve(daemon, "HK2", order.order_id)
        await until(reached(daemon, order.order_id, Phase.APPROVED), what="approved")
    assert order.approvals_applied == 1


async def test_feed_and_hook_for_the_same_change_are_one_event(sim: Simulator, run_daemon: Any) -> None:
    """In `both`, a change arriving by feed and by hook is journaled once."""
    async with run_daemon(sim, **hooked(source="both")) as daemon:
        assert daemon.store is not None
        order = sim.create("B1", held=True, decision="authorize", decide_after_s=0.3)
        await approve(daemon, order.marketplace_order_id, order.order_id)
        await until(reached(daemon, order.order_id, Phase.APPROVED), what="approved")

        def changes() -> int:
            return len({s for s, _ in order.history})

        def duplicates() -> float:
            return float(sum(daemon.metrics.sample("omsd_duplicates_total", source=s) for s in ("feed", "hook")))

        # Every change has arrived twice (once by each source) and the feed is drained;
        # without dedup the duplicates counter would never reach the number of changes.
        await until(lambda: not sim.queue.messages and duplicates() >= changes(), what="each change seen twice")
        rows = await daemon.store.journal.tail(1000, order_id=order.order_id, kind="status_changed")
        assert len(rows) == changes()  # one row per change although each came twice
        assert {r.source for r in rows} <= {"feed", "hook"}


async def test_feed_is_the_safety_net_for_pushes_vtex_gave_up_on(sim: Simulator, run_daemon: Any) -> None:
    """Pushes that never arrive are made up for by the feed."""
    sim.faults.hook_give_up_rate = 1.0
    async with run_daemon(sim, **hooked(source="both")) as daemon:
        order = sim.create("B2", held=True, decision="authorize", decide_after_s=0.3)
        await approve(daemon, "B2", order.order_id)
        await until(reached(daemon, order.order_id, Phase.APPROVED), what="approved via the feed")
    assert sim.hook_pushes_lost > 0 and not sim.hook_pushes


async def test_hook_ping_authentication_and_bad_bodies(sim: Simulator, run_daemon: Any) -> None:
    """Ping: 200, nothing journaled. Wrong or missing secret: 401, nothing kept. Wrong
    account: 403, kept. Bad bodies: 400, kept, never reach the machine. Huge: 413."""
    async with run_daemon(sim, **hooked()) as daemon:
        assert daemon.store is not None
        start = await daemon.store.journal.last_offset()
        assert (await post_hook(daemon, {"hookConfig": "ping"}, secret=None))[0] == 200
        assert await daemon.store.journal.last_offset() == start
        assert (await post_hook(daemon, push(), secret="wrong"))[0] == 401
        assert (await post_hook(daemon, push(), secret=None))[0] == 401
        assert await daemon.store.journal.last_offset() == start
        assert (await post_hook(daemon, push(account="someone-else")))[0] == 403
        bad = [
            push(State="teleported"),
            push(OrderId=42),
            push(CurrentChange="soon", LastChange="later"),
            {k: v for k, v in push().items() if k != "Origin"},
            ["not", "an", "object"],
        ]
        for body in bad:
            status, answer = await post_hook(daemon, body)
            assert status == 400 and answer["error"]
        assert (await post_hook(daemon, None, raw="{not json"))[0] == 400
        assert (await post_hook(daemon, None, raw="x" * 100_000))[0] == 413
        rejected = await daemon.store.journal.tail(100, kind="rejected")
        assert len(rejected) == 1 + len(bad) + 2
        assert all(r.source == "hook" for r in rejected)
        assert await daemon.store.read.list_orders() == []
        status, answer = await post_hook(daemon, push())
        assert status == 200 and answer == {"received": True, "duplicate": False}
        assert (await post_hook(daemon, {k.lower(): v for k, v in push().items()}))[1]["duplicate"] is True


async def test_self_check_recreates_deleted_configs(sim: Simulator, run_daemon: Any) -> None:
    """VTEX deletes the feed and hook configurations after inactivity: the self-check
    notices and recreates both."""
    async with run_daemon(sim, **hooked(source="both")) as daemon:
        assert daemon.setup is not None
        sim.feed_config = None
        sim.hook_config = None
        await daemon.setup.check()
        assert sim.feed_config is not None and sim.hook_config is not None


async def test_readiness_and_the_queue_age_alarm(sim: Simulator, run_daemon: Any) -> None:
    """/readyz is 200 when all is well, 503 naming the alarm when the feed's oldest
    message nears the retention limit, and 200 again once it clears."""
    async with run_daemon(sim, queue_age_alarm_s=0.3) as daemon, aiohttp.ClientSession() as s:
        assert daemon.setup is not None

        async def ready() -> bool:
            async with s.get(f"{daemon.url}/readyz") as resp:
                return resp.status == 200

        await until(ready, what="ready once the first feed poll succeeded")
        sim.faults.refuse_commits = 10_000
        sim.visibility_override_s = 60
        sim.queue.visibility_timeout_s = 60
        sim.create("AGE1", held=True, decision=None)
        await until(lambda: len(sim.queue.messages) > 0 and sim.queue.oldest_age_s() > 0.4, what="old message")
        await daemon.setup.check()
        async with s.get(f"{daemon.url}/readyz") as resp:
            body = await resp.json()
            assert resp.status == 503
            assert any("feed_queue_age" in p for p in body["problems"])
        async with s.get(f"{daemon.url}/metrics") as resp:
            text = await resp.text()
        assert 'omsd_alarm{name="feed_queue_age"} 1.0' in text
        assert "omsd_feed_queue_messages" in text
        sim.faults.refuse_commits = 0
        sim.queue.messages.clear()
        await daemon.setup.check()
        async with s.get(f"{daemon.url}/readyz") as resp:
            assert resp.status == 200


async def test_metrics_count_what_happened(sim: Simulator, run_daemon: Any) -> None:
    """/metrics exposes events by source, commits, offsets, phases, approvals, VTEX calls."""
    async with run_daemon(sim) as daemon, aiohttp.ClientSession() as s:
        order = sim.create("MET1", held=True, decision="authorize", decide_after_s=0.2)
        await until(lambda: order.status == "waiting-for-manual-authorization")
        await approve(daemon, "MET1", order.order_id)
        await until(reached(daemon, order.order_id, Phase.APPROVED))
        # handles are committed once per polling round, not per GET: wait for the round's end
        await until(lambda: daemon.metrics.sample("omsd_feed_commits_total") >= 4, what="4 commits")
        async with s.get(f"{daemon.url}/metrics") as resp:
            assert resp.status == 200
            text = await resp.text()
    lines = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line[:1] != "#"}
    assert lines['omsd_events_in_total{source="feed"}'] >= 4
    assert lines["omsd_feed_commits_total"] >= 4
    assert lines['omsd_orders{phase="approved"}'] == 1
    assert lines["omsd_approvals_sent_total"] == 1
    assert lines["omsd_approvals_confirmed_total"] == 1
    assert 0 < lines["omsd_processor_offset"] <= lines["omsd_journal_offset"]
    assert lines['omsd_vtex_requests_total{route="PUT /api/order-integration/orders/status",status="200"}'] == 1
    assert lines["omsd_ready"] == 1


async def test_readyz_is_503_until_vtex_config_is_confirmed(sim: Simulator, run_daemon: Any) -> None:
    """A health object that never confirmed its sources is not ready."""
    async with run_daemon(sim) as daemon:
        daemon.health.feed_config_ok = False
        problems = daemon.health.problems(db_writable=True)
        assert "feed configuration not confirmed at VTEX" in problems
        assert daemon.health.problems(db_writable=False)[0] == "database not writable"


async def test_healthcheck_command(sim: Simulator, run_daemon: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """`omsd healthcheck` (the container's HEALTHCHECK) is 0 against a live daemon, 1 otherwise."""
    import asyncio

    from omsd.daemon.cli import main
    from tests.helpers import free_port

    async with run_daemon(sim) as daemon:
        monkeypatch.setenv("OMSD_LISTEN", daemon.settings.listen)
        assert await asyncio.to_thread(main, ["healthcheck"]) == 0
    monkeypatch.setenv("OMSD_LISTEN", f"0.0.0.0:{free_port()}")
    assert await asyncio.to_thread(main, ["healthcheck"]) == 1


async def test_routes_follow_the_connector_endpoints_path(sim: Simulator, run_daemon: Any) -> None:
    """With OMSD_CONNECTOR_ENDPOINT=http://host:port/api/vtex, VTEX posts results to
    /api/vtex/order-integration/... and pushes to /api/vtex/vtex/hook: both are served."""
    from tests.helpers import free_port

    port = free_port()
    async with run_daemon(
        sim, connector_endpoint=f"http://127.0.0.1:{port}/api/vtex", listen=f"127.0.0.1:{port}", **hooked()
    ) as daemon:
        assert sim.hook_config is not None
        assert sim.hook_config["hook"]["url"] == f"http://127.0.0.1:{port}/api/vtex/vtex/hook"
        order = sim.create("P1", held=True, decision="authorize", decide_after_s=0.2)
        await until(lambda: order.status == "waiting-for-manual-authorization")
        await approve(daemon, "P1", order.order_id)
        await until(reached(daemon, order.order_id, Phase.APPROVED))
    assert any(n["code"] == "SOI002" for n in sim.notifications_sent)
    assert order.approvals_applied == 1


async def test_a_dropped_hook_is_recreated_from_the_feeds_evidence(sim: Simulator, run_daemon: Any) -> None:
    """With hook and feed, VTEX drops the hook configuration: the feed delivers changes the hook
    never pushed, and omsd recreates the hook configuration without waiting for the self-check."""
    async with run_daemon(sim, **hooked(source="both", self_check_s=3600)) as daemon:
        assert daemon.setup is not None and sim.hook_config is not None
        sim.hook_config = None
        order = sim.create("DROP1", held=True, decision=None)
        await until(lambda: sim.hook_config is not None, what="the hook configuration recreated")
        assert order.status == "waiting-for-manual-authorization"
