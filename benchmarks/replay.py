"""Replay speed: rebuild order state from a generated journal of ~1,000,000 events.

    .venv/bin/python benchmarks/replay.py [--events 1000000] [--db PATH] [--profile]

Each generated order lives a full approval in 10 journal rows: first sight, held, an
approval intent by marketplace id (parked: ids are linked lazily), the link lookup
for it and its Get order answer (which links the ids and releases the intent),
released, the pre-approval Get order, the PUT and its SOI003, the SOI002
notification, handling. The generator applies one order's rows as the daemon does
(`state.apply`: routing and the machine) to answer each effect with the right
sequence number, and stores the state they give as the "stored" state. The
benchmark then runs `omsd replay`'s own code (plan + apply) and checks that every
rebuilt order equals the stored one. Prints the figures docs/benchmarks.md records.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import platform
import pstats
import resource
import tempfile
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

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
    await store.derived.replace(Batch(offset=total, orders=orders), only=None, cursor=total, reissue=(), now=T0)


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


async def main(events: int, db: Path | None, profile: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = db or Path(tmp) / "replay.db"
        async with await Store.open(path) as store:
            if await store.journal.last_offset() == 0:
                start = time.perf_counter()
                await generate(store, events)
                print(f"generated {await store.journal.last_offset():,} events in {time.perf_counter() - start:.1f} s")
            stored = await store.read.orders_by_id()
            total = await store.journal.last_offset()
            profiler = cProfile.Profile() if profile else None
            start, cpu = time.perf_counter(), time.process_time()
            if profiler:
                profiler.enable()
            result = await replay.plan(store, Policy())
            rebuilt_s = time.perf_counter() - start
            await replay.apply(store, result, datetime.now(UTC))
            elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
            if profiler:
                profiler.disable()
                pstats.Stats(profiler).sort_stats("tottime").print_stats(15)
            same = await store.read.orders_by_id() == stored
            summary = result.summary()
            print(
                f"replay: {total:,} events, {len(stored):,} orders: rebuilt in memory in {rebuilt_s:.1f} s, "
                f"written in {elapsed - rebuilt_s:.1f} s; {total / elapsed:,.0f} events/s overall "
                f"({total / rebuilt_s:,.0f} events/s rebuild; {total / cpu:,.0f} events per CPU second overall)"
            )
            print(f"rebuilt state identical to the stored one: {same} (summary {summary})")
            size = sum(p.stat().st_size for p in path.parent.iterdir() if p.name.startswith(path.name))
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            where = f"Python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} cores"
            print(f"database {size / 1e6:.0f} MB; peak RSS {rss:.0f} MB; {where}")
            if not same:
                raise SystemExit(1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--db", type=Path, help="keep the generated journal here (reused when it exists)")
    parser.add_argument("--profile", action="store_true", help="print the top of a cProfile of the replay")
    args = parser.parse_args()
    from omsd.daemon.ops import logs

    logs.configure("warning", "json")
    asyncio.run(main(args.events, args.db, args.profile))
