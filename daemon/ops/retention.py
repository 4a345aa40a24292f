"""Journal retention: orders quiet for longer than the retention keep one snapshot row.

An order that is closed (approved, rejected) or only followed (tracking: nobody asked
for its approval) and has not changed for `days` has its journal rows, history and
finished outbox rows replaced by one `order_snapshot` row holding its whole record, at
the offset of its last row. A replay applies it as "the order is this", so the rebuilt
state is the same as before the prune. Open orders (an approval in progress, a timer, a
Get order in flight) are never pruned, nor `dead` ones: an operator may still retry
them and wants their history. Rejected input older than `days` goes too, and outcome
events older than `days` (except those a relay endpoint has not delivered yet: a reader
asking for them gets 410 Gone with the oldest kept). Then the free pages go back to the
filesystem (the database is `auto_vacuum=INCREMENTAL`).

The daemon runs this as its `retention` job; `omsd prune` runs it by hand.
"""

from __future__ import annotations

import asyncio
from contextlib import aclosing
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from omsd.state.statuses import Phase
from omsd.state.store import Pruned, Store

from .logs import get_logger

log = get_logger("omsd.retention")

PRUNABLE_PHASES: tuple[str, ...] = (Phase.APPROVED, Phase.REJECTED, Phase.TRACKING)
EVERY_S = 6 * 3600.0  # how often the daemon's job runs
CHUNK = 500  # orders per transaction: intake goes on between them


@dataclass(frozen=True, slots=True)
class Report:
    pruned: Pruned
    cutoff: datetime
    dry_run: bool
    freed_bytes: int = 0

    def view(self) -> dict[str, Any]:
        return {
            **asdict(self.pruned),
            "cutoff": self.cutoff.isoformat(),
            "dry_run": self.dry_run,
            "freed_bytes": self.freed_bytes,
        }


async def prune(
    store: Store, days: float, now: datetime, *, dry_run: bool = False, chunk: int = CHUNK, truncate: bool = True
) -> Report:
    """Prune what has been closed and quiet since before `now - days`. `truncate`: end with a
    checkpoint that truncates the write-ahead log (never while Litestream runs)."""
    cutoff = now - timedelta(days=days)
    total = Pruned()
    async with aclosing(store.retention.candidates(PRUNABLE_PHASES, cutoff, page=chunk)) as pages:
        async for order_ids in pages:
            if dry_run:
                total.add(await store.retention.preview(order_ids))
            else:
                total.add(await store.retention.prune(order_ids, PRUNABLE_PHASES, cutoff))
            await asyncio.sleep(0)  # let intake and the processor have the store between chunks
    if dry_run:
        total.rejected_rows = await store.retention.count_rejected(cutoff)
        return Report(total, cutoff, dry_run=True)
    total.rejected_rows = await store.retention.prune_rejected(cutoff)
    total.outcome_rows = await store.outcomes.prune(cutoff)
    freed = await store.retention.reclaim(truncate=truncate)
    return Report(total, cutoff, dry_run=False, freed_bytes=freed)


async def run_job(store: Store, days: float, now: datetime, *, truncate: bool = True) -> Report:
    report = await prune(store, days, now, truncate=truncate)
    pruned = report.pruned
    # a run that found nothing to prune is no news for an operator (the job runs every 6 hours)
    level = "info" if pruned.orders or pruned.rejected_rows else "debug"
    getattr(log, level)("journal_pruned", **report.view())
    return report
