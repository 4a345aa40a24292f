"""Throughput of the durable parts: feed intake (journal + handles, fsync per batch)
and the processor (journal → machine → one transaction per batch); then the size of
the database per journal event before and after a prune (every order approved and
quiet for longer than the retention).

    .venv/bin/python benchmarks/journal.py [--orders 2000] [--events-per-order 5]

Prints one line per measurement; docs/benchmarks.md records the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from omsd.daemon.intake.entries import feed_item
from omsd.daemon.ops import retention
from omsd.daemon.pipeline.processor import Processor
from omsd.state.events import IntentRecorded
from omsd.state.models import Policy
from omsd.state.store import NewEntry, Store, database_bytes

FLOW = [
    "order-accepted",
    "waiting-for-manual-authorization",
    "waiting-ffmt-authorization",
    "authorize-fulfillment",
    "ready-for-handling",
]


async def main(orders: int, per_order: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        async with await Store.open(Path(tmp) / "bench.db") as store:
            t0 = datetime(2026, 1, 1, tzinfo=UTC)
            items = []
            for o in range(orders):
                for k in range(per_order):
                    state = FLOW[k % len(FLOW)]
                    items.append(
                        {
                            "eventId": f"E{o}-{k}",
                            "handle": f"h{o}-{k}",
                            "domain": "Fulfillment",
                            "state": state,
                            "lastState": "",
                            "orderId": f"MKP-{o}-01",
                            "currentChange": (t0 + timedelta(seconds=o + k)).isoformat().replace("+00:00", "Z"),
                        }
                    )
            now = datetime.now(UTC)
            start = time.perf_counter()
            for i in range(0, len(items), 10):
                batch = [feed_item(item, now) for item in items[i : i + 10]]
                await store.journal.append(
                    [b.entry for b in batch], acks=[b.handle for b in batch if b.handle], now=now
                )
                await store.journal.acks_done([b.handle for b in batch if b.handle])
            elapsed = time.perf_counter() - start
            print(
                f"feed intake: {len(items)} items in batches of 10, journal+handles fsynced, then acked: "
                f"{len(items) / elapsed:,.0f} items/s ({elapsed * 1000 / (len(items) / 10):.2f} ms per batch)"
            )
            intents = [
                IntentRecorded(order_id=f"MKP-{o}-01", marketplace_order_id=str(o), source="api") for o in range(orders)
            ]
            await store.journal.append(
                [
                    NewEntry(
                        kind=e.kind, source="bench", order_id=e.order_id, payload=e.model_dump_json(), received_at=now
                    )
                    for e in intents
                ],
                now=now,
            )
            processor = Processor(store, Policy())
            start = time.perf_counter()
            applied = await processor.drain()
            elapsed = time.perf_counter() - start
            print(
                f"processor: {applied} journal events applied in {elapsed:.2f} s: {applied / elapsed:,.0f} events/s "
                f"({orders} orders; one transaction per batch; benchmarks/processor.py measures it alone)"
            )
            size = sum(p.stat().st_size for p in Path(tmp).iterdir())
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(f"database: {size / 1e6:.1f} MB for {applied} events; peak RSS {rss:.0f} MB")
            await measure_prune(store, applied, now)


async def measure_prune(store: Store, events: int, now: datetime) -> None:
    """Bytes per journal event before and after pruning every (approved, quiet) order."""
    await store.retention.reclaim()  # the write-ahead log checkpointed: the file alone holds the data
    before = database_bytes(store.path)
    start = time.perf_counter()
    report = await retention.prune(store, 30, now + timedelta(days=31))
    elapsed = time.perf_counter() - start
    after = database_bytes(store.path)
    p = report.pruned
    print(
        f"prune: {p.orders} orders, {p.journal_rows} journal rows into {p.orders} snapshots, {p.history_rows} history "
        f"rows, in {elapsed:.2f} s; database {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB "
        f"({report.freed_bytes / 1e6:.1f} MB given back)"
    )
    print(
        f"bytes per journal event: {before / events:,.0f} before, {after / events:,.0f} after "
        f"({after / max(p.orders, 1):,.0f} bytes per pruned order)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--orders", type=int, default=2000)
    parser.add_argument("--events-per-order", type=int, default=5)
    args = parser.parse_args()
    from omsd.daemon.ops import logs

    logs.configure("warning", "json")
    asyncio.run(main(args.orders, args.events_per_order))
