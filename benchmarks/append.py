"""Journaling a group commit of feed items: one `Store.append` for many batches.

    .venv/bin/python benchmarks/append.py [--group 320] [--rounds 30]

Appends `--rounds` groups of `--group` fresh feed items (their handles too), each in
one durable transaction, and prints the median and p90 time per group: first as
`Store.append` does it, then, as the baseline in the same run, the way it was done
before (two statements per item: a dedup lookup, then the insert). The feed writer
journals everything its readers delivered since its last transaction as one group
(daemon/intake/feed.py), ~32 batches of 10 under a backlog.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from datetime import UTC, datetime, timedelta
from itertools import count
from pathlib import Path

from omsd.daemon.intake.entries import feed_item
from omsd.state.store import NewEntry, Store
from omsd.state.store.journal import insert

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _items(ids: count[int], group: int) -> list[dict[str, str]]:
    out = []
    for _ in range(group):
        n = next(ids)
        out.append(
            {
                "eventId": f"E{n}",
                "handle": f"h{n}",
                "domain": "Fulfillment",
                "state": "ready-for-handling",
                "lastState": "handling",
                "orderId": f"MKP-{n}-01",
                "currentChange": (T0 + timedelta(seconds=n)).isoformat().replace("+00:00", "Z"),
            }
        )
    return out


async def _one_by_one(store: Store, entries: list[NewEntry], handles: list[str], now: datetime) -> None:
    """The previous `append`: a lookup and an insert per entry, in one transaction."""
    async with store.db.tx() as conn:  # the store's own transaction, as append uses it
        for entry in entries:
            await insert(conn, entry)
        await conn.executemany(
            "INSERT OR IGNORE INTO feed_acks (handle, received_at) VALUES (?, ?)",
            [(h, now.isoformat()) for h in handles],
        )


async def measure(group: int, rounds: int, baseline: bool) -> list[float]:
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        async with await Store.open(Path(tmp) / "append.db") as store:
            ids = count()
            for _ in range(rounds):
                now = datetime.now(UTC)
                batch = [feed_item(item, now) for item in _items(ids, group)]
                entries = [b.entry for b in batch]
                handles = [b.handle for b in batch if b.handle is not None]
                start = time.perf_counter()
                if baseline:
                    await _one_by_one(store, entries, handles, now)
                else:
                    await store.journal.append(entries, acks=handles, now=now)
                times.append(time.perf_counter() - start)
    return sorted(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--group", type=int, default=320)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    for name, baseline in (("Store.append", False), ("one by one (before)", True)):
        t = asyncio.run(measure(args.group, args.rounds, baseline))
        median, p90 = t[len(t) // 2], t[int(len(t) * 0.9)]
        print(
            f"{name}: {args.group} items per transaction, median {median * 1000:.1f} ms, p90 {p90 * 1000:.1f} ms "
            f"({median * 1e6 / args.group:.0f} µs per item)"
        )


if __name__ == "__main__":
    main()
