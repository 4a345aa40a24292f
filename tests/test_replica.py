"""OMSD_REPLICA: Litestream supervised by `omsd run`, restore on start, replicated
commits and the replica's health, against the simulator and a file:// replica."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest

from omsd.daemon.ops.replica import ALARM, ReplicaUnavailable, SyncBarrier
from omsd.daemon.pipeline.processor import Processor
from omsd.sim.server import Simulator
from omsd.state.models import Policy
from omsd.state.statuses import Phase
from omsd.state.store import Store
from tests.helpers import API_TOKEN, approve, reached, until
from tests.replica_helpers import file_replica, intents_in, restored_copy
from tests.store_helpers import NOW, entry
from tests.test_relay import intent_on

pytestmark = pytest.mark.timeout(90)


# ---- the barrier: one sync covers every caller that came while it waited -----------------
class FakeSync:
    """A sync the test releases by hand; counts the rounds."""

    def __init__(self) -> None:
        self.calls = 0
        self.gate = asyncio.Event()
        self.fail: str | None = None

    async def __call__(self) -> None:
        self.calls += 1
        await self.gate.wait()
        self.gate.clear()
        if self.fail:
            raise ReplicaUnavailable(self.fail)


async def test_callers_arriving_during_a_sync_share_the_next_one() -> None:
    """The sync in flight may have read the log before their commit: ten callers that
    arrive meanwhile wait for one more sync, not ten."""
    sync = FakeSync()
    barrier = SyncBarrier(sync)
    first = asyncio.create_task(barrier.wait())
    await until(lambda: sync.calls == 1)
    later = [asyncio.create_task(barrier.wait()) for _ in range(10)]
    await asyncio.sleep(0)
    sync.gate.set()
    await first
    assert not any(t.done() for t in later)  # the first sync does not cover them
    await until(lambda: sync.calls == 2)
    sync.gate.set()
    await asyncio.gather(*later)
    assert sync.calls == 2


async def test_a_failed_sync_fails_every_caller_it_covered_once() -> None:
    """Callers sharing a failed sync all get its failure, without one timeout each."""
    sync = FakeSync()
    barrier = SyncBarrier(sync)
    first = asyncio.create_task(barrier.wait())
    await until(lambda: sync.calls == 1)
    later = [asyncio.create_task(barrier.wait()) for _ in range(5)]
    sync.gate.set()
    await first
    await until(lambda: sync.calls == 2)
    sync.fail = "S3 unreachable"
    sync.gate.set()
    results = await asyncio.gather(*later, return_exceptions=True)
    assert all(isinstance(r, ReplicaUnavailable) and r.reason == "S3 unreachable" for r in results)
    assert sync.calls == 2


async def test_a_cancelled_caller_does_not_strand_the_others() -> None:
    """The caller running a sync goes away (a client hung up): the next caller runs one."""
    sync = FakeSync()
    barrier = SyncBarrier(sync)
    leader = asyncio.create_task(barrier.wait())
    await until(lambda: sync.calls == 1)
    follower = asyncio.create_task(barrier.wait())
    await asyncio.sleep(0)
    leader.cancel()
    await until(lambda: sync.calls == 2)
    sync.gate.set()
    await asyncio.wait_for(follower, 5)


# ---- a daemon with a file:// replica --------------------------------------------------------
async def post_intent(daemon: Any, mkt: str) -> tuple[int, dict[str, str], Any]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            f"{daemon.url}/v1/approvals",
            json={"marketplaceOrderId": mkt},
            headers={"Authorization": "Bearer test-api-token-0123456789"},
        ) as resp,
    ):
        return resp.status, dict(resp.headers), await resp.json()


async def get(daemon: Any, path: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.get(f"{daemon.url}{path}") as resp:
        return resp.status, await resp.json() if path != "/metrics" else await resp.text()


async def test_an_intent_answered_202_is_on_the_replica(
    sim: Simulator, run_daemon: Callable[..., Any], tmp_path: Path
) -> None:
    """Replicated durability: the moment the connector hears 202, a restore of the replica
    (a lost disk) holds the intent; Litestream's own pace (a second) would not."""
    replica = file_replica(tmp_path / "replica")
    async with run_daemon(sim, replica=replica, durability="replicated") as daemon:
        for n in range(3):
            status, _, _ = await post_intent(daemon, f"MKT-{n}")
            assert status == 202
            copy = await restored_copy(daemon.settings.db, replica, tmp_path / f"copy{n}.db")
            assert f"MKT-{n}" in await intents_in(copy)
        assert daemon.metrics.sample("omsd_replica_syncs_total") >= 3


async def test_feed_handles_are_committed_only_once_on_the_replica(
    sim: Simulator, run_daemon: Callable[..., Any], tmp_path: Path
) -> None:
    """Replicated durability: whenever omsd commits feed handles to VTEX, a restore of the
    replica already holds them (journaled in the same transaction as their items)."""
    replica = file_replica(tmp_path / "replica")
    missing: list[set[str]] = []
    async with run_daemon(sim, replica=replica, durability="replicated") as daemon:
        assert daemon.poller is not None
        vtex = daemon.poller._vtex
        original = vtex.commit_feed

        async def commit(handles: list[str]) -> None:
            copy = await restored_copy(daemon.settings.db, replica, tmp_path / f"c{len(missing)}.db")
            async with await Store.open_readonly(copy) as store:
                on_replica = set(await store.journal.pending_acks(limit=10_000))
            missing.append(set(handles) - on_replica)
            await original(handles)

        vtex.commit_feed = commit
        for wave in range(2):
            for i in range(3):
                sim.create(f"F{wave}{i}")
            await until(lambda w=wave: len(missing) > w, what="a feed commit")  # type: ignore[misc]
    assert all(not m for m in missing), missing


async def test_restore_on_start_brings_back_a_lost_database(
    sim: Simulator, run_daemon: Callable[..., Any], tmp_path: Path
) -> None:
    """The database and everything beside it are gone: `omsd run` restores the replica's
    copy first, then carries on (the order approved before the loss stays approved)."""
    replica = file_replica(tmp_path / "replica")
    db = tmp_path / "omsd.db"
    order = sim.create("R1")
    async with run_daemon(sim, db=db, replica=replica, durability="replicated") as daemon:
        status, _ = await approve(daemon, order.marketplace_order_id, order.order_id)
        assert status == 202
        await until(reached(daemon, order.order_id, Phase.APPROVED), what="approved")
    for path in tmp_path.glob("*omsd.db*"):
        if path.name != "omsd.db.lock":
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    assert not db.exists()
    async with run_daemon(sim, db=db, replica=replica, durability="replicated") as daemon:
        assert daemon.replica.restored is not None and daemon.replica.restored.txid > 0
        assert daemon.store is not None
        restored = await daemon.store.read.load_order(order.order_id)
        assert restored is not None and restored.phase == Phase.APPROVED
    assert order.approvals_applied == 1


async def test_replica_down_pauses_intake_and_raises_the_alarm(
    sim: Simulator, run_daemon: Callable[..., Any], tmp_path: Path
) -> None:
    """Replicated durability with the replica unwritable: intents get 503 with Retry-After
    (nothing acknowledged that a lost disk would lose), the alarm fails /readyz; once it
    is writable again, both recover by themselves."""
    folder = tmp_path / "replica"
    async with run_daemon(sim, replica=file_replica(folder), durability="replicated", replica_alarm_s=1.0) as daemon:
        assert (await post_intent(daemon, "UP-1"))[0] == 202
        shutil.move(folder, tmp_path / "replica-away")
        folder.write_text("not a folder: every upload fails")  # root ignores permissions; this it cannot
        status, headers, body = await post_intent(daemon, "DOWN-1")
        assert status == 503 and "replica" in body["error"] and headers["Retry-After"].isdigit()

        async def alarmed() -> bool:
            return (await get(daemon, "/readyz"))[0] == 503 and ALARM in daemon.health.alarms

        await until(alarmed, timeout=30, what="replica alarm")
        assert daemon.metrics.sample("omsd_replica_up") == 0
        assert daemon.metrics.sample("omsd_replica_lag_bytes") > 0  # DOWN-1 is journaled here, not there
        assert daemon.metrics.sample("omsd_replica_lag_seconds") > 1
        assert daemon.metrics.sample("omsd_replica_sync_failures_total") >= 1
        folder.unlink()
        shutil.move(tmp_path / "replica-away", folder)

        async def recovered() -> bool:
            return ALARM not in daemon.health.alarms and daemon.health.replica_problem is None

        await until(recovered, timeout=30, what="replica current again")
        assert (await post_intent(daemon, "UP-2"))[0] == 202
        await until(lambda: daemon.metrics.sample("omsd_replica_lag_bytes") == 0, what="nothing left to upload")


async def events_after(daemon: Any, after: int) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"{daemon.url}/v1/events?after={after}", headers={"Authorization": f"Bearer {API_TOKEN}"}) as resp,
    ):
        return resp.status, await resp.json()


async def test_a_start_with_the_replica_down_shows_no_outcome_it_has_not_synced(
    sim: Simulator, run_daemon: Callable[..., Any], tmp_path: Path
) -> None:
    """Replicated durability, a restart while the replica is unreachable: outcomes the last run committed and no
    sync covered are not shown (a lost disk would give their seqs to other events); readers wait, never go back,
    and see them once a sync reaches the replica."""
    folder, db = tmp_path / "replica", tmp_path / "omsd.db"
    order = sim.create("R1")
    async with run_daemon(sim, db=db, replica=file_replica(folder), durability="replicated") as daemon:
        await approve(daemon, order.marketplace_order_id, order.order_id)
        await until(reached(daemon, order.order_id, Phase.APPROVED), what="approved")
        _, body = await events_after(daemon, 0)
        seen = body["next"]
    shutil.move(folder, tmp_path / "replica-away")
    folder.write_text("not a folder: every upload fails")
    async with await Store.open(db) as store:  # committed by the last run, killed before its sync
        await store.journal.append([entry(e) for e in intent_on("Z-9-01", "9", 1)], now=NOW)
        await Processor(store, Policy()).drain()
    async with run_daemon(sim, db=db, replica=file_replica(folder), durability="replicated") as daemon:
        assert await events_after(daemon, seen) == (200, {"events": [], "next": seen})
        folder.unlink()
        shutil.move(tmp_path / "replica-away", folder)

        async def shown() -> bool:
            return bool((await events_after(daemon, seen))[1]["events"])

        await until(shown, timeout=30, what="the outcomes shown once on the replica")


async def test_local_durability_answers_without_waiting_for_the_replica(
    sim: Simulator, run_daemon: Callable[..., Any], tmp_path: Path
) -> None:
    """`local` (the default) with a replica: intake never waits for it, and never pauses."""
    folder = tmp_path / "replica"
    async with run_daemon(sim, replica=file_replica(folder)) as daemon:
        folder.rename(tmp_path / "away")
        folder.write_text("x")
        assert (await post_intent(daemon, "L-1"))[0] == 202
        assert daemon.metrics.sample("omsd_replica_waits_total") == 0
        assert daemon.health.intake_problem is None


# ---- settings and Litestream's environment ----------------------------------------------------
def test_replicated_durability_needs_a_replica() -> None:
    """OMSD_DURABILITY=replicated without OMSD_REPLICA is a configuration error naming both."""
    from omsd.daemon.config.settings import ConfigError, Settings, _build

    with pytest.raises(ConfigError, match="OMSD_DURABILITY: replicated needs OMSD_REPLICA"):
        _build(Settings, **_required(), durability="replicated")


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://bucket/path", "Litestream replica URL"),
        ("file://relative/path", "absolute path"),
        ("s3://bucket-only", "bucket or host and a path"),
    ],
)
def test_a_replica_url_litestream_cannot_use_is_refused(url: str, problem: str) -> None:
    from omsd.daemon.config.settings import ConfigError, Settings, _build

    with pytest.raises(ConfigError, match=f"OMSD_REPLICA: .*{problem}"):
        _build(Settings, **_required(), replica=url)


def test_a_password_in_the_replica_url_is_never_shown() -> None:
    """sftp://user:password@host: masked for display, absent from repr."""
    from omsd.daemon.config.settings import Settings

    settings = Settings(**_required(), replica="sftp://omsd:hunter2-secret@backup.example.com/omsd/db")
    assert "hunter2-secret" not in settings.replica_display and "hunter2-secret" not in repr(settings)
    assert settings.replica_display == "sftp://omsd:***@backup.example.com/omsd/db"


def test_litestreams_environment_drops_omsd_secrets_and_the_ca_bundle(tmp_path: Path) -> None:
    """Litestream gets no OMSD_* variable (secrets), no AWS_CA_BUNDLE (its AWS SDK refuses
    to start with one), and the replica's keys from systemd's credentials when unset."""
    from omsd.daemon.ops.litestream import child_env, secrets_in

    (tmp_path / "litestream_secret_access_key").write_text("s3-secret-value\n")
    env = child_env(
        {
            "OMSD_APP_TOKEN": "vtex-secret",
            "AWS_CA_BUNDLE": "/etc/ssl/bundle.pem",
            "PATH": "/usr/bin",
            "CREDENTIALS_DIRECTORY": str(tmp_path),
            "LITESTREAM_ACCESS_KEY_ID": "AKIA-from-env",
        }
    )
    assert env == {
        "PATH": "/usr/bin",
        "LITESTREAM_ACCESS_KEY_ID": "AKIA-from-env",
        "LITESTREAM_SECRET_ACCESS_KEY": "s3-secret-value",
    }
    assert secrets_in(env) == ["s3-secret-value"]


def _required() -> dict[str, Any]:
    return {
        "account": "shop",
        "app_key": "vtexappkey-shop-X",
        "app_token": "app-token-0123456789",
        "connector_name": "c",
        "connector_endpoint": "https://omsd.example.com",
    }


# ---- supervision ------------------------------------------------------------------------------
async def test_litestream_is_restarted_when_it_dies(
    sim: Simulator, run_daemon: Callable[..., Any], tmp_path: Path
) -> None:
    """Litestream killed under a running omsd: the replica is behind meanwhile, then a new
    Litestream runs and replicated intents are answered 202 again."""
    async with run_daemon(sim, replica=file_replica(tmp_path / "replica"), durability="replicated") as daemon:
        ls = daemon.replica.litestream
        assert ls is not None and ls.pid is not None
        first = ls.pid
        os.kill(first, signal.SIGKILL)
        await until(lambda: daemon.metrics.sample("omsd_replica_restarts_total") == 1, what="restarted")
        await until(lambda: ls.running and ls.pid != first and daemon.health.replica_problem is None, what="current")
        assert (await post_intent(daemon, "AFTER-1"))[0] == 202


async def test_the_retention_job_never_truncates_the_log_under_litestream(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a replica, the retention job checkpoints PASSIVE (Litestream holds a read on
    the log: a TRUNCATE would stall every writer); without, it truncates as before."""
    from omsd.daemon.ops import retention
    from omsd.daemon.ops.jobs import Jobs, add_retention
    from omsd.daemon.ops.notify import Progress
    from tests.helpers import quiet_health

    seen: list[bool] = []

    async def run_job(store: Any, days: float, now: Any, *, truncate: bool = True) -> None:
        seen.append(truncate)

    monkeypatch.setattr(retention, "run_job", run_job)
    health = quiet_health()
    for truncate in (False, True):
        jobs = Jobs(health, health.metrics, Progress())
        add_retention(jobs, cast(Store, None), 30, truncate=truncate)
        await jobs.scheduler.get_job("retention").func()
    assert seen == [False, True]


async def test_a_passive_reclaim_leaves_the_log_to_litestream(tmp_path: Path) -> None:
    """`reclaim(truncate=False)` checkpoints without truncating the write-ahead log."""
    db = tmp_path / "omsd.db"
    async with await Store.open(db) as store:
        await store.db.probe_write()
        await store.retention.reclaim(truncate=False)
        assert (tmp_path / "omsd.db-wal").stat().st_size > 0
        await store.retention.reclaim(truncate=True)
        assert (tmp_path / "omsd.db-wal").stat().st_size == 0


def test_the_units_view_hands_litestream_its_keys_from_credential_files(tmp_path: Path) -> None:
    """`omsd --instance NAME restore` sees the S3 keys the unit gives Litestream as
    credentials, as `omsd run` under the unit does."""
    from omsd.daemon.config.instance import instance_environment

    (tmp_path / "shop.env").write_text("OMSD_REPLICA=s3://bucket/omsd/shop\n")
    creds = tmp_path / "credentials" / "shop"
    creds.mkdir(parents=True)
    (creds / "litestream_secret_access_key").write_text("s3-secret\n")
    env = instance_environment("shop", {"OMSD_ETC": str(tmp_path), "LITESTREAM_ACCESS_KEY_ID": "AKIA-caller"})
    assert env["LITESTREAM_SECRET_ACCESS_KEY"] == "s3-secret"
    assert env["LITESTREAM_ACCESS_KEY_ID"] == "AKIA-caller"
    assert env["OMSD_REPLICA"] == "s3://bucket/omsd/shop"
