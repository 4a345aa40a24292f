"""What replication costs in S3 requests: counted at an S3 endpoint (moto, on loopback).

    .venv/bin/python benchmarks/s3_requests.py [--minutes 3] [--orders-per-minute 0,60]
                                               [--durability local,replicated]

For each load and durability: the simulator and omsd in this process, replicating to
S3 on moto; `--orders-per-minute` orders arrive evenly (held, released after 1 s, each
handed over as an intent), for `--minutes`. Every request reaching the S3 endpoint is
counted by method (PUT: uploads; GET: reads, LIST: listings; DELETE: retention).
Reported per minute and per day (× 1440). Litestream's compaction runs every 30 s,
5 min and 1 h, its snapshot daily: runs shorter than an hour miss the slower ones
(their share is small; see docs/operations.md).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import logging
import os
import re
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
from latency import no_faults  # beside this script

from omsd.daemon.app import Daemon
from omsd.daemon.config.settings import Settings
from omsd.daemon.ops import logs
from omsd.daemon.tools.demo import free_port
from omsd.sim.server import Simulator

API_TOKEN = "bench-api-token-0123456789"  # noqa: S105 - loopback only
REQUEST = re.compile(r'"(GET|PUT|POST|DELETE|HEAD) (\S+)')


class Counter(logging.Handler):
    """Counts the S3 endpoint's requests from its access log (werkzeug's)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def emit(self, record: logging.LogRecord) -> None:
        if m := REQUEST.search(record.getMessage()):
            method, path = m.groups()
            kind = "LIST" if method == "GET" and "list-type" in path else method
            self.counts[kind] += 1


@contextlib.contextmanager
def s3() -> Iterator[tuple[str, Counter]]:
    from moto.server import ThreadedMotoServer

    counter = Counter()
    logging.getLogger("werkzeug").addHandler(counter)
    logging.getLogger("werkzeug").setLevel(logging.INFO)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=True)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    bucket = urllib.request.Request(f"{endpoint}/omsd-bench", method="PUT")  # noqa: S310 - loopback http
    urllib.request.urlopen(bucket, timeout=10).close()  # noqa: S310
    try:
        yield endpoint, counter
    finally:
        server.stop()


async def one_run(endpoint: str, counter: Counter, durability: str, per_minute: int, minutes: float) -> str:
    sim = Simulator(seed=per_minute, faults=no_faults())
    await sim.start()
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(
            account=sim.account, app_key=sim.app_key, app_token=sim.app_token, vtex_base_url=sim.base_url,
            db=Path(tmp) / "omsd.db", connector_name="bench", connector_endpoint=f"http://127.0.0.1:{port}",
            listen=f"127.0.0.1:{port}", api_token=API_TOKEN, log_level="error", durability=durability,
            replica=f"s3://omsd-bench/{durability}-{per_minute}-{time.monotonic_ns()}/omsd.db?endpoint={endpoint}",
        )  # fmt: skip
        daemon = Daemon(settings)
        stop = asyncio.Event()
        task = asyncio.create_task(daemon.run(stop))
        await asyncio.wait_for(daemon.ready.wait(), 60)
        counter.counts.clear()
        began = time.monotonic()
        async with aiohttp.ClientSession() as http:
            n = 0
            while (elapsed := time.monotonic() - began) < minutes * 60:
                if per_minute and n < elapsed * per_minute / 60:
                    n += 1
                    order = sim.create(f"S{n:05d}", held=True, decision="authorize", decide_after_s=1.0)
                    body = {"marketplaceOrderId": order.marketplace_order_id, "orderId": order.order_id}
                    headers = {"Authorization": f"Bearer {API_TOKEN}"}
                    async with http.post(f"{daemon.url}/v1/approvals", json=body, headers=headers) as resp:
                        await resp.read()
                await asyncio.sleep(0.05)
        counts = dict(counter.counts)
        stop.set()
        await task
        await sim.stop()
    total = sum(counts.values())
    per_min = {k: v / minutes for k, v in sorted(counts.items())}
    return (
        f"| {durability} | {per_minute} | "
        + ", ".join(f"{k} {v:.1f}" for k, v in per_min.items())
        + f" | {total / minutes:.1f} | {total / minutes * 1440:,.0f} |"
    )


async def main(args: argparse.Namespace) -> None:
    logs.configure("error", "json")
    os.environ.setdefault("LITESTREAM_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("LITESTREAM_SECRET_ACCESS_KEY", "bench-secret")
    rows = []
    with s3() as (endpoint, counter):
        for per_minute in args.orders_per_minute:
            for durability in args.durability.split(","):
                rows.append(await one_run(endpoint, counter, durability, per_minute, args.minutes))
                print(rows[-1], flush=True)
    print(
        "\n| durability | orders/min | requests per minute, by kind | all per minute | per day |\n|---|---|---|---|---|"
    )
    print("\n".join(rows))
    print(f"\nload average {os.getloadavg()}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=3.0)
    p.add_argument("--orders-per-minute", type=lambda v: [int(x) for x in v.split(",")], default=[0, 60])
    p.add_argument("--durability", default="local,replicated")
    asyncio.run(main(p.parse_args()))
