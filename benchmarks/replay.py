"""Replay speed and memory: `omsd replay`, end to end, on a generated journal of about
1,000,000 events, beside a baseline in the same run.

    .venv/bin/python benchmarks/replay.py [--events 1000000] [--db PATH] [--baseline REF] [--runs N]
    .venv/bin/python benchmarks/replay.py --events 300000 --profile      # cProfile of the replay, in-process

Each generated order lives a full approval in 10 journal rows: first sight, held, an
approval intent by marketplace id (parked: ids are linked lazily), the link lookup
for it and its Get order answer (which links the ids and releases the intent),
released, the pre-approval Get order, the PUT and its SOI003, the SOI002
notification, handling. The generator applies one order's rows as the daemon does
(`state.apply`: routing and the machine) to answer each effect with the right
sequence number, and stores the state they give as the derived state; the others
are that journal with their own ids, a thousand orders interleaved.

Then `python -m omsd.daemon replay` (what `omsd replay` runs) in a process of its own,
for the baseline (`--baseline REF`: that commit's code, see benchmarks/commands.py)
and for this tree, `--runs` times each, alternating: wall time, events per second, the
command's peak RSS, and whether every order it leaves equals the generated one.
`--db` keeps the generated database and reuses it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import os
import platform
import pstats
import sqlite3
import sys
import tempfile
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import commands

from omsd.daemon.tools import replay
from omsd.state.apply import Applier, read
from omsd.state.batch import JournalRow
from omsd.state.codes import ResultCode
from omsd.state.events import (
    AnyEntry,
    ApprovalAnswered,
    IntentReceived,
    NotificationReceived,
    OrderFetched,
    Resync,
    StatusChanged,
    current_version,
)
from omsd.state.models import Order, Policy, SendApproval
from omsd.state.statuses import Phase
from omsd.state.store import Batch, NewEntry, Store

T0 = datetime(2026, 1, 1, tzinfo=UTC)
FLOW = ["order-accepted", "waiting-for-manual-authorization", "waiting-ffmt-authorization", "ready-for-handling"]


def _life(n: int) -> tuple[list[tuple[AnyEntry, datetime]], Order]:
    """One order's journal entries and the state the daemon reaches on them.

    The entries are what the daemon would journal: status changes; an intent naming
    only the marketplace id (parked: ids are linked lazily); the link lookup the
    parked-intents job asks for (a resync) and its Get order answer, which links the
    ids and releases the intent; the release; the pre-approval Get order, the PUT and
    its SOI003; the SOI002 notification (by omsd's secret path); handling. Each effect
    is answered at once, as the effect runner would. The state is what `state.apply`
    (routing and the machine, as the processor runs them) gives on these rows, so the
    benchmarks compare a replay, or the processor, with the daemon's own reading."""
    oid, mkt = f"MKP-{n}-01", f"M{n}"
    t = T0 + timedelta(seconds=n)
    applier = Applier(Policy())
    out: list[tuple[AnyEntry, datetime]] = []
    status = FLOW[0]

    def feed(entry: AnyEntry) -> None:
        nonlocal t
        t += timedelta(milliseconds=10)
        out.append((entry, t))
        kind = entry.kind
        order_id, payload = getattr(entry, "order_id", None), entry.model_dump_json()
        row = JournalRow(len(out), kind, "bench", order_id, payload, None, t, current_version(kind))
        done = len(applier.batch.effects)
        applier.apply(row, read(row))
        for effect in applier.batch.effects[done:]:  # answer each effect at once, as the effect runner would
            if isinstance(effect, SendApproval):
                feed(ApprovalAnswered(order_id=oid, seq=effect.seq, code=ResultCode.ENQUEUED, http_status=200))
            else:
                feed(OrderFetched(order_id=oid, seq=effect.seq, status=status, marketplace_order_id=mkt, fetched_at=t))

    for k, state in enumerate(FLOW):
        status = state
        feed(StatusChanged(order_id=oid, source="feed", state=state, current_change=t + timedelta(seconds=k)))
        if k == 1:
            feed(IntentReceived(marketplace_order_id=mkt, source="api"))
            feed(Resync(order_id=oid, reason="link lookup for a parked intent"))
        if k == 2:
            code, flow = ResultCode.APPROVED, "ApproveOrder"
            feed(NotificationReceived(marketplace_order_id=mkt, code=code, flow=flow, authenticated=True))
    final = applier.finish().orders[oid]
    if final.phase != Phase.APPROVED or final.sent != 1:
        raise RuntimeError(f"the generated life does not end approved after one PUT: {final}")
    return out, final


async def generate(store: Store, events: int) -> None:
    """Append ~`events` journal entries (see `append_lives`) and store the state the
    machine reached as the derived state."""
    orders = await append_lives(store, events)
    total = await store.journal.last_offset()
    await store.derived.commit(Batch(offset=total, orders=orders), now=T0)


async def append_lives(store: Store, events: int) -> dict[str, Order]:
    """Append ~`events` journal entries, orders interleaved a thousand at a time; returns
    the state the machine reaches on them. Every order lives the same life (the machine
    is driven once; the others are that journal with their own ids)."""
    life, final = _life(0)
    template = [(NewEntry.of(e, source="bench", received_at=at), at) for e, at in life]
    orders: dict[str, Order] = {}
    n = total = 0
    while total < events:
        group = range(n, n + 1000)
        rows = [_renamed(entry, i) for entry, _ in template for i in group]
        await store.journal.append(rows, now=T0)
        orders.update((f"MKP-{i}-01", Order.model_validate_json(_rename(final.model_dump_json(), i))) for i in group)
        n += 1000
        total += len(rows)
    return orders


def _rename(text: str, i: int) -> str:
    return text.replace('"MKP-0-01"', f'"MKP-{i}-01"').replace('"M0"', f'"M{i}"')


def _renamed(entry: NewEntry, i: int) -> NewEntry:
    order_id = f"MKP-{i}-01" if entry.order_id is not None else None
    return replace(entry, payload=_rename(entry.payload, i), order_id=order_id)


def identical(db: Path) -> bool:
    """Every order in the database is the generated one (the life of order 0, renamed)."""
    _, final = _life(0)
    text = final.model_dump_json()
    with contextlib.closing(sqlite3.connect(db)) as conn:
        lives = conn.execute("SELECT COUNT(*) FROM orders").fetchone()[0]
        expected_lives = conn.execute('SELECT MAX("offset") FROM journal').fetchone()[0] // len(_life(0)[0])
        rows = conn.execute("SELECT order_id, data FROM orders")
        same = all(data == _rename(text, int(order_id.split("-")[1])) for order_id, data in rows)
    return same and lives == expected_lives


async def profiled(path: Path) -> None:
    async with await Store.open(path) as store:
        profiler = cProfile.Profile()
        profiler.enable()
        result = await replay.plan(store, Policy())
        await replay.apply(store, result, datetime.now(UTC))
        profiler.disable()
        await result.close()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


async def generated(path: Path, events: int) -> int:
    async with await Store.open(path) as store:
        if await store.journal.last_offset() == 0:
            start = time.perf_counter()
            await generate(store, events)
            print(f"generated {await store.journal.last_offset():,} events in {time.perf_counter() - start:.1f} s")
        return await store.journal.last_offset()


def main(events: int, db: Path | None, baseline_ref: str | None, runs: int, profile: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp, commands.baseline(baseline_ref) as base:
        path = db or Path(tmp) / "replay.db"
        total = asyncio.run(generated(path, events))
        if profile:
            asyncio.run(profiled(path))
            return
        codes = ([base] if base else []) + [commands.Code("this tree")]
        print(f"`omsd replay` of {total:,} journal events ({total // len(_life(0)[0]):,} orders), end to end")
        print(f"{'code':<22} {'s':>7} {'events/s':>9} {'peak RSS':>9}  identical")
        for _ in range(runs):
            for code in codes:
                done = commands.run(code, path, ["replay"])
                same = "yes" if done.returncode == 0 and identical(path) else "NO"
                rss = f"{done.peak_rss_mib:.0f} MiB"
                print(
                    f"{code.name:<22} {done.seconds:>7.1f} {total / done.seconds:>9,.0f} {rss:>9}  {same}", flush=True
                )
        size = sum(p.stat().st_size for p in path.parent.iterdir() if p.name.startswith(path.name))
        where = f"Python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} cores"
        print(f"database {size / 1e6:.0f} MB; {where}; load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--db", type=Path, help="keep the generated journal here (reused when it exists)")
    parser.add_argument("--baseline", metavar="REF", help="also run the code of this git commit, in the same run")
    parser.add_argument("--runs", type=int, default=1, help="runs of each code, alternating")
    parser.add_argument("--profile", action="store_true", help="print the top of a cProfile of the replay instead")
    args = parser.parse_args()
    from omsd.daemon.ops import logs

    logs.configure("warning", "json")
    main(args.events, args.db, args.baseline, args.runs, args.profile)
