"""Nothing fails unseen: a fatal error stops omsd with one log line, and scheduled
jobs that fail or stop running show in readiness, metrics and the watchdog."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from omsd.daemon.app import Daemon, DaemonFailed
from omsd.daemon.ops.health import Health
from omsd.daemon.ops.jobs import Jobs
from omsd.daemon.ops.notify import Progress
from omsd.daemon.vtex.errors import AuthFailed
from omsd.sim.server import Simulator
from tests.helpers import FakeClock, approve, fast_settings, free_port, omsd_env, quiet_health, until

HOOK_SECRET = "hook-secret-0123456789"


@pytest.mark.e2e
async def test_hook_daemon_stops_when_vtex_refuses_a_get_order(sim: Simulator, tmp_path: Path) -> None:
    """With the hook as the only source, credentials VTEX starts refusing make the
    effect runner's Get order fail and omsd stop with one `omsd_fatal` line, not run on."""
    settings = fast_settings(sim, tmp_path / "omsd.db", free_port(), source="hook", hook_secret=HOOK_SECRET)
    daemon = Daemon(settings)
    stop = asyncio.Event()
    with capture_logs() as logged:
        task = asyncio.create_task(daemon.run(stop))
        try:
            await until(lambda: daemon.ready.is_set() or task.done(), what="ready")
            assert daemon.ready.is_set()
            sim.app_token = "rotated-at-vtex"
            order = sim.create("AF1", held=False)
            await approve(daemon, order.marketplace_order_id, order.order_id)  # omsd checks it with Get order
            with pytest.raises(DaemonFailed) as failed:
                await asyncio.wait_for(asyncio.shield(task), timeout=30)
        finally:
            stop.set()
            await asyncio.wait([task], timeout=30)
    assert isinstance(failed.value.error, AuthFailed)
    [fatal] = [e for e in logged if e["event"] == "omsd_fatal"]
    assert fatal["error_type"] == "AuthFailed" and "401" in fatal["error"]
    assert settings.app_token.get_secret_value() not in json.dumps(logged, default=str)


@pytest.mark.slow
async def test_omsd_run_exits_1_with_one_fatal_line(sim: Simulator, tmp_path: Path) -> None:
    """`omsd run` ends a fatal error (here refused credentials) with exit code 1 and
    exactly one `omsd_fatal` log line: no traceback, no secret."""
    port = free_port()
    env = omsd_env(sim, tmp_path / "omsd.db", port)
    env["OMSD_APP_TOKEN"] = "a-token-vtex-refuses-123"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "omsd.daemon",
        "run",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 1
    lines = [json.loads(line) for line in out.decode().splitlines()]
    [fatal] = [line for line in lines if line["event"] == "omsd_fatal"]
    assert (fatal["level"], fatal["error_type"]) == ("critical", "AuthFailed")
    assert "Traceback" not in out.decode() + err.decode()
    assert env["OMSD_APP_TOKEN"] not in out.decode() + err.decode()


@pytest.mark.e2e
async def test_a_failing_job_makes_the_daemon_unready_until_it_recovers(
    sim: Simulator, run_daemon: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scheduled job (the parked intents' one) failing run after run raises its alarm and
    fails /readyz; it clears when the job works again."""
    async with run_daemon(sim, link_interval_s=0.05) as daemon:

        async def readyz() -> int:
            async with aiohttp.ClientSession() as s, s.get(f"{daemon.url}/readyz") as resp:
                return resp.status

        await until(lambda: _is(readyz(), 200), what="ready")
        assert daemon.store is not None
        working = daemon.store.read.parked_before

        async def broken(cutoff: Any) -> list[tuple[str, int]]:
            raise RuntimeError("the pending_intents table is gone")

        monkeypatch.setattr(daemon.store.read, "parked_before", broken)
        await until(lambda: "scheduled_job_parked_intents" in daemon.health.alarms, what="alarm raised")
        assert await readyz() == 503
        assert daemon.metrics.sample("omsd_scheduled_job_failures_total", job="parked_intents") >= 3
        monkeypatch.setattr(daemon.store.read, "parked_before", working)
        await until(lambda: "scheduled_job_parked_intents" not in daemon.health.alarms, what="alarm cleared")
        await until(lambda: _is(readyz(), 200), what="ready again")


async def test_a_timer_firing_that_fails_stops_the_daemon(
    sim: Simulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The timer alarm is a supervised loop: an unexpected error in it is fatal (logged once,
    DaemonFailed), never swallowed; the timer stays in the database for the next start."""

    daemon = Daemon(fast_settings(sim, tmp_path / "omsd.db", free_port()))
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    await until(daemon.ready.is_set, what="ready")
    assert daemon.store is not None

    async def broken(now: Any) -> int:
        raise RuntimeError("the timers table is gone")

    monkeypatch.setattr(daemon.store.outbox, "fire_due_timers", broken)
    order = sim.create("T1", held=True, decision=None)
    status, _ = await approve(daemon, order.marketplace_order_id, order.order_id)  # held: a re-check timer
    assert status == 202
    with pytest.raises(DaemonFailed, match="timers table"):
        await asyncio.wait_for(task, timeout=60)


async def _is(status: Any, expected: int) -> bool:
    return bool(await status == expected)


def alarm_gauge(health: Health) -> float | None:
    return health.metrics.registry.get_sample_value("omsd_alarm", {"name": "scheduled_job_flaky"})


async def test_a_job_that_keeps_failing_raises_an_alarm_until_it_succeeds() -> None:
    """N failed runs in a row: counted, alarm raised, not ready; one success clears it."""
    health = quiet_health()
    jobs = Jobs(health, health.metrics, Progress(), failures_before_alarm=3)
    state = {"failing": True, "runs": 0}

    async def flaky() -> None:
        state["runs"] += 1
        if state["failing"]:
            raise RuntimeError("boom")

    jobs.add("flaky", flaky, every_s=0.02)
    assert health.problems(db_writable=True) == []
    jobs.start()
    try:
        await until(lambda: "scheduled_job_flaky" in health.alarms, what="alarm raised")
        assert jobs.failures["flaky"] >= 3
        assert health.metrics.sample("omsd_scheduled_job_failures_total", job="flaky") >= 3
        assert alarm_gauge(health) == 1
        [problem] = health.problems(db_writable=True)
        assert problem.startswith("alarm scheduled_job_flaky:") and "RuntimeError: boom" in problem
        assert health.metrics.sample("omsd_ready") == 0
        state["failing"] = False
        await until(lambda: "scheduled_job_flaky" not in health.alarms, what="alarm cleared")
        assert health.problems(db_writable=True) == []
        assert alarm_gauge(health) == 0
    finally:
        jobs.shutdown()


async def test_a_job_that_stops_running_is_stale_for_the_watchdog() -> None:
    """A job whose run hangs stops beating; once two intervals plus the window have
    passed the watchdog sees it stale, and fresh again when it completes."""
    health = quiet_health()
    clock = FakeClock()
    progress = Progress(clock)
    jobs = Jobs(health, health.metrics, progress)
    runs: list[asyncio.Event] = []
    release = asyncio.Event()

    async def job() -> None:
        started = asyncio.Event()
        runs.append(started)
        started.set()
        if len(runs) >= 2:
            await release.wait()  # the second run hangs

    jobs.add("stuck", job, every_s=0.02)
    jobs.start()
    try:
        await until(lambda: len(runs) >= 2, what="the hanging run started")
        assert progress.stale(within_s=1.0) == []
        clock.now += 1.0 + 2 * 0.02 + 0.01
        assert progress.stale(within_s=1.0) == ["job:stuck"]
        release.set()
        await until(lambda: progress.stale(within_s=1.0) == [], what="fresh after the run completed")
    finally:
        jobs.shutdown()
