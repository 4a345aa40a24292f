"""How much omsd logs: lines and bytes per idle hour, and per order that ends approved,
rejected or dead, at the log level an operator runs (info, JSON, as journald stores it).

    .venv/bin/python benchmarks/logs.py [--idle-seconds 900] [--orders 10] [--source feed]
                                        [--baseline /work/wt-baseline/.venv/bin/omsd] [--levels info]

The simulator runs in this process; omsd is a real `omsd run` process with the Settings'
defaults (feed polled every 5 s, every scheduled job at its own interval), its stdout to a
file, so every line an operator would find in journald is counted. Only the retry backoff
is shortened (OMSD_RETRY_BASE_S=0.1, OMSD_RETRY_CAP_S=0.5) so that an order goes dead in
seconds rather than minutes; it makes the same number of attempts (OMSD_MAX_ATTEMPTS, 8).

1. Idle: from 5 s after `omsd_ready`, `--idle-seconds` of an omsd with nothing to do (the
   periodic summary comes every 300 s: measure at least 900 s for a steady figure).
2. Per order, one kind at a time, `--orders` orders of the kind at once, each handed to omsd
   with both ids (`POST /v1/approvals`) once the feed showed it:
   - tracking: never held, and never handed to omsd (it follows their statuses only);
   - approved: never held;
   - rejected: held, then canceled by the simulated seller 15 s later;
   - dead: every approval PUT answered HTTP 500 EOI000, until the retry budget is spent.
   Lines naming one of the kind's orders (`order_id` or `marketplace_order_id`) are that
   order's; the other lines written meanwhile are shown apart.

`--baseline OMSD` runs the same with another omsd executable (an older checkout's
`.venv/bin/omsd`), side by side; `--levels info,debug` adds a run at another level.
Line and byte counts do not depend on the machine's load (the schedule fixes them).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from restarts import API_TOKEN, omsd_env

from omsd.daemon.tools.demo import free_port
from omsd.sim.server import Simulator

HERE = Path(sys.executable).parent / "omsd"
KINDS = ("tracking", "approved", "rejected", "dead")


@dataclass
class Window:
    """The lines a log file gained between two points."""

    lines: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.lines)

    @property
    def bytes(self) -> int:
        return sum(len(line.encode()) + 1 for line in self.lines)

    def parsed(self) -> list[dict[str, Any]]:
        out = []
        for line in self.lines:
            try:
                out.append(json.loads(line[line.index("{") :]))  # after a `<N>` prefix, if any
            except ValueError:
                out.append({"event": "(not JSON)"})
        return out


class LogFile:
    def __init__(self, path: Path) -> None:
        self.path = path

    def mark(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def since(self, mark: int, until: int | None = None) -> Window:
        with self.path.open("rb") as f:
            f.seek(mark)
            data = f.read() if until is None else f.read(until - mark)
        return Window([line for line in data.decode(errors="replace").splitlines() if line.strip()])

    async def wait_for(self, event: str, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.path.exists() and f'"event": "{event}"' in self.path.read_text(errors="replace"):
                return
            await asyncio.sleep(0.2)
        raise RuntimeError(f"no {event} in {self.path} within {timeout_s} s")


def env_for(sim: Simulator, db: Path, port: int, source: str, level: str) -> dict[str, str]:
    """restarts.py's environment for a real `omsd run`, at `level`, with the short backoff."""
    env = omsd_env(sim, db, port, source)
    env.pop("JOURNAL_STREAM", None)  # count plain lines, whatever runs this script
    env.update({"OMSD_LOG_LEVEL": level, "OMSD_RETRY_BASE_S": "0.1", "OMSD_RETRY_CAP_S": "0.5"})
    if source != "feed":
        env["OMSD_HOOK_URL"] = f"http://127.0.0.1:{port}/vtex/hook"
    return env


async def _view(session: aiohttp.ClientSession, url: str, order_id: str) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {API_TOKEN}"}
    async with session.get(f"{url}/v1/orders/{order_id}", headers=headers) as resp:
        return dict(await resp.json()) if resp.status == 200 else {}


async def _phase(session: aiohttp.ClientSession, url: str, order_id: str) -> str | None:
    phase = (await _view(session, url, order_id)).get("phase")
    return None if phase is None else str(phase)


async def _followed(sim: Simulator, session: aiohttp.ClientSession, url: str, made: dict[str, str]) -> bool:
    """Every order is in omsd, tracked, with the status the simulator gives it now."""
    views = [await _view(session, url, order_id) for order_id in made]
    return all(v.get("phase") == "tracking" and v.get("status") == sim.orders[v["orderId"]].status for v in views)


async def _orders(sim: Simulator, url: str, kind: str, n: int, tag: str) -> dict[str, str]:
    """Create `n` orders of `kind`, hand each to omsd once the feed showed it, wait for the end."""
    sim.faults.rate_eoi000 = 1.0 if kind == "dead" else 0.0
    made = {}
    for i in range(n):
        mkt = f"{tag}{kind[0].upper()}{i}"
        held = kind == "rejected"
        # the seller cancels a held order after the intent reached omsd (the feed shows it within a poll)
        order = sim.create(mkt, held=held, decision="reject" if held else "authorize", decide_after_s=15.0)
        made[order.order_id] = mkt
    async with aiohttp.ClientSession() as session:
        headers = {"Authorization": f"Bearer {API_TOKEN}"}
        pending = set(made) if kind != "tracking" else set()  # nobody asks omsd to approve these
        for _ in range(1200 if kind == "tracking" else 0):  # until omsd follows them, at most 10 minutes
            if await _followed(sim, session, url, made):
                break
            await asyncio.sleep(0.5)
        while pending:  # hand each over once omsd has it from the feed (a connector would wait too)
            for order_id in list(pending):
                if await _phase(session, url, order_id) is not None:
                    body = {"marketplaceOrderId": made[order_id], "orderId": order_id}
                    async with session.post(f"{url}/v1/approvals", json=body, headers=headers) as resp:
                        assert resp.status == 202, await resp.text()
                    pending.discard(order_id)
            await asyncio.sleep(0.2)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            phases = [await _phase(session, url, order_id) for order_id in made]
            if all(p == kind for p in phases):
                break
            await asyncio.sleep(0.5)
        else:
            raise RuntimeError(f"{kind}: orders ended {Counter(phases)}")
    await asyncio.sleep(2.0)  # the last lines of the outcome (a late notification) land in its window
    sim.faults.rate_eoi000 = 0.0
    return made


@dataclass
class Result:
    label: str
    idle_s: float = 0.0
    idle: Window = field(default_factory=Window)
    per_kind: dict[str, tuple[Window, Window, int]] = field(default_factory=dict)  # theirs, others, orders


async def measure(omsd: str, label: str, level: str, args: argparse.Namespace) -> Result:
    result = Result(label)
    sim = Simulator(seed=3)
    await sim.start()
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="omsd-logs-") as tmp:
        out = Path(tmp) / "omsd.out"
        env = env_for(sim, Path(tmp) / "omsd.db", port, args.source, level)
        with out.open("w") as stdout:
            proc = await asyncio.create_subprocess_exec(omsd, "run", env=env, stdout=stdout, stderr=stdout)
        log = LogFile(out)
        url = f"http://127.0.0.1:{port}"
        try:
            await log.wait_for("omsd_ready")
            await asyncio.sleep(5.0)
            start, t0 = log.mark(), time.monotonic()
            await asyncio.sleep(args.idle_seconds)
            result.idle_s = time.monotonic() - t0
            result.idle = log.since(start)
            for kind in KINDS:
                begin = log.mark()
                made = await _orders(sim, url, kind, args.orders, tag=label[:1].upper())
                window = log.since(begin)
                ids = set(made) | set(made.values())
                theirs, others = Window(), Window()
                for line, parsed in zip(window.lines, window.parsed(), strict=True):
                    named = parsed.get("order_id") in ids or parsed.get("marketplace_order_id") in ids
                    (theirs if named else others).lines.append(line)
                result.per_kind[kind] = (theirs, others, len(made))
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout=30)
            except TimeoutError:
                proc.kill()
                await proc.wait()
            await sim.stop()
    return result


def _events(window: Window, top: int = 6) -> str:
    counts = Counter((p.get("event"), p.get("level")) for p in window.parsed())
    return ", ".join(f"{e} ({lvl}) {n}" for (e, lvl), n in counts.most_common(top)) or "-"


def report(results: list[Result]) -> None:
    print(f"{'run':<28} {'figure':<30} {'lines':>9} {'bytes':>11}   what")
    for r in results:
        hour = 3600 / r.idle_s if r.idle_s else 0.0
        print(
            f"{r.label:<28} {'idle, per hour':<30} {r.idle.count * hour:>9,.0f} {r.idle.bytes * hour:>11,.0f}   "
            f"measured {r.idle.count} lines, {r.idle.bytes:,} B in {r.idle_s:.0f} s: {_events(r.idle)}"
        )
        for kind, (theirs, others, n) in r.per_kind.items():
            print(
                f"{'':<28} {f'per {kind} order':<30} {theirs.count / n:>9,.1f} {theirs.bytes / n:>11,.0f}   "
                f"{n} orders: {_events(theirs)}"
            )
            print(
                f"{'':<28} {'  + other lines meanwhile':<30} {others.count:>9,} {others.bytes:>11,}   {_events(others)}"
            )


async def main(args: argparse.Namespace) -> None:
    runs: list[tuple[str, str, str]] = [(str(HERE), f"omsd ({level})", level) for level in args.levels.split(",")]
    if args.baseline:
        runs.append((args.baseline, "baseline (info)", "info"))
    results = [await measure(omsd, label, level, args) for omsd, label, level in runs]
    report(results)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--idle-seconds", type=float, default=900.0)
    parser.add_argument("--orders", type=int, default=10, help="orders of each kind (default 10)")
    parser.add_argument("--source", choices=["feed", "hook", "both"], default="feed")
    parser.add_argument("--levels", default="info", help="comma-separated OMSD_LOG_LEVELs for this tree's omsd")
    parser.add_argument("--baseline", metavar="OMSD", help="another omsd executable to measure the same way")
    asyncio.run(main(parser.parse_args()))
