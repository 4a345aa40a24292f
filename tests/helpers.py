"""Helpers the test modules share (the daemon, the CLI, waiting on conditions); fixtures live in conftest.py."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from omsd.daemon.app import Daemon
from omsd.daemon.cli import main
from omsd.daemon.config.settings import Settings
from omsd.daemon.intake.feed import FeedPoller
from omsd.daemon.ops.health import Health
from omsd.daemon.ops.metrics import Metrics
from omsd.daemon.tools.demo import free_port as free_port  # the one definition (the demo needs it too)
from omsd.sim.server import Simulator
from omsd.state.statuses import Phase

API_TOKEN = "test-api-token-0123456789"
HOOK_SECRET = "hook-secret-0123456789"


VTEX_TOKEN = "app-token-secret-value-123"


def settings(**kw: Any) -> Settings:
    """The one Settings builder of the tests: a valid account, credentials and endpoint, and
    whatever the test names on top."""
    values: dict[str, Any] = {
        "account": "shop",
        "app_key": "vtexappkey-shop-ABC",
        "app_token": VTEX_TOKEN,
        "connector_name": "conn",
        "connector_endpoint": "https://omsd.example.com/vtex",
        "http_retries": 2,
    }
    return Settings(**(values | kw))


def fast_settings(sim: Simulator, db: Path, port: int, **kw: Any) -> Settings:
    """Settings for a daemon against the simulator, with every interval short."""
    fast: dict[str, Any] = {
        "account": sim.account,
        "app_key": sim.app_key,
        "app_token": sim.app_token,
        "vtex_base_url": sim.base_url,
        "db": db,
        "connector_name": "omsd-test",
        "connector_endpoint": f"http://127.0.0.1:{port}",
        "listen": f"127.0.0.1:{port}",
        "api_token": API_TOKEN,
        "poll_interval_s": 0.05,
        "rate_limit_per_s": 200,
        "held_recheck_s": 30.0,
        "confirm_timeout_s": 10.0,
        "retry_base_s": 0.05,
        "retry_cap_s": 0.5,
        "eoi008_recheck_s": 0.2,
        "http_timeout_s": 5.0,
        "http_retries": 3,
        "rate_limited_wait_s": 0.2,
        "shutdown_grace_s": 5.0,
        "max_attempts": 20,
    }
    return settings(**(fast | kw))


RunDaemon = Callable[..., Any]


async def until(predicate: Callable[[], Awaitable[bool] | bool], timeout: float = 30.0, what: str = "") -> None:
    """Wait for a condition to hold (checked as the system makes progress), or fail."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = predicate()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError(f"condition not reached in {timeout}s: {what}")
        await asyncio.sleep(0.02)


async def approve(daemon: Daemon, mkt: str, order_id: str | None = None, token: str = API_TOKEN) -> tuple[int, Any]:
    body: dict[str, Any] = {"marketplaceOrderId": mkt}
    if order_id:
        body["orderId"] = order_id
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{daemon.url}/v1/approvals", json=body, headers={"Authorization": f"Bearer {token}"}) as resp,
    ):
        return resp.status, await resp.json()


async def phase_of(daemon: Daemon, order_id: str) -> str | None:
    assert daemon.store is not None
    order = await daemon.store.read.load_order(order_id)
    return order.phase.value if order else None


def reached(daemon: Daemon, order_id: str, phase: Phase) -> Any:
    async def check() -> bool:
        return await phase_of(daemon, order_id) == phase.value

    return check


def omsd_env(sim: Simulator, db: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMSD_")}
    env.update(
        {
            "OMSD_ACCOUNT": sim.account,
            "OMSD_APP_KEY": sim.app_key,
            "OMSD_APP_TOKEN": sim.app_token,
            "OMSD_VTEX_BASE_URL": sim.base_url,
            "OMSD_DB": str(db),
            "OMSD_CONNECTOR_NAME": "omsd-crash-test",
            "OMSD_CONNECTOR_ENDPOINT": f"http://127.0.0.1:{port}",
            "OMSD_LISTEN": f"127.0.0.1:{port}",
            "OMSD_API_TOKEN": API_TOKEN,
            "OMSD_POLL_INTERVAL_S": "0.05",
            "OMSD_CONFIRM_TIMEOUT_S": "1.5",
            "OMSD_HELD_RECHECK_S": "3",
            "OMSD_RETRY_BASE_S": "0.1",
            "OMSD_RETRY_CAP_S": "1",
            "OMSD_MAX_ATTEMPTS": "30",
            "OMSD_RATE_LIMIT_PER_S": "200",
            "OMSD_LOG_FORMAT": "json",
        }
    )
    return env


class FakeClock:
    """Time under the test's hand, for whatever takes a clock: calling it gives monotonic
    seconds (`now`), `wall()` the matching datetime; a test moves it with `now +=`."""

    def __init__(self, start: datetime = datetime(2026, 11, 1, tzinfo=UTC)) -> None:
        self.now = 100.0
        self._start = start

    def __call__(self) -> float:
        return self.now

    def wall(self) -> datetime:
        return self._start + timedelta(seconds=self.now - 100.0)


async def run_cli(*args: str) -> int:
    return await asyncio.to_thread(main, list(args))


def quiet_health() -> Health:
    health = Health(settings(), Metrics())
    health.feed_config_ok = True
    health.poll_ok()
    return health


def hooked(**kw: Any) -> dict[str, Any]:
    return {"source": "hook", "hook_secret": HOOK_SECRET, **kw}


async def feed_until(poller: FeedPoller, done: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Run the feed poller's own loop until `done()` holds, then stop it (it drains)."""
    stop = asyncio.Event()
    task = asyncio.create_task(poller.run(stop))
    try:
        await until(lambda: done() or task.done(), timeout=timeout, what=what)
    finally:
        stop.set()
        await task


@contextlib.contextmanager
def small_filesystem(where: Path, size_kib: int) -> Iterator[Path]:
    """A tmpfs of `size_kib` KiB mounted at `where` for the block, to fill up for real (needs
    root, as CI runs; skips where mounting is not allowed)."""
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kib}k,mode=0700", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small file system: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def remount(where: Path, mode: str) -> None:
    """`ro` or `rw`: make a file system `small_filesystem` mounted read-only, or writable again."""
    subprocess.run(["mount", "-o", f"remount,{mode}", str(where)], check=True)


def fill_up(where: Path, leave: int = 0) -> Path:
    """Fill the file system of `where` until SQLite (or anyone) gets ENOSPC, leaving about
    `leave` bytes free; returns the filler file (unlink it to free the space)."""
    filler = where / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for chunk in (b"x" * 65536, b"x" * 4096, b"x" * 512):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, chunk)
        if leave:
            os.ftruncate(fd, max(0, os.fstat(fd).st_size - leave))
    finally:
        os.close(fd)
    return filler


async def omsd_run(
    env: dict[str, str], port: int, log: Path, *, timeout: float = 30.0, own_group: bool = False
) -> asyncio.subprocess.Process:
    """`omsd run` as its own process, its output appended to `log`, once it answers /healthz
    on `port`. `own_group`: in a new process group (with the Litestream it starts), so that
    one killpg ends both."""
    with log.open("a") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "omsd.daemon", "run", env=env, stdout=out, stderr=out, start_new_session=own_group
        )

    async def healthy() -> bool:
        if proc.returncode is not None:
            raise AssertionError(f"omsd exited {proc.returncode}; see {log}")
        try:
            async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/healthz") as r:
                return r.status == 200
        except aiohttp.ClientError:
            return False

    await until(healthy, timeout=timeout, what="omsd healthy")
    return proc
