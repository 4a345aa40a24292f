"""`omsd run` as a real process, meeting what its surroundings do: stray signals, a second
start through another path, a database restored with the wrong mode."""

from __future__ import annotations

import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from omsd.sim.server import Simulator
from tests.helpers import free_port, omsd_env, until
from tests.test_crash import Omsd

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


@pytest.fixture
async def omsd(sim: Simulator, tmp_path: Path) -> AsyncIterator[Omsd]:
    port = free_port()
    process = Omsd(omsd_env(sim, tmp_path / "omsd.db", port), port, tmp_path / "omsd.log")
    yield process
    if process.proc is not None and process.proc.returncode is None:
        process.proc.kill()
        await process.proc.wait()


def events(log: Path) -> list[str]:
    out = []
    for line in log.read_text().splitlines():
        try:
            out.append(json.loads(line).get("event", ""))
        except json.JSONDecodeError:
            continue
    return out


async def answers(port: int) -> bool:
    try:
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/healthz") as r:
            return r.status == 200
    except aiohttp.ClientError:
        return False


async def test_sighup_and_sigusr_do_not_end_the_daemon(omsd: Omsd) -> None:
    """SIGHUP logs that reload is not supported, SIGUSR1/SIGUSR2 are ignored with a line: the
    daemon goes on serving, and SIGTERM still drains and exits 0."""
    await omsd.start()
    assert omsd.proc is not None
    for sig in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        omsd.proc.send_signal(sig)
    await until(lambda: events(omsd.log).count("signal_ignored") == 2, what="two signals ignored")
    assert "reload_not_supported" in events(omsd.log)
    assert omsd.proc.returncode is None and await answers(omsd.port)
    assert await omsd.terminate() == 0
