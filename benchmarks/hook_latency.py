"""Latency of omsd's hook route: VTEX wants a 200 within 5 s.

    .venv/bin/python benchmarks/hook_latency.py [--pushes 2000] [--concurrency 20]

Starts the simulator and omsd (source=hook) in one process, posts distinct pushes
from a client on loopback and prints latency percentiles and the journaling rate.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp

from omsd.daemon.app import Daemon
from omsd.daemon.config.settings import Settings
from omsd.daemon.ops import logs
from omsd.daemon.tools.demo import free_port
from omsd.sim.server import Simulator


async def main(pushes: int, concurrency: int) -> None:
    logs.configure("warning", "json")
    sim = Simulator()
    await sim.start()
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(
            account=sim.account, app_key=sim.app_key, app_token=sim.app_token, vtex_base_url=sim.base_url,
            db=Path(tmp) / "bench.db", connector_name="bench", connector_endpoint=f"http://127.0.0.1:{port}",
            listen=f"127.0.0.1:{port}", source="hook", hook_secret="bench-hook-secret", rate_limit_per_s=1000,
        )  # fmt: skip
        daemon = Daemon(settings)
        stop = asyncio.Event()
        task = asyncio.create_task(daemon.run(stop))
        await daemon.ready.wait()
        t0 = datetime(2026, 1, 1, tzinfo=UTC)
        latencies: list[float] = []
        slots = asyncio.Semaphore(concurrency)
        async with aiohttp.ClientSession() as s:

            async def one(i: int) -> None:
                body = {
                    "Domain": "Fulfillment", "OrderId": f"MKP-B{i}-01", "State": "waiting-for-manual-authorization",
                    "LastState": "order-accepted", "LastChange": (t0 + timedelta(seconds=i)).isoformat(),
                    "CurrentChange": (t0 + timedelta(seconds=i, milliseconds=5)).isoformat(),
                    "Origin": {"Account": sim.account, "Key": sim.app_key},
                }  # fmt: skip
                async with slots:
                    start = time.perf_counter()
                    async with s.post(
                        f"{daemon.url}/vtex/hook", json=body, headers={"X-Omsd-Hook-Secret": "bench-hook-secret"}
                    ) as resp:
                        assert resp.status == 200, await resp.text()
                    latencies.append(time.perf_counter() - start)

            start = time.perf_counter()
            await asyncio.gather(*(one(i) for i in range(pushes)))
            elapsed = time.perf_counter() - start
        stop.set()
        await task
    await sim.stop()
    q = statistics.quantiles(latencies, n=100)
    print(
        f"hook: {pushes} pushes, {concurrency} concurrent: {pushes / elapsed:,.0f} pushes/s; "
        f"latency p50 {q[49] * 1000:.1f} ms, p99 {q[98] * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--pushes", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=20)
    args = parser.parse_args()
    asyncio.run(main(args.pushes, args.concurrency))
