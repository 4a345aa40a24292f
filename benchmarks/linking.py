"""Intents named by marketplace id: intent → approval, parked → linked, and the feed's commit lag.

    .venv/bin/python benchmarks/linking.py [--seconds 600] [--rate 3] [--by-mkt 0.55] [--faults issue20|none]
                                           [--account-limit 15] [--baseline] [--seed 1]

Issue #20's profile: orders arrive at `--rate` a second for `--seconds` (3,000 orders at 3
a second in the issue; at least ten minutes), a third held and released by the simulated
seller 1–11 s later, the rest never held. Each order's intent goes 0–2 s after the order
waits for the marketplace's approval (so the order is usually released already when its
intent comes), naming only the marketplace order id for `--by-mkt` of them (the rest name
both ids). omsd is a real `omsd run` process with `OMSD_SOURCE=both` and the Settings'
defaults; the simulator (in this process) answers with 50 ms per call, 2 % 429
(`Retry-After: 2`), 2 % 5xx and an account limit of `--account-limit` calls a second
(`--faults none`: 50 ms per call and nothing else).

Reported: intent → approval PUT (p50 / p99, all intents and those by marketplace id);
parked → linked for the intents by marketplace id (from omsd's database after the run:
the intent's journal row to the history row that released it); link Get orders per
intent by marketplace id (`omsd_link_lookups_total`, by trigger), Get orders per order;
event → feed commit (p50 / p99, the simulator's books); omsd's RSS and CPU (from /proc)
over the run. `--baseline` first runs the same orders with every intent naming both
ids: what the marketplace id alone costs.

    .venv/bin/python benchmarks/linking.py --seconds 600                 # with faults: goal p99 <= 3 s
    .venv/bin/python benchmarks/linking.py --seconds 600 --faults none   # goal p99 <= 2 calls + 100 ms
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import sqlite3
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
from latency import pct  # beside this script
from restarts import Omsd, omsd_env, post_intent

from omsd.daemon.tools.demo import free_port
from omsd.sim.faults import Faults
from omsd.sim.orders import SimOrder
from omsd.sim.server import Simulator

LINK_GAUGE = "omsd_link_lookups_total"


def issue20() -> Faults:
    """50 ms per call, 2 % 429 (Retry-After: 2), 2 % 5xx; the account limit is `--account-limit`."""
    return Faults(latency_s=(0.05, 0.05), rate_429=0.02, retry_after_s=2.0, rate_5xx=0.02, short_batches=False)


def no_faults() -> Faults:
    return Faults(latency_s=(0.05, 0.05), short_batches=False)


@dataclass
class Books:
    orders: list[SimOrder] = field(default_factory=list)
    intent_at: dict[str, datetime] = field(default_factory=dict)  # order id -> intent sent
    by_mkt: set[str] = field(default_factory=set)  # order ids whose intent named only the marketplace id
    samples: list[tuple[float, float, float]] = field(default_factory=list)  # (wall, RSS MB, CPU seconds)


async def drive(sim: Simulator, args: argparse.Namespace, port: int, books: Books, by_mkt_share: float) -> None:
    """Create the orders at `--rate` a second; send each intent 0-2 s after its order waits for
    the marketplace's approval."""
    rng = random.Random(args.seed)
    waiting: list[SimOrder] = []
    due: dict[str, float] = {}
    intents: list[asyncio.Task[None]] = []
    total = round(args.seconds * args.rate)
    t0 = time.monotonic()
    created = 0
    async with aiohttp.ClientSession() as http:
        while created < total or waiting:
            now = time.monotonic()
            while created < total and t0 + created / args.rate <= now:
                held = rng.random() < 1 / 3
                order = sim.create(f"L{created:06d}", held=held, decide_after_s=1 + rng.uniform(0, 10))
                books.orders.append(order)
                waiting.append(order)
                created += 1
            for order in list(waiting):
                if order.status == order.release_status:
                    due.setdefault(order.order_id, now + rng.uniform(0, 2))
                if order.order_id in due and due[order.order_id] <= now:
                    waiting.remove(order)
                    by_mkt = rng.random() < by_mkt_share
                    if by_mkt:
                        books.by_mkt.add(order.order_id)
                    books.intent_at[order.order_id] = datetime.now(UTC)
                    intents.append(asyncio.create_task(post_intent(http, port, order, by_mkt=by_mkt)))
            await asyncio.sleep(0.02)
        await asyncio.gather(*intents)


async def sample_process(pid: int, books: Books, stop: asyncio.Event) -> None:
    """omsd's RSS and CPU time from /proc, every 10 s."""
    ticks = os.sysconf("SC_CLK_TCK")
    while not stop.is_set():
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            rss_kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            cpu_s = (int(fields[11]) + int(fields[12])) / ticks
            books.samples.append((time.monotonic(), rss_kb / 1024, cpu_s))
        except (OSError, StopIteration, ValueError, IndexError):
            pass
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=10)


async def link_lookups(port: int) -> dict[str, float]:
    found: dict[str, float] = {}
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics") as resp:
        for line in (await resp.text()).splitlines():
            if line.startswith(LINK_GAUGE + "{"):
                trigger = line.split('trigger="', 1)[1].split('"', 1)[0]
                found[trigger] = float(line.rsplit(" ", 1)[1])
    return found


def parked_to_linked(db: Path, sim: Simulator, books: Books) -> list[float]:
    """Per intent by marketplace id that was parked: from its journal row to the history row
    that gave its order the intent."""
    conn = sqlite3.connect(db)
    try:
        intents = {
            mkt: datetime.fromisoformat(received)
            for mkt, received in conn.execute(
                "SELECT json_extract(payload, '$.marketplace_order_id'), MIN(received_at) FROM journal "
                "WHERE kind = 'intent_received' GROUP BY 1"
            )
        }
        linked = {
            order_id: datetime.fromisoformat(at)
            for order_id, at in conn.execute(
                "SELECT order_id, MIN(at) FROM history WHERE cause LIKE '%approval intent from%' GROUP BY order_id"
            )
        }
    finally:
        conn.close()
    out = []
    for order in books.orders:
        if order.order_id in books.by_mkt and order.marketplace_order_id in intents and order.order_id in linked:
            out.append((linked[order.order_id] - intents[order.marketplace_order_id]).total_seconds())
    return out


def report(name: str, sim: Simulator, books: Books, lookups: dict[str, float], linked: list[float]) -> list[str]:
    def put_after_intent(o: SimOrder) -> float | None:
        sent = books.intent_at.get(o.order_id)
        return (o.put_at[0] - sent).total_seconds() if sent is not None and o.put_at else None

    everyone = [d for o in books.orders if (d := put_after_intent(o)) is not None]
    by_mkt = [d for o in books.orders if o.order_id in books.by_mkt and (d := put_after_intent(o)) is not None]
    unapproved = sum(1 for o in books.orders if o.order_id in books.intent_at and not o.put_at)
    lag = sim.queue.commit_lag_s
    rss = [r for _, r, _ in books.samples]
    cpu = ""
    if len(books.samples) > 1:
        (t_a, _, c_a), (t_b, _, c_b) = books.samples[0], books.samples[-1]
        cpu = f"{(c_b - c_a) / (t_b - t_a):.1%} of a core"
    n_mkt = max(1, len(books.by_mkt))
    return [
        f"== {name}",
        f"orders: {len(books.orders)}; intents: {len(books.intent_at)} ({len(books.by_mkt)} by marketplace id); "
        f"no PUT at the end: {unapproved}",
        f"intent -> PUT (ms): all p50 {pct(everyone, 0.5)} / p99 {pct(everyone, 0.99)} / max {pct(everyone, 1.0)}; "
        f"by marketplace id p50 {pct(by_mkt, 0.5)} / p99 {pct(by_mkt, 0.99)} / max {pct(by_mkt, 1.0)}",
        f"parked -> linked (ms): p50 {pct(linked, 0.5)} / p99 {pct(linked, 0.99)} / max {pct(linked, 1.0)} "
        f"over {len(linked)}",
        f"link Get orders per intent by marketplace id: {sum(lookups.values()) / n_mkt:.2f} "
        f"({', '.join(f'{k} {v:.0f}' for k, v in sorted(lookups.items()))}); Get orders per order: "
        f"{sim.calls.get('get_order', 0) / max(1, len(books.orders)):.2f}",
        f"event -> feed commit (ms): p50 {pct(lag, 0.5)} / p99 {pct(lag, 0.99)} / max {pct(lag, 1.0)} over {len(lag)}",
        f"omsd RSS (MB): {rss[0]:.1f} -> {rss[-1]:.1f}, max {max(rss):.1f}; CPU {cpu}" if rss else "omsd RSS: -",
        f"429s: {sim.rate_limited} (account limit {sim.account_limited}); calls: {dict(sim.calls)}",
    ]


async def one_run(args: argparse.Namespace, by_mkt_share: float, name: str) -> list[str]:
    faults = issue20() if args.faults == "issue20" else no_faults()
    faults.account_limit_per_s = args.account_limit if args.faults == "issue20" else 0.0
    sim = Simulator(seed=args.seed, faults=faults)
    await sim.start()
    port = free_port()
    books = Books()
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "omsd.db"
        omsd = Omsd(omsd_env(sim, db, port, "both"), port, Path(tmp) / "omsd.log")
        await omsd.start()
        assert omsd.proc is not None
        while sim.feed_config is None or sim.hook_config is None:  # noqa: ASYNC110 - the simulator's state
            await asyncio.sleep(0.05)
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample_process(omsd.proc.pid, books, stop))
        try:
            await drive(sim, args, port, books, by_mkt_share)
            for _ in range(round(args.quiet * 10)):
                if all(o.put_at for o in books.orders if o.order_id in books.intent_at):
                    break
                await asyncio.sleep(0.1)
            lookups = await link_lookups(port)
        finally:
            stop.set()
            await sampler
            if omsd.proc.returncode is None:
                await omsd.stop(signal.SIGTERM)
            await sim.stop()
        return report(name, sim, books, lookups, parked_to_linked(db, sim, books))


async def main(args: argparse.Namespace) -> None:
    if args.baseline:
        print("\n".join(await one_run(args, 0.0, "baseline: every intent names both ids")), flush=True)
    print("\n".join(await one_run(args, args.by_mkt, f"{args.by_mkt:.0%} of the intents by marketplace id")))
    print(f"load average {os.getloadavg()}")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=600.0, help="orders arrive for this long")
    p.add_argument("--rate", type=float, default=3.0, help="orders a second")
    p.add_argument("--by-mkt", type=float, default=0.55, help="share of the intents naming only the marketplace id")
    p.add_argument("--faults", default="issue20", choices=["issue20", "none"])
    p.add_argument("--account-limit", type=float, default=15.0, help="calls a second the account admits")
    p.add_argument("--quiet", type=float, default=60.0, help="at most this long after the last intent")
    p.add_argument("--baseline", action="store_true", help="first the same run with every intent naming both ids")
    p.add_argument("--seed", type=int, default=1)
    return p.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse()))
