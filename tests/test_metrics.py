"""Prometheus metrics: names, what is observed where, and the gauges read at scrape."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from omsd.daemon.ops.metrics import Metrics
from omsd.sim.faults import Faults
from omsd.sim.server import Simulator
from omsd.state.statuses import Phase
from omsd.state.store import NewEntry, Store
from tests.helpers import RunDaemon, approve, reached, until


def exposition(metrics: Metrics) -> dict[str, str]:
    """Sample name -> the type of its family, from the text /metrics serves."""
    return {
        sample.name: family.type
        for family in text_string_to_metric_families(metrics.render().decode())
        for sample in family.samples
    }


def test_names_follow_prometheus_rules() -> None:
    """Counters end in _total, no _created series, durations in seconds, build info carries the version."""
    metrics = Metrics()
    metrics.on_vtex_call("GET", "/x", 200, 0.1)
    metrics.release_to_approval.observe(1)
    samples = exposition(metrics)
    assert not [name for name in samples if name.endswith("_created")]
    assert [name for name, kind in samples.items() if kind == "counter" and not name.endswith("_total")] == []
    for name in ("omsd_release_to_approval_seconds", "omsd_intent_to_approved_seconds"):
        assert f"{name}_bucket" in samples and f"{name}_count" in samples
    assert "omsd_vtex_request_duration_seconds_sum" in samples
    for gauge in ("omsd_parked_intents", "omsd_database_bytes", "omsd_journal_oldest_unapplied_age_seconds"):
        assert samples[gauge] == "gauge"
    [info] = [
        s
        for f in text_string_to_metric_families(metrics.render().decode())
        for s in f.samples
        if s.name == "omsd_build_info"
    ]
    assert info.value == 1 and info.labels["version"]


def test_release_to_approval_and_intent_to_approved_are_observed() -> None:
    """Leaving waiting_release starts the clock the approval PUT stops; reaching approved
    observes the time since the intent; later retries do not restart the clock."""
    now = [100.0]
    metrics = Metrics(monotonic=lambda: now[0])
    metrics.on_transition("A", Phase.WAITING_RELEASE, Phase.CHECKING, None, datetime.now(UTC))
    now[0] = 103.5
    metrics.on_approval_sent("A")
    metrics.on_approval_sent("A")  # a retry: counted as sent, not observed again
    assert metrics.sample("omsd_release_to_approval_seconds_count") == 1
    assert metrics.sample("omsd_release_to_approval_seconds_sum") == 3.5
    assert metrics.sample("omsd_approvals_sent_total") == 2
    at = datetime(2026, 1, 1, tzinfo=UTC)
    metrics.on_transition("A", Phase.AWAITING_RESULT, Phase.APPROVED, at, at + timedelta(seconds=90))
    assert metrics.sample("omsd_intent_to_approved_seconds_sum") == 90
    assert metrics.sample("omsd_approvals_confirmed_total") == 1
    metrics.on_transition("B", Phase.RETRY_WAIT, Phase.DEAD, None, at)
    assert metrics.sample("omsd_dead_letters_total") == 1


async def test_scrape_gauges_read_the_database(tmp_path: Path) -> None:
    """Database bytes, and the age of the oldest journal event the processor has not applied."""
    db = tmp_path / "o.db"
    now = datetime(2026, 1, 1, 12, tzinfo=UTC)
    async with await Store.open(db) as store:
        metrics = Metrics()
        await metrics.refresh(store, db, now)
        assert metrics.sample("omsd_journal_oldest_unapplied_age_seconds") == 0
        entry = NewEntry(kind="intent", source="api", payload="{}", received_at=now - timedelta(seconds=42))
        await store.journal.append([entry], now=now)
        await metrics.refresh(store, db, now)
    assert metrics.sample("omsd_journal_oldest_unapplied_age_seconds") == 42
    assert metrics.sample("omsd_database_bytes") > 4096


async def test_a_served_approval_fills_the_histograms(sim: Simulator, run_daemon: RunDaemon) -> None:
    """Through the daemon: a held order released and approved observes both latencies,
    VTEX calls are timed by route, and an intent for an unknown order shows as parked."""
    async with run_daemon(sim) as daemon, aiohttp.ClientSession() as s:
        order = sim.create("LAT1", held=True, decision="authorize", decide_after_s=0.3)
        await until(lambda: order.status == "waiting-for-manual-authorization")
        await approve(daemon, "LAT1", order.order_id)
        await until(reached(daemon, order.order_id, Phase.APPROVED))
        await approve(daemon, "NOT-YET-KNOWN")
        assert daemon.store is not None
        store = daemon.store

        async def parked() -> bool:
            return bool((await store.read.stats())["pending_intents"] == 1)

        await until(parked)
        async with s.get(f"{daemon.url}/metrics") as resp:
            text = await resp.text()
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    assert samples[("omsd_release_to_approval_seconds_count", ())] == 1
    assert samples[("omsd_intent_to_approved_seconds_count", ())] == 1
    put = (("route", "PUT /api/order-integration/orders/status"),)
    assert samples[("omsd_vtex_request_duration_seconds_count", put)] == 1
    assert samples[("omsd_parked_intents", ())] == 1
    assert samples[("omsd_database_bytes", ())] > 0


async def test_an_order_going_dead_logs_a_warning_with_vtexs_code(tmp_path: Path, run_daemon: RunDaemon) -> None:
    """Every approval PUT answered EOI000 (HTTP 500): the order goes dead, and the
    `order_dead` warning keeps EOI000, not only "HTTP 500", and so does the order's last code."""
    sim = Simulator(seed=5, faults=Faults(rate_eoi000=1.0))
    await sim.start()
    try:
        with capture_logs() as logged:
            async with run_daemon(sim, max_attempts=2) as daemon:
                order = sim.create("DEAD1")
                await until(lambda: order.status is not None)
                await approve(daemon, "DEAD1", order.order_id)
                await until(reached(daemon, order.order_id, Phase.DEAD))
                assert daemon.store is not None
                record = await daemon.store.read.load_order(order.order_id)
    finally:
        await sim.stop()
    assert record is not None and record.last_code == "EOI000"  # what `omsd dead` and the API show
    [dead] = [e for e in logged if e["event"] == "order_dead"]
    assert dead["log_level"] == "warning" and dead["order_id"] == order.order_id
    assert dead["error"].endswith("HTTP 500 EOI000"), dead
    assert dead["code"] == "EOI000"


def test_the_held_refusal_series_exists_before_the_first_one() -> None:
    """omsd_approvals_refused_total{code="EOI011"} is exported at 0 from the start, so the
    alert's increase() sees the very first refusal."""
    assert 'omsd_approvals_refused_total{code="EOI011"} 0.0' in Metrics().render().decode()


def test_refused_codes_are_labelled_by_vtex_shape_only() -> None:
    """A result code is a label only in VTEX's shape; anything else (a body's free text)
    counts as `other`, so no request can create unbounded series."""
    metrics = Metrics()
    metrics.on_approval_refused("EOI011")
    for junk in ("x" * 20, "EOI0111", "'; drop", "eoi011"):
        metrics.on_approval_refused(junk)
    assert metrics.sample("omsd_approvals_refused_total", code="EOI011") == 1
    assert metrics.sample("omsd_approvals_refused_total", code="other") == 4
