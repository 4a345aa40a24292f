"""The live processor's speed: a backlog of journal events applied by `Processor.drain`
(read rows, route, `decide`, one transaction per batch with orders, outbox, timers,
history and the offset), with no latency anywhere (SQLite on the local disk).

    .venv/bin/python benchmarks/processor.py [--events 50000] [--log-level info] [--profile]

The journal is the replay benchmark's: orders living a full approval, interleaved a
thousand at a time, so every batch touches many orders and every event kind occurs.
Prints events/s (wall clock) and CPU microseconds per event (this process: the event
loop and SQLite's thread), which load on a shared machine disturbs less. The log
lines go to /dev/null at the daemon's default level (info: one line per transition).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import platform
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from replay import append_lives

from omsd.daemon.pipeline.processor import Processor
from omsd.state.models import Policy
from omsd.state.store import Store


async def main(events: int, batch_size: int | None, profile: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        async with await Store.open(Path(tmp) / "bench.db") as store:
            expected = await append_lives(store, events)
            total = await store.journal.last_offset()
            processor = Processor(store, Policy(), batch_size=batch_size) if batch_size else Processor(store, Policy())
            profiler = cProfile.Profile() if profile else None
            start, cpu = time.perf_counter(), time.process_time()
            if profiler:
                profiler.enable()
            applied = await processor.drain()
            if profiler:
                profiler.disable()
            elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
            if profiler:
                pstats.Stats(profiler).sort_stats("tottime").print_stats(20)
            same = await store.read.orders_by_id() == expected
            print(
                f"processor: {applied:,} of {total:,} journal events, {len(expected):,} orders, in {elapsed:.2f} s: "
                f"{applied / elapsed:,.0f} events/s; CPU {cpu:.2f} s = {cpu * 1e6 / applied:,.0f} us per event"
            )
            print(f"state identical to the machine's: {same}")
            print(
                f"Python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} cores; "
                f"load average {os.getloadavg()[0]:.1f}"
            )
            if not same:
                raise SystemExit(1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--batch-size", type=int, help="the processor's batch size (default: its own)")
    parser.add_argument("--profile", action="store_true", help="print the top of a cProfile of the drain")
    parser.add_argument("--log-level", default="info", help="the daemon's log level (lines go to /dev/null)")
    args = parser.parse_args()
    from omsd.daemon.ops import logs

    logs.configure(args.log_level, "json", open(os.devnull, "w"))  # noqa: SIM115 - open for the whole run
    asyncio.run(main(args.events, args.batch_size, args.profile))
