"""Release → approval PUT latency, with the hook and with the feed, without and with faults.

    .venv/bin/python benchmarks/latency.py [--orders 100] [--free 20] [--arrival 50] [--spread 10] [--timeout 30]
                                           [--durability local replicated]

Each run starts the simulator on loopback and a real omsd in this process (the
Settings' defaults: feed polled every 5 s, 50 requests/s, adaptive rate), with
`OMSD_SOURCE=hook` (and a hook secret) or `OMSD_SOURCE=feed`, once with no
faults and once with the fault mix. Orders arrive at random times over
`--arrival` s: `--orders` of them are created held, each gets its intent
(`POST /v1/approvals` with both ids) at once, and the simulated seller releases
it 1 to 1 + `--spread` s after the hold; `--free` more are never held and their
intent is sent once the order waits for the marketplace's approval (intent → PUT).
With `--durability local replicated` each run is made twice on the same seed, the
second with Litestream and a file:// replica (OMSD_DURABILITY=replicated: the 202 and
the PUT wait for the replica).

`--early` of the held orders get their intent 0.5 to 2 s *before* VTEX has the order
(the connector knows both ids; VTEX's id is `MKP-{marketplace id}-01`): Get order
answers 404 until the order exists (issue #16's first item).

Issue #16's goal for the hook without faults (release → PUT p99 ≤ 2 × one VTEX call
+ 50 ms, 150 ms at 50 ms per call, over 100 orders including intents that precede
their order):

    .venv/bin/python benchmarks/latency.py --sources hook --faults none --latency 0.05 --early 20

and for its sixth (VTEX drops the feed and hook configurations 10 s into a hook+feed run of
80 orders with the standard faults; goal: the hook recreated within 10 s of the first
change it missed):

    .venv/bin/python benchmarks/latency.py --sources both --faults mix --orders 80 --free 0 --drop-at 10

Per held order: release (the simulator's status change out of
waiting-for-manual-authorization) → the first approval PUT reaching the
simulator's handler (after its added latency; a PUT refused with 429 never
reaches it). A run ends when every order was approved, or after `--timeout` s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import latency_trace  # beside this script (run as a script, its folder is on the path)

from omsd.daemon.app import Daemon
from omsd.daemon.config.settings import Settings
from omsd.daemon.ops import logs
from omsd.daemon.tools.demo import free_port
from omsd.sim.faults import Faults
from omsd.sim.orders import SimOrder
from omsd.sim.server import Simulator

API_TOKEN = "bench-api-token-0123456789"  # noqa: S105 - the benchmark's own loopback token
HELD = "waiting-for-manual-authorization"
RELEASES = ("waiting-ffmt-authorization", "order-accepted")


def fault_mix() -> Faults:
    """50 ms per call, 2 % 429 (Retry-After: 2), 2 % 5xx, duplicates, short batches."""
    return Faults(
        latency_s=(0.05, 0.05),
        rate_429=0.02,
        retry_after_s=2.0,
        rate_5xx=0.02,
        duplicate_rate=0.05,
        notification_duplicate_rate=0.05,
        hook_duplicate_rate=0.05,
        short_batches=True,
    )


def mix_without_429() -> Faults:
    """The fault mix without its 429s: what 5xx, duplicates and short batches cost alone."""
    faults = fault_mix()
    faults.rate_429 = 0.0
    return faults


def no_faults() -> Faults:
    return Faults(short_batches=False)


def with_latency(faults: Faults, seconds: float | None) -> Faults:
    if seconds is not None:
        faults.latency_s = (seconds, seconds)
    return faults


@dataclass
class Result:
    name: str
    release_put: list[float]
    intent_put_held: list[float]
    intent_put_free: list[float]
    approved: int
    orders: int
    puts_while_held: int
    applied_more_than_once: int
    rate_limited: int
    inside_retry_after: str  # requests inside an announced window: its own route / any route
    calls: str
    seconds: float


def settings_for(
    sim: Simulator, db: Path, source: str, args: argparse.Namespace, durability: str = "local"
) -> Settings:
    port = free_port()
    budget: dict[str, Any] = {} if args.rate is None else {"rate_limit_per_s": args.rate}
    if durability == "replicated":  # Litestream beside omsd, a file:// replica on the same disk
        budget.update(replica=f"file://{db.parent / 'replica'}", durability="replicated")
    return Settings(
        account=sim.account,
        app_key=sim.app_key,
        app_token=sim.app_token,
        vtex_base_url=sim.base_url,
        db=db,
        connector_name="omsd-bench",
        connector_endpoint=f"http://127.0.0.1:{port}",
        listen=f"127.0.0.1:{port}",
        api_token=API_TOKEN,
        source=source,
        hook_secret="bench-hook-secret-0123456789" if source in ("hook", "both") else None,
        log_level="error",
        rate_adapt=args.rate_adapt,
        **budget,
    )


def parse_vtex(text: str) -> datetime:
    return datetime.strptime(text[:26], "%Y-%m-%dT%H:%M:%S.%f").replace(tzinfo=UTC)


def release_time(order: SimOrder) -> datetime | None:
    """When the order left waiting-for-manual-authorization for a release status."""
    for (status, _), (after, at) in zip(order.history, order.history[1:], strict=False):
        if status == HELD and after in RELEASES:
            return parse_vtex(at)
    return None


async def send_intent(http: aiohttp.ClientSession, url: str, order: SimOrder) -> datetime:
    body = {"marketplaceOrderId": order.marketplace_order_id, "orderId": order.order_id}
    sent = datetime.now(UTC)
    headers = {"Authorization": f"Bearer {API_TOKEN}"}
    async with http.post(f"{url}/v1/approvals", json=body, headers=headers) as resp:
        if resp.status >= 300:
            raise RuntimeError(f"intent refused: {resp.status} {await resp.text()}")
    return sent


async def intents_when_released(
    http: aiohttp.ClientSession, url: str, free: list[SimOrder], total: int, sent: dict[str, datetime]
) -> None:
    """Send each free order's intent once it waits for the marketplace's approval."""
    done = 0
    while done < total:
        for order in free:
            if order.order_id not in sent and order.status == order.release_status:
                sent[order.order_id] = await send_intent(http, url, order)
                done += 1
        await asyncio.sleep(0.01)


def seconds(a: datetime, b: datetime) -> float:
    return (b - a).total_seconds()


def measure(name: str, sim: Simulator, held: list[SimOrder], free: list[SimOrder], sent: dict[str, datetime]) -> Result:
    release_put, intent_held, intent_free = [], [], []
    for order in held:
        released = release_time(order)
        if order.put_at and released is not None:
            release_put.append(seconds(released, order.put_at[0]))
            intent_held.append(seconds(sent[order.order_id], order.put_at[0]))
    for order in free:
        if order.put_at:
            intent_free.append(seconds(sent[order.order_id], order.put_at[0]))
    everyone = held + free
    return Result(
        name=name,
        release_put=release_put,
        intent_put_held=intent_held,
        intent_put_free=intent_free,
        approved=sum(1 for o in everyone if o.approvals_applied >= 1),
        orders=len(everyone),
        puts_while_held=sum(o.puts_while_held for o in everyone),
        applied_more_than_once=sum(1 for o in everyone if o.approvals_applied > 1),
        rate_limited=sim.rate_limited,
        inside_retry_after="{route} / {account}".format(**sim.inside_retry_after),
        calls=f"{sim.calls.get('get_order', 0)} / {sim.calls.get('put', 0)}",
        seconds=0.0,
    )


async def start_daemon(settings: Settings) -> tuple[Daemon, asyncio.Event, asyncio.Task[None]]:
    daemon = Daemon(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    ready = asyncio.create_task(daemon.ready.wait())
    done, _ = await asyncio.wait([task, ready], timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        ready.cancel()
        task.result()
    if not daemon.ready.is_set():
        raise RuntimeError("omsd did not become ready")
    return daemon, stop, task


@dataclass
class Driven:
    held: list[SimOrder]
    free: list[SimOrder]
    sent: dict[str, datetime]  # order id → when its intent was sent


async def arrive(
    args: argparse.Namespace, sim: Simulator, http: aiohttp.ClientSession, url: str, run: int, into: Driven
) -> None:
    """Create the orders at their arrival times; a held order's intent goes at once."""
    rng = random.Random(run)
    kinds = ["early"] * args.early + ["held"] * (args.orders - args.early) + ["free"] * args.free
    arrivals = sorted((rng.uniform(0, args.arrival), kind, i) for i, kind in enumerate(kinds))
    t0 = time.monotonic()
    early: list[asyncio.Task[None]] = []
    for at, kind, i in arrivals:
        await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
        if kind == "free":
            into.free.append(sim.create(f"F{run}-{i:05d}"))
            continue
        decide_after_s = 1 + rng.uniform(0, args.spread)
        if kind == "early":
            early.append(asyncio.create_task(intent_first(sim, http, url, f"H{run}-{i:05d}", decide_after_s, into)))
            continue
        order = sim.create(f"H{run}-{i:05d}", held=True, decide_after_s=decide_after_s)
        into.held.append(order)
        into.sent[order.order_id] = await send_intent(http, url, order)
    await asyncio.gather(*early)


async def intent_first(
    sim: Simulator, http: aiohttp.ClientSession, url: str, mkt: str, decide_after_s: float, into: Driven
) -> None:
    """The intent (both ids) 0.5 to 2 s before VTEX has the order, then the order, created held."""
    order_id = f"MKP-{mkt}-01"  # the simulator's ids (sim/orders.py)
    sent = datetime.now(UTC)
    body = {"marketplaceOrderId": mkt, "orderId": order_id}
    async with http.post(f"{url}/v1/approvals", json=body, headers={"Authorization": f"Bearer {API_TOKEN}"}) as resp:
        if resp.status >= 300:
            raise RuntimeError(f"intent refused: {resp.status} {await resp.text()}")
    await asyncio.sleep(0.5 + 1.5 * random.Random(mkt).random())
    order = sim.create(mkt, held=True, decide_after_s=decide_after_s)
    assert order.order_id == order_id, order.order_id
    into.held.append(order)
    into.sent[order.order_id] = sent


async def drive(args: argparse.Namespace, sim: Simulator, url: str, run: int) -> Driven:
    driven = Driven([], [], {})
    async with aiohttp.ClientSession() as http:
        await asyncio.wait_for(
            asyncio.gather(
                arrive(args, sim, http, url, run, driven),
                intents_when_released(http, url, driven.free, args.free, driven.sent),
            ),
            args.arrival + args.timeout,
        )
    everyone = driven.held + driven.free
    for _ in range(round(args.timeout * 10)):
        if all(o.approvals_applied for o in everyone):
            break
        await asyncio.sleep(0.1)
    return driven


async def one_run(
    args: argparse.Namespace, source: str, faults: Faults, label: str, run: int, durability: str = "local"
) -> Result:
    sim = Simulator(seed=run, faults=faults)
    await sim.start()
    trace = latency_trace.Trace()
    with tempfile.TemporaryDirectory() as tmp, latency_trace.tracing(trace, enabled=args.trace):
        daemon, stop, task = await start_daemon(settings_for(sim, Path(tmp) / "omsd.db", source, args, durability))
        t0 = time.monotonic()
        dropped = asyncio.create_task(drop_configurations(sim, args.drop_at)) if args.drop_at is not None else None
        try:
            driven = await drive(args, sim, daemon.url, run)
        finally:
            stop.set()
            await asyncio.wait_for(task, timeout=30)
            await sim.stop()
    name = f"{source}, {label}" + (f", {durability}" if args.durability != ["local"] else "")
    result = measure(name, sim, driven.held, driven.free, driven.sent)
    result.seconds = time.monotonic() - t0
    if dropped is not None:
        print(f"{source}, {label}: {dropped_report(await dropped, driven.held + driven.free)}", flush=True)
    if args.trace:
        print(
            f"\n{source}, {label}: where the time goes\n{latency_trace.for_run(trace, driven.held, release_time)}\n",
            flush=True,
        )
    return result


@dataclass
class Dropped:
    at: datetime
    feed_back: datetime | None = None
    hook_back: datetime | None = None


async def drop_configurations(sim: Simulator, after_s: float) -> Dropped:
    """VTEX deletes the feed and hook configurations `after_s` into the run (issue #16's sixth
    item): note when omsd has recreated each (within 120 s)."""
    await asyncio.sleep(after_s)
    dropped = Dropped(datetime.now(UTC))
    sim.feed_config = None
    sim.hook_config = None
    for _ in range(1200):
        now = datetime.now(UTC)
        if dropped.feed_back is None and sim.feed_config is not None:
            dropped.feed_back = now
        if dropped.hook_back is None and sim.hook_config is not None:
            dropped.hook_back = now
        if dropped.feed_back and dropped.hook_back:
            break
        await asyncio.sleep(0.1)
    return dropped


def dropped_report(dropped: Dropped, orders: list[SimOrder]) -> str:
    """When each configuration came back, from the drop and from the first change the hook missed."""
    changes = [parse_vtex(at) for o in orders for _, at in o.history if parse_vtex(at) > dropped.at]
    first = min(changes, default=None)

    def back(at: datetime | None) -> str:
        if at is None:
            return "not recreated"
        since_miss = f", {(at - first).total_seconds():.2f} s after the first change it missed" if first else ""
        return f"{(at - dropped.at).total_seconds():.2f} s after the drop{since_miss}"

    return f"configurations dropped: feed back {back(dropped.feed_back)}; hook back {back(dropped.hook_back)}"


def pct(values: list[float], q: float) -> str:
    if not values:
        return "—"
    ordered = sorted(values)
    return f"{ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1000:,.0f}"


def table(results: list[Result]) -> str:
    head = (
        "| run | release → PUT p50 / p99 / max (ms) | intent → PUT p50, intent after release (ms) "
        "| intent → PUT p50, intent while held (ms) | approved | PUTs while held | applied twice | 429s "
        "| inside a Retry-After window: same route / any route | Get orders / PUTs | wall (s) |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in results:
        rp = r.release_put
        lines.append(
            f"| {r.name} | {pct(rp, 0.5)} / {pct(rp, 0.99)} / {pct(rp, 1.0)} | {pct(r.intent_put_free, 0.5)} "
            f"| {pct(r.intent_put_held, 0.5)} | {r.approved}/{r.orders} | {r.puts_while_held} "
            f"| {r.applied_more_than_once} | {r.rate_limited} | {r.inside_retry_after} | {r.calls} | {r.seconds:.1f} |"
        )
    return "\n".join(lines)


async def main(args: argparse.Namespace) -> None:
    logs.configure("error", "json")
    runs: list[tuple[str, Faults, str, str]] = [
        (source, with_latency(make(), args.latency), label, durability)
        for source in args.sources
        for key, make, label in (
            ("none", no_faults, "no faults"),
            ("mix", fault_mix, "fault mix"),
            ("mix-no429", mix_without_429, "fault mix without 429s"),
        )
        if key in args.faults
        for durability in args.durability
    ]
    results: list[Result] = []
    for n, (source, faults, label, durability) in enumerate(runs):
        seed = n // len(args.durability) + 1  # local and replicated see the same orders
        results.append(await one_run(args, source, faults, label, seed, durability))
        print(table(results[-1:]).splitlines()[-1], flush=True)
    print(f"\nload average {os.getloadavg()}\n")
    print(table(results))
    if any(r.puts_while_held for r in results):
        print("\nAPPROVALS WERE SENT WHILE HELD")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--orders", type=int, default=100, help="held orders per run")
    p.add_argument("--free", type=int, default=20, help="orders never held, intent after release")
    p.add_argument("--early", type=int, default=0, help="of the held orders, those whose intent precedes the order")
    p.add_argument("--latency", type=float, help="seconds per VTEX call, also without faults (default: the mix's)")
    p.add_argument("--arrival", type=float, default=50.0, help="orders arrive over this many seconds (0: at once)")
    p.add_argument("--spread", type=float, default=10.0, help="a held order is released 1 to 1 + this s after its hold")
    p.add_argument("--timeout", type=float, default=30.0, help="a run gives up this long after the last intent")
    p.add_argument("--faults", nargs="+", default=["none", "mix"], choices=["none", "mix", "mix-no429"])
    p.add_argument("--rate-adapt", action=argparse.BooleanOptionalAction, default=True, help="OMSD_RATE_ADAPT")
    p.add_argument("--rate", type=float, help="OMSD_RATE_LIMIT_PER_S (default: the Settings' default)")
    p.add_argument("--trace", action="store_true", help="time each step of each held order (latency_trace.py)")
    p.add_argument("--sources", nargs="+", default=["hook", "feed"], choices=["hook", "feed", "both"])
    p.add_argument(
        "--durability",
        nargs="+",
        default=["local"],
        choices=["local", "replicated"],
        help="OMSD_DURABILITY; replicated runs Litestream to a file:// replica (same seed: side by side)",
    )
    p.add_argument("--drop-at", type=float, help="VTEX deletes both configurations this many seconds into each run")
    return p.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse()))
