"""Shared fixtures: the simulator on loopback and an in-process daemon wired to it."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from omsd.daemon import logs
from omsd.daemon.app import Daemon
from omsd.daemon.settings import Settings
from omsd.sim.faults import Faults
from omsd.sim.server import Simulator

API_TOKEN = "test-api-token-0123456789"


@pytest.fixture(autouse=True)
def _quiet_logs() -> None:
    logs.configure("warning", "json")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def fast_settings(sim: Simulator, db: Path, port: int, **kw: Any) -> Settings:
    values: dict[str, Any] = {
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
        "timer_tick_s": 0.05,
        "http_timeout_s": 5.0,
        "http_retries": 3,
        "rate_limited_wait_s": 0.2,
        "shutdown_grace_s": 5.0,
        "max_attempts": 20,
    }
    values.update(kw)
    return Settings(**values)


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    s = Simulator(seed=11, faults=Faults(notify_delay_s=(0.01, 0.05)), step_delay_s=0.02)
    await s.start()
    try:
        yield s
    finally:
        await s.stop()


RunDaemon = Callable[..., Any]


@pytest.fixture
def run_daemon(tmp_path: Path) -> Callable[..., Any]:
    """`async with run_daemon(sim, **settings) as daemon:` runs omsd until the block ends."""

    @asynccontextmanager
    async def runner(sim: Simulator, db: Path | None = None, **kw: Any) -> AsyncIterator[Daemon]:
        port = free_port()
        daemon = Daemon(fast_settings(sim, db or tmp_path / "omsd.db", port, **kw))
        stop = asyncio.Event()
        task = asyncio.create_task(daemon.run(stop))
        ready = asyncio.create_task(daemon.ready.wait())
        done, _ = await asyncio.wait([task, ready], timeout=20, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            ready.cancel()
            task.result()
        assert daemon.ready.is_set(), "daemon did not become ready"
        try:
            yield daemon
        finally:
            stop.set()
            await asyncio.wait_for(task, timeout=20)

    return runner


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
