"""How omsd's VTEX client settles when the account's real limit is below its configured rate.

    .venv/bin/python benchmarks/rate_adapt.py [--seconds 180] [--settle 60] [--limit 8] [--rate 10] [--workers 20]

A loopback fake VTEX allows `--limit` Get order calls per one-second window and
answers 429 with `Retry-After` (whole seconds to the window's end) beyond. omsd's
client, configured for `--rate`/s, is driven by `--workers` callers for
`--seconds`, once with the adaptive rate disabled (`OMSD_RATE_ADAPT=false`, the baseline)
and once enabled.
Prints, per 5 s, the 429s and the effective rate of each run side by side, then
a summary: 429s per minute, successful calls per second, and requests that
reached the server inside a Retry-After window it had announced (more than
50 ms after the 429 was sent, so requests already in flight do not count); and
the same rates once settled, after the first `--settle` seconds. The adaptive
rate probes a limit it found slowly (a step per 30 s near it), so a run shorter
than a couple of minutes shows mostly the first search for the limit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import time
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from omsd.daemon.config.settings import Settings
from omsd.daemon.ops import logs
from omsd.daemon.ops.metrics import Metrics
from omsd.daemon.vtex.client import VtexClient
from omsd.daemon.vtex.errors import RateLimited

IN_FLIGHT_S = 0.05


@dataclass
class FakeVtex:
    """Fixed one-second windows from `t0`, `limit` calls each; the rest get 429."""

    limit: int
    t0: float = field(default_factory=time.monotonic)
    counts: dict[int, int] = field(default_factory=dict)
    ok: list[float] = field(default_factory=list)
    limited: list[float] = field(default_factory=list)
    closed: list[tuple[float, float]] = field(default_factory=list)  # (429 sent, Retry-After end)
    early: int = 0

    async def order(self, request: web.Request) -> web.Response:
        now = time.monotonic() - self.t0
        if any(sent + IN_FLIGHT_S < now < until for sent, until in self.closed[-20:]):
            self.early += 1
        window = math.floor(now)
        self.counts[window] = self.counts.get(window, 0) + 1
        if self.counts[window] > self.limit:
            retry_after = max(1, math.ceil(window + 1 - now))
            self.limited.append(now)
            self.closed.append((now, now + retry_after))
            return web.Response(status=429, headers={"Retry-After": str(retry_after)})
        self.ok.append(now)
        return web.json_response({"orderId": request.match_info["order_id"], "status": "handling"})


@dataclass
class Run:
    fake: FakeVtex
    rates: list[float]  # effective rate sampled once a second


async def one_run(seconds: float, limit: int, rate: float, workers: int, adapt: bool) -> Run:
    fake = FakeVtex(limit)
    app = web.Application()
    app.router.add_get("/api/oms/pvt/orders/{order_id}", fake.order)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    settings = Settings(
        account="bench", app_key="vtexappkey-bench", app_token="bench-app-token", connector_name="bench",
        connector_endpoint="http://127.0.0.1:9", vtex_base_url=f"http://127.0.0.1:{port}", rate_limit_per_s=rate,
        rate_adapt=adapt,
    )  # fmt: skip
    metrics = Metrics()
    rates: list[float] = []
    async with aiohttp.ClientSession() as session:
        client = VtexClient(settings, session, metrics=metrics)
        fake.t0 = time.monotonic()
        deadline = fake.t0 + seconds

        async def worker(w: int) -> None:
            n = 0
            while time.monotonic() < deadline:
                n += 1
                with contextlib.suppress(RateLimited):
                    await client.get_order(f"B-{w}-{n}")

        async def sampler() -> None:
            while time.monotonic() < deadline:
                rates.append(metrics.sample("omsd_vtex_rate_limit_effective_per_second"))
                await asyncio.sleep(1.0)

        await asyncio.gather(sampler(), *(worker(w) for w in range(workers)))
    await runner.cleanup()
    return Run(fake, rates)


def per_bucket(times: list[float], bucket_s: int, buckets: int) -> list[int]:
    counts = [0] * buckets
    for t in times:
        counts[min(buckets - 1, int(t // bucket_s))] += 1
    return counts


def report(seconds: float, settle: float, base: Run, adapt: Run, bucket_s: int = 5) -> None:
    buckets = math.ceil(seconds / bucket_s)
    b429, a429 = per_bucket(base.fake.limited, bucket_s, buckets), per_bucket(adapt.fake.limited, bucket_s, buckets)
    print(f"{'t (s)':>8} | {'baseline 429s':>13} {'rate/s':>7} | {'adaptive 429s':>13} {'rate/s':>7}")
    for i in range(buckets):
        lo = i * bucket_s
        b_rate = base.rates[min(lo + bucket_s - 1, len(base.rates) - 1)]
        a_rate = adapt.rates[min(lo + bucket_s - 1, len(adapt.rates) - 1)]
        print(f"{lo:>3}-{lo + bucket_s:<4} | {b429[i]:>13} {b_rate:>7.2f} | {a429[i]:>13} {a_rate:>7.2f}")
    print()
    for name, run in (("baseline", base), ("adaptive", adapt)):
        f = run.fake
        print(
            f"{name:>8}: {len(f.limited) * 60 / seconds:6.1f} 429s/min  {len(f.ok) / seconds:5.2f} ok calls/s  "
            f"{f.early} requests inside an announced Retry-After window"
        )
    if 0 < settle < seconds:
        span = seconds - settle
        for name, run in (("baseline", base), ("adaptive", adapt)):
            limited = sum(1 for t in run.fake.limited if t >= settle)
            ok = sum(1 for t in run.fake.ok if t >= settle)
            print(f"{name:>8}, after {settle:g} s: {limited * 60 / span:6.1f} 429s/min  {ok / span:5.2f} ok calls/s")


async def main(seconds: float, settle: float, limit: int, rate: float, workers: int) -> None:
    logs.configure("error", "json")
    base = await one_run(seconds, limit, rate, workers, adapt=False)
    adapt = await one_run(seconds, limit, rate, workers, adapt=True)
    print(f"fake VTEX allows {limit} calls per 1-s window; client configured for {rate:g}/s, {workers} callers\n")
    report(seconds, settle, base, adapt)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=180.0)
    parser.add_argument("--settle", type=float, default=60.0, help="also report the rates after this many seconds")
    parser.add_argument("--limit", type=int, default=8)
    parser.add_argument("--rate", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=20)
    args = parser.parse_args()
    asyncio.run(main(args.seconds, args.settle, args.limit, args.rate, args.workers))
