"""Replay speed: rebuild order state from a generated journal of ~1,000,000 events.

    .venv/bin/python benchmarks/replay.py [--events 1000000] [--db PATH] [--profile]

Each generated order lives a full approval: first sight (a link Get order), held,
an approval intent by marketplace id (parked, then routed), released, the
pre-approval Get order, the PUT and its answer, the notification, handling. The
generator drives the pure machine per order to answer each effect with the right
sequence number, and stores the state it reached as the "stored" state. The
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
from omsd.state.codes import ResultCode
from omsd.state.events import (
    AnyEntry,
    ApprovalAnswered,
    Event,
    IntentReceived,
    IntentRecorded,
    NotificationReceived,
    OrderFetched,
    StatusChanged,
)
from omsd.state.machine import decide
from omsd.state.models import Order, Policy, SendApproval
from omsd.state.store import Batch, NewEntry, Store

T0 = datetime(2026, 1, 1, tzinfo=UTC)
FLOW = ["order-accepted", "waiting-for-manual-authorization", "waiting-ffmt-authorization", "ready-for-handling"]


def _life(n: int) -> tuple[list[tuple[AnyEntry, datetime]], Order]:
    """One order's journal entries and the state the machine reaches on them."""
    oid, mkt = f"MKP-{n}-01", f"M{n}"
    t = T0 + timedelta(seconds=n)
    order: Order | None = None
    out: list[tuple[AnyEntry, datetime]] = []
    status = FLOW[0]

    def feed(event: Event, routed: AnyEntry | None = None) -> None:
        nonlocal order, t
        t += timedelta(milliseconds=10)
        out.append((routed or event, t))
        decision = decide(order, event, t, Policy())
        order = decision.order
        for effect in decision.effects:  # answer each effect at once, as the effect runner would
            if isinstance(effect, SendApproval):
                feed(ApprovalAnswered(order_id=oid, seq=effect.seq, code=ResultCode.ENQUEUED, http_status=200))
            else:
                feed(OrderFetched(order_id=oid, seq=effect.seq, status=status, marketplace_order_id=mkt, fetched_at=t))

    for k, state in enumerate(FLOW):
        status = state
        feed(StatusChanged(order_id=oid, source="feed", state=state, current_change=t + timedelta(seconds=k)))
        if k == 1:
            feed(
                IntentRecorded(order_id=oid, marketplace_order_id=mkt, source="api"),
                IntentReceived(marketplace_order_id=mkt, source="api"),
            )
        if k == 2:
            note = NotificationReceived(marketplace_order_id=mkt, code=ResultCode.APPROVED, flow="ApproveOrder")
            feed(_routed(note, oid), note)
    assert order is not None
    return out, order


def _routed(note: NotificationReceived, oid: str) -> Event:
    from omsd.state.events import ResultNotified

    return ResultNotified(order_id=oid, marketplace_order_id=note.marketplace_order_id, code=note.code, flow=note.flow)


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
