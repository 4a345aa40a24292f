"""How fast omsd drains a feed backlog within its request budget, against a plain consumer.

    .venv/bin/python benchmarks/backlog.py [--events 20000] [--budgets 20,100] [--latency 0.05]
                                           [--baseline-seconds 60] [--durability local,replicated]

The simulator runs in a child process (its own core) with `--latency` seconds added
to every /api/ call and full batches of 10; a benchmark-only middleware records the
arrival time of every request. For each budget, a backlog of `--events` feed events
(one new order each) is loaded and omsd (source=feed, OMSD_RATE_LIMIT_PER_S=budget,
default feed concurrency) runs until every event is committed. Then the same backlog
goes through a plain consumer (one loop: GET maxlot=10, commit the handles, act;
at most 500 calls a minute, as VTEX's boilerplate), for `--baseline-seconds`.

From the simulator's log: events/s from the first request to the last commit; the
calls per second as a share of the budget; the busiest one-second and 100 ms windows
(sliding, by arrival) against the budget and a tenth of it, and the same as sent by
omsd's client. A run whose busiest second at the simulator is over the budget is
flagged OVER BUDGET.

The simulator's FeedQueue shuffles every visible message on each GET (35 ms at
20,000 messages); the benchmark swaps in a receive that samples the same random
visible messages, so the simulator's CPU does not set the pace.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import itertools
import json
import math
import multiprocessing
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from omsd.daemon.app import Daemon
from omsd.daemon.config.settings import Settings
from omsd.daemon.intake.feed import COMMIT_MAX, FeedPoller
from omsd.daemon.ops import logs
from omsd.daemon.tools.demo import free_port
from omsd.daemon.vtex.client import VtexClient
from omsd.daemon.vtex.models import feed_config_body
from omsd.daemon.vtex.rate import MARGIN
from omsd.sim.faults import Faults, Handler
from omsd.sim.feed import FeedQueue
from omsd.sim.server import DEFAULT_APP_KEY, DEFAULT_APP_TOKEN, Simulator
from omsd.state.store import Store

CONSUMER_CALLS_PER_S = 500 / 60
SENT: list[float] = []  # when omsd's client started each HTTP exchange (this process's clock)
_send = VtexClient._send


async def _recorded_send(self: VtexClient, *args: Any) -> Any:
    SENT.append(time.monotonic())
    return await _send(self, *args)


VtexClient._send = _recorded_send  # type: ignore[method-assign,assignment]


class SampledQueue(FeedQueue):
    """FeedQueue with a receive that looks at the first visible messages only."""

    def receive(self, maxlot: int, *, short: bool, duplicate_rate: float) -> list[dict[str, Any]]:
        now = self._clock()
        visible = list(itertools.islice((m for m in self.messages.values() if m.visible_at <= now), 100))
        out = []
        for m in self._rng.sample(visible, min(maxlot, len(visible))):
            handle = f"h.{m.msg_id}.{m.receipts}.{uuid.uuid4().hex[:12]}"
            m.receipts += 1
            m.visible_at = now + self.visibility_timeout_s
            self._handles[handle] = m.msg_id
            self.deliveries += 1
            out.append({**m.body, "handle": handle})
        return out


def load_backlog(sim: Simulator, events: int) -> None:
    """`events` feed events waiting in `sim`'s queue (a new order each), sampled (`SampledQueue`)."""
    sim.feed.queue = SampledQueue(sim.runtime.rng, sim.runtime.monotonic)
    for i in range(events):
        sim.feed.queue.put(
            {
                "eventId": uuid.uuid4().hex.upper(),
                "domain": "Fulfillment",
                "state": "ready-for-handling",
                "lastState": "waiting-for-authorization",
                "orderId": f"BKL{i:07d}-01",
                "lastChange": "2026-11-27T10:00:00.0000000Z",
                "currentChange": "2026-11-27T10:00:01.0000000Z",
            }
        )


class BenchSimulator(Simulator):
    """The simulator plus an arrival log and a route to load a backlog."""

    def __init__(self, latency_s: float) -> None:
        super().__init__(faults=Faults(latency_s=(latency_s, latency_s), short_batches=False), seed=1)
        self.feed.queue = SampledQueue(self.runtime.rng, self.runtime.monotonic)
        self.bench_arrivals: list[tuple[float, str, int]] = []  # when, what, items returned or handles committed

    def app(self) -> web.Application:
        app = super().app()
        app.middlewares.insert(0, self._log)
        app.router.add_post("/_bench/load", self._load)
        app.router.add_get("/_bench/log", self._read_log)
        return app

    @web.middleware
    async def _log(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith("/api/"):
            return await handler(request)
        arrived = time.monotonic()
        feed = request.path == "/api/orders/feed"
        size = len((await request.json()).get("handles", [])) if feed and request.method == "POST" else -1
        response = await handler(request)
        if feed and request.method == "GET" and isinstance(response, web.Response) and response.body:
            size = len(json.loads(bytes(response.body)))  # type: ignore[arg-type]
        # the kind as it always was (GET orders: the feed and its configuration alike); the size
        # is the items a feed GET returned or the handles a commit carried, -1 for other calls
        self.bench_arrivals.append((arrived, f"{request.method} {request.path.split('/')[2]}", size))
        return response

    async def _load(self, request: web.Request) -> web.Response:
        n = int(request.query["n"])
        load_backlog(self, n)
        self.bench_arrivals = []
        return web.json_response({"queued": n})

    async def _read_log(self, request: web.Request) -> web.Response:
        q = self.feed.queue
        return web.json_response(
            {
                "arrivals": self.bench_arrivals,
                "deleted": q.deleted,
                "queue": len(q.messages),
                "deliveries": q.deliveries,
            }
        )


def run_simulator(conn: Connection, latency_s: float) -> None:
    async def main() -> None:
        sim = BenchSimulator(latency_s)
        await sim.start()
        conn.send(sim.base_url)
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # until the parent is done
        await sim.stop()

    asyncio.run(main())


@dataclass
class Result:
    name: str
    events: int
    seconds: float
    calls: int
    busiest: int
    kinds: dict[str, int]
    busiest_burst: int = 0  # the busiest 100 ms
    busiest_sent: int = 0
    busiest_burst_sent: int = 0
    sizes: dict[str, list[int]] = field(default_factory=dict)  # per kind of call: items returned, handles committed
    per_second: list[int] = field(default_factory=list)  # calls in each second from the first
    deliveries: int = 0  # items the feed handed out (a re-read item counts again)

    @property
    def rate(self) -> float:
        return self.events / self.seconds


async def log_of(session: aiohttp.ClientSession, base: str) -> dict[str, Any]:
    async with session.get(f"{base}/_bench/log") as resp:
        answer: dict[str, Any] = await resp.json()
        return answer


def measure(name: str, log: dict[str, Any]) -> Result:
    """Events committed, and calls, from the first request to the last commit."""
    arrivals = [(float(t), kind, int(n)) for t, kind, n in log["arrivals"]]
    start = arrivals[0][0]
    end = max(t for t, kind, _ in arrivals if kind == "POST orders")
    within = [(t, kind, n) for t, kind, n in arrivals if t <= end]
    times = [t for t, _, _ in within]
    kinds: dict[str, int] = {}
    sizes: dict[str, list[int]] = {}
    per_second = [0] * (int(end - start) + 1)
    for t, kind, n in within:
        kinds[kind] = kinds.get(kind, 0) + 1
        sizes.setdefault(kind, []).append(n)
        per_second[int(t - start)] += 1
    result = Result(name, int(log["deleted"]), end - start, len(within), busiest_window(times), kinds)
    result.busiest_burst = busiest_window(times, 0.1)
    result.sizes, result.per_second, result.deliveries = sizes, per_second, int(log.get("deliveries", 0))
    return result


def budget_spent(r: Result, budget: float) -> None:
    """Where a drain's budget went: the calls by what they carried, what the client's
    margin keeps back by design, and the slots no call took (by second: the ramp-up at
    the start and the tail at the end against the rest)."""
    slots = budget * r.seconds
    gets = [n for n in r.sizes.get("GET orders", []) if n >= 0]
    posts = [n for n in r.sizes.get("POST orders", []) if n >= 0]
    full_gets = sum(1 for n in gets if n >= 10)
    full_posts = sum(1 for n in posts if n >= COMMIT_MAX)
    margin = slots * MARGIN / (1 + MARGIN)
    usable = budget / (1 + MARGIN)
    idle = [max(0.0, usable * min(1.0, r.seconds - s) - calls) for s, calls in enumerate(r.per_second)]
    print(f"{'':<32} where the budget went ({budget:g} calls/s x {r.seconds:.1f} s = {slots:.0f} slots):")
    rows = [
        ("GETs of 10 items", full_gets, ""),
        ("GETs of fewer", len(gets) - full_gets, f"({sum(n for n in gets if n < 10)} items)"),
        (f"commits of {COMMIT_MAX} handles", full_posts, ""),
        ("commits of fewer", len(posts) - full_posts, f"({sum(n for n in posts if n < COMMIT_MAX)} handles)"),
        ("other calls", r.calls - len(gets) - len(posts), ""),
        ("items read again", r.deliveries - r.events, "(their GETs are counted above)"),
        ("client's margin (by design)", round(margin), f"(at most {budget:g} calls a {1 + MARGIN:g} s)"),
        ("idle, first second", round(idle[0]), ""),
        ("idle, last second", round(idle[-1]) if len(idle) > 1 else 0, ""),
        ("idle, in between", round(sum(idle[1:-1])), ""),
    ]
    steady = sorted(r.per_second[1:-1]) or [0]
    print(f"{'':<34}calls a second: first {r.per_second[0]}, then min {steady[0]}, median {steady[len(steady) // 2]}, "
          f"max {steady[-1]} (the client's ceiling: {usable:.1f})")  # fmt: skip
    for what, n, note in rows:
        print(f"{'':<34}{what:<30} {n:>6} {n / slots:>7.1%} {note}")


def busiest_window(times: list[float], period: float = 1.0) -> int:
    """The most calls in any window [t, t + period) (sliding, starting at a call)."""
    return max((bisect.bisect_left(times, t + period) - i for i, t in enumerate(times)), default=0)


async def drain_with_omsd(
    base: str, events: int, budget: float, tmp: Path, intake_only: bool, durability: str = "local"
) -> Result:
    port = free_port()
    db = tmp / f"backlog-{budget:g}-{durability}.db"
    replicated: dict[str, Any] = (
        {"replica": f"file://{tmp / f'replica-{budget:g}'}", "durability": "replicated"}
        if durability == "replicated"
        else {}
    )
    settings = Settings(
        account="simstore", app_key=DEFAULT_APP_KEY, app_token=DEFAULT_APP_TOKEN, vtex_base_url=base,
        db=db, connector_name="bench", connector_endpoint=f"http://127.0.0.1:{port}",
        listen=f"127.0.0.1:{port}", source="feed", rate_limit_per_s=budget, poll_interval_s=1.0, **replicated,
    )  # fmt: skip
    async with aiohttp.ClientSession() as session:
        await session.post(f"{base}/_bench/load", params={"n": str(events)})
        SENT.clear()
        stop = asyncio.Event()
        task = asyncio.create_task(intake(settings, stop) if intake_only else Daemon(settings).run(stop))
        while (await log_of(session, base))["deleted"] < events and not task.done():  # noqa: ASYNC110 - remote state
            await asyncio.sleep(0.5)
        stop.set()
        await task
        name = f"omsd{' intake only' if intake_only else ''}, budget {budget:g}/s, {durability}"
        result = measure(name, await log_of(session, base))
        result.busiest_sent = busiest_window(sorted(SENT))
        result.busiest_burst_sent = busiest_window(sorted(SENT), 0.1)
        return result


async def intake(settings: Settings, stop: asyncio.Event) -> None:
    """omsd's feed poller and VTEX client alone: no processor, no effects (the feed's
    configuration made first, as the daemon's start-up does)."""
    async with await Store.open(settings.db) as store, aiohttp.ClientSession() as session:
        vtex = VtexClient(settings, session)
        await vtex.save_feed_config(feed_config_body(settings))
        await FeedPoller(store, vtex, settings).run(stop)


async def drain_plainly(base: str, events: int, seconds: float) -> Result:
    """One loop: GET, commit, act; never more than 500 calls a minute."""
    headers = {
        "X-VTEX-API-AppKey": DEFAULT_APP_KEY,
        "X-VTEX-API-AppToken": DEFAULT_APP_TOKEN,
        "Accept": "application/json",
        "Content-Type": "application/json",
    }
    acted: set[str] = set()
    async with aiohttp.ClientSession(headers=headers) as session:
        await session.post(f"{base}/_bench/load", params={"n": str(events)})
        deadline = time.monotonic() + seconds
        next_call = time.monotonic()

        async def call(method: str, **kw: Any) -> Any:
            nonlocal next_call
            await asyncio.sleep(max(0.0, next_call - time.monotonic()))
            next_call = max(next_call, time.monotonic()) + 1 / CONSUMER_CALLS_PER_S
            async with session.request(method, f"{base}/api/orders/feed", **kw) as resp:
                return await resp.json() if method == "GET" else None

        while time.monotonic() < deadline:
            items = await call("GET", params={"maxlot": "10"})
            if not items:
                break
            await call("POST", json={"handles": [i["handle"] for i in items]})
            acted.update(i["orderId"] for i in items)  # act: here, only remember the order
        return measure("plain consumer (500 calls/min)", await log_of(session, base))


def report(results: list[Result], budgets: list[float], baseline: Result) -> None:
    print(f"{'run':<32} {'events':>7} {'s':>6} {'events/s':>9} {'calls/s':>8} {'of budget':>9} {'busiest 1 s':>11}")
    for r, budget in zip(results, [*budgets, CONSUMER_CALLS_PER_S], strict=True):
        per_s = r.calls / r.seconds
        print(
            f"{r.name:<32} {r.events:>7} {r.seconds:>6.1f} {r.rate:>9.1f} {per_s:>8.1f} "
            f"{per_s / budget:>8.0%} {r.busiest:>6} / {budget:g}"
        )
        print(f"{'':<32} calls: {r.kinds}; x{r.rate / baseline.rate:.1f} the plain consumer")
        if r.busiest_sent:
            budget_spent(r, budget)
        print(f"{'':<32} busiest 100 ms at the simulator: {r.busiest_burst} / {budget / 10:g}")
        if r.busiest_sent:
            print(
                f"{'':<32} as sent by omsd's client: busiest 1 s {r.busiest_sent} / {budget:g}, "
                f"busiest 100 ms {r.busiest_burst_sent} / {math.ceil(budget / 10)}"
            )
        if r.busiest_sent and r.busiest > budget:  # omsd runs only: the plain consumer is a baseline
            print(f"{'':<32} OVER BUDGET: {r.busiest} calls reached the simulator within one second")


async def main(
    events: int,
    budgets: list[float],
    latency_s: float,
    baseline_s: float,
    intake_only: bool,
    durabilities: tuple[str, ...] = ("local",),
) -> None:
    logs.configure("warning", "json")
    parent, child = multiprocessing.Pipe()
    proc = multiprocessing.get_context("spawn").Process(target=run_simulator, args=(child, latency_s))
    proc.start()
    base = parent.recv()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            runs = [(b, d) for b in budgets for d in durabilities]
            results = [await drain_with_omsd(base, events, b, Path(tmp), intake_only, d) for b, d in runs]
        baseline = await drain_plainly(base, events, baseline_s)
    finally:
        parent.send("stop")
        proc.join(10)
    report([*results, baseline], [b for b in budgets for _ in durabilities], baseline)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--budgets", default="20,100")
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--baseline-seconds", type=float, default=60.0)
    parser.add_argument("--intake-only", action="store_true", help="the feed poller alone, no processor")
    parser.add_argument(
        "--durability",
        default="local",
        help="OMSD_DURABILITY per run, e.g. local,replicated (replicated: Litestream, a file:// replica)",
    )
    args = parser.parse_args()
    budgets = [float(b) for b in args.budgets.split(",")]
    durabilities = tuple(args.durability.split(","))
    asyncio.run(main(args.events, budgets, args.latency, args.baseline_seconds, args.intake_only, durabilities))
