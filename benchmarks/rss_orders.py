"""Resident memory of `omsd run` with 1,000,000 orders in its database, against an empty one.

    .venv/bin/python benchmarks/rss_orders.py [--orders 1000000] [--db PATH] [--settle 30]

The database is written with the store's own `commit_batch`, 50,000 orders per
transaction: each row is the `Order` the machine reaches at the end of a full
approval (the replay benchmark's order life: held, intent, released, approved,
ready-for-handling), with its own ids and times from the last day, so the
retention prune (30 days) leaves them alone. `--db` keeps the file and reuses it
when it exists.

Then `omsd run` (a subprocess, default settings: feed source polled every 5 s)
runs against the simulator on loopback (in this process), once on an empty
database (the baseline) and once on the generated one; after /readyz answers 200
and `--settle` more seconds, VmRSS and VmHWM are read from /proc/<pid>/status, and
again after one /metrics scrape (whose gauges are read from the store).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
from restarts import omsd_env  # beside this script

from omsd.daemon.tools.demo import free_port
from omsd.sim.server import Simulator
from omsd.state.models import Order
from omsd.state.store import Batch, Store

sys.path.insert(0, str(Path(__file__).parent))
from replay import _life  # the replay benchmark's order life

CHUNK = 50_000


def template() -> str:
    """One approved order's JSON, ids MKP-0-01 / M0, times moved to yesterday."""
    _, final = _life(0)
    yesterday = (datetime.now(UTC) - timedelta(days=1)).strftime("%Y-%m-%d")
    return final.model_dump_json().replace("2026-01-01T", f"{yesterday}T")


async def generate(path: Path, orders: int) -> float:
    """Write `orders` orders; returns the seconds it took."""
    t0 = time.monotonic()
    text = template()
    now = datetime.now(UTC)
    async with await Store.open(path) as store:
        for start in range(0, orders, CHUNK):
            batch = Batch(offset=0)
            for i in range(start, min(orders, start + CHUNK)):
                row = text.replace('"MKP-0-01"', f'"MKP-{i}-01"').replace('"M0"', f'"M{i}"')
                batch.orders[f"MKP-{i}-01"] = Order.model_validate_json(row)
            await store.derived.commit(batch, now=now)
            print(f"  {min(orders, start + CHUNK):,} orders written", flush=True)
    return time.monotonic() - t0


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM in kB."""
    found: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0])
    return found


def env_for(sim: Simulator, db: Path, port: int) -> dict[str, str]:
    return omsd_env(sim, db, port, "feed") | {"OMSD_LOG_LEVEL": "info"}


async def wait_ready(url: str, proc: asyncio.subprocess.Process, limit_s: float) -> float:
    """Seconds until /readyz answered 200."""
    t0 = time.monotonic()
    async with aiohttp.ClientSession() as http:
        while time.monotonic() - t0 < limit_s:
            if proc.returncode is not None:
                raise RuntimeError(f"omsd exited with {proc.returncode}")
            try:
                async with http.get(f"{url}/readyz") as resp:
                    if resp.status == 200:
                        return time.monotonic() - t0
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError("omsd did not become ready")


async def measure(db: Path, settle: float, log: Path) -> dict[str, float]:
    """Run `omsd run` on `db` against a fresh simulator; its memory after ready + settle."""
    sim = Simulator(seed=3)
    await sim.start()
    port = free_port()
    omsd = str(Path(sys.executable).with_name("omsd"))
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(omsd, "run", env=env_for(sim, db, port), stdout=out, stderr=out)
        try:
            ready_s = await wait_ready(f"http://127.0.0.1:{port}", proc, 300)
            at_ready = memory(proc.pid)
            await asyncio.sleep(settle)
            settled = memory(proc.pid)
            async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                await resp.read()  # refreshes the gauges read from the store (phase counts, offsets)
            scraped = memory(proc.pid)
            cpu = sum(int(x) for x in Path(f"/proc/{proc.pid}/stat").read_text().split()[13:15])
        finally:
            proc.terminate()
            await proc.wait()
            await sim.stop()
    return {
        "ready_s": ready_s,
        "rss_ready_kb": at_ready["VmRSS"],
        "rss_kb": settled["VmRSS"],
        "hwm_kb": settled["VmHWM"],
        "rss_scraped_kb": scraped["VmRSS"],
        "hwm_scraped_kb": scraped["VmHWM"],
        "cpu_s": cpu / os.sysconf("SC_CLK_TCK"),
    }


def report(runs: dict[str, dict[str, float]]) -> None:
    names = list(runs)
    print("\n| | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    rows = [
        ("ready after (s)", "ready_s", 1.0, "{:.1f}"),
        ("VmRSS at ready (MiB)", "rss_ready_kb", 1024.0, "{:.1f}"),
        ("VmRSS, ready + settle (MiB)", "rss_kb", 1024.0, "{:.1f}"),
        ("VmHWM, peak (MiB)", "hwm_kb", 1024.0, "{:.1f}"),
        ("VmRSS after a /metrics scrape (MiB)", "rss_scraped_kb", 1024.0, "{:.1f}"),
        ("VmHWM after the scrape (MiB)", "hwm_scraped_kb", 1024.0, "{:.1f}"),
        ("CPU from start (s)", "cpu_s", 1.0, "{:.1f}"),
    ]
    for label, key, scale, fmt in rows:
        print(f"| {label} | " + " | ".join(fmt.format(runs[n][key] / scale) for n in names) + " |")
    print(f"\nload average {os.getloadavg()}")


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        big = args.db or Path(tmp) / "orders.db"
        if not big.exists():
            print(f"generating {args.orders:,} orders in {big}", flush=True)
            print(f"  {await generate(big, args.orders):.0f} s, {big.stat().st_size / 2**20:,.0f} MiB")
        runs = {
            "empty database": await measure(Path(tmp) / "empty.db", args.settle, Path(tmp) / "empty.log"),
            f"{args.orders:,} orders": await measure(big, args.settle, Path(tmp) / "big.log"),
        }
    report(runs)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--orders", type=int, default=1_000_000)
    p.add_argument("--db", type=Path, help="keep the generated database here (reused when it exists)")
    p.add_argument("--settle", type=float, default=30.0, help="seconds to wait after ready")
    return p.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse()))
