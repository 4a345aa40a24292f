"""Linking ids lazily, expiring parked intents, re-checking after a recreated configuration:
what omsd appends to the journal on its own initiative (run as scheduled jobs).

- `ParkedIntents`: an intent that names only a marketplace id waits parked until an order
  is linked to it. An order whose VTEX id derives from the parked id is looked up at once
  by the processor (`state.routing.lookup`); this job is for the ids that follow no
  pattern: only while an intent has been parked for `LOOKUP_GRACE_S` does it ask for a few
  link lookups per run (a `Resync` of an unlinked order, which the machine answers with a
  lowest-priority Get order; at most two runs' worth in flight), and it expires intents parked longer than
  `OMSD_PARKED_INTENT_TTL_S` (an `IntentExpired` journal row, the operator's record).
- `resync_waiting`: after VTEX's feed or hook configuration was found missing and
  recreated, every order whose intent waits for a status event is re-checked at once:
  VTEX produced no events while the configuration was gone.

Every decision stays in the processor: these only append journal rows (deduplicated, so a
run that overlaps the processor's lag adds nothing twice) and wake it.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from omsd.state.events import IntentExpired, Resync
from omsd.state.store import NewEntry, Store

from ..ops.logs import get_logger
from ..ops.metrics import Metrics

log = get_logger("omsd.jobs")

# The job looks orders up only for an intent parked at least this long: before, the order whose
# VTEX id derives from the intent's marketplace id (VTEX's ids usually do) is being looked up at
# once by the processor, and a wave of guesses among the other unlinked orders would be wasted.
LOOKUP_GRACE_S = 5.0

Clock = Callable[[], datetime]


def _utcnow() -> datetime:
    return datetime.now(UTC)


class ParkedIntents:
    """Lazy link lookups and expiry for parked intents; one run per `OMSD_LINK_INTERVAL_S`."""

    def __init__(
        self,
        store: Store,
        metrics: Metrics,
        wake: Callable[[], None],
        *,
        ttl_s: float,
        lookups_per_run: int,
        clock: Clock = _utcnow,
    ) -> None:
        self._store = store
        self._ttl_s = ttl_s
        self._lookups_per_run = lookups_per_run
        self._metrics = metrics
        self._wake = wake
        self._clock = clock
        self._idle_at: int | None = None  # processor offset at which no candidate was left

    async def run_once(self) -> int:
        """Append due expiries and up to `OMSD_LINK_LOOKUPS_PER_RUN` lookups. Returns rows added."""
        now = self._clock()
        ttl = self._ttl_s
        entries = [
            NewEntry.of(
                IntentExpired(marketplace_order_id=mkt, parked_offset=offset, ttl_s=ttl),
                source="expiry",
                received_at=now,
                dedup_key=f"expire:{offset}",
            )
            for mkt, offset in await self._store.read.parked_before(now - timedelta(seconds=ttl))
        ]
        lookups = await self._lookups(now)
        if not entries and not lookups:
            return 0
        results = await self._store.journal.append([*entries, *lookups], now=now)
        added = [not r.duplicate for r in results]
        expiries, looked_up = sum(added[: len(entries)]), sum(added[len(entries) :])
        if looked_up:
            self._metrics.link_lookups.labels(trigger="job").inc(looked_up)
        if expiries or looked_up:
            log.debug("parked_intents_job", expiries=expiries, lookups=looked_up)
            self._wake()
        return expiries + looked_up

    async def _lookups(self, now: datetime) -> list[NewEntry]:
        limit = self._lookups_per_run
        if limit == 0:
            return []
        oldest = await self._store.read.oldest_parked_at()
        if oldest is None or now - oldest < timedelta(seconds=LOOKUP_GRACE_S):
            return []  # an intent parked moments ago: the order whose id derives from it is looked up at once
        applied = await self._store.read.processor_offset()
        if self._idle_at == applied:
            return []  # the orders table has not changed since no candidate was left: spare the query
        # A wave waiting behind a saturated budget does not hold the next back, but the lookups
        # in flight stay bounded (two runs' worth): they wait in the effect runner's slots.
        limit = min(limit, 2 * limit - await self._store.outbox.link_lookups_in_flight())
        if limit <= 0:
            return []
        candidates = await self._store.read.link_candidates(limit)
        self._idle_at = applied if not candidates else None
        return [
            NewEntry.of(
                Resync(order_id=order_id, reason="link lookup for a parked intent"),
                source="link",
                received_at=now,
                dedup_key=f"link:{order_id}:{seq}",
            )
            for order_id, seq in candidates
        ]


async def resync_waiting(store: Store, metrics: Metrics, reason: str, now: datetime, *, recreated: bool = True) -> int:
    """Append a Resync for every order whose intent waits for a status event. Returns how many
    (counted in `omsd_config_resyncs` when a configuration was `recreated`)."""
    order_ids = await store.read.waiting_with_intent()
    if not order_ids:
        return 0
    entries = [
        NewEntry.of(Resync(order_id=order_id, reason=reason), source="self_check", received_at=now)
        for order_id in order_ids
    ]
    await store.journal.append(entries, now=now)
    if recreated:
        metrics.config_resyncs.inc(len(entries))
    log.warning("waiting_orders_resynced", reason=reason, orders=len(entries))
    return len(entries)
