"""Prometheus metrics (prometheus-client), in a registry of omsd's own.

Counters are incremented where things happen; gauges that mirror the database
(offsets, orders by phase, parked intents, size, the oldest unapplied event) are
refreshed when /metrics is scraped. Names follow Prometheus' rules: base units
(`_seconds`, `_bytes`), `_total` on counters (prometheus-client adds it), and no
`_created` series (they double the series count and no alert uses them).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics import MetricWrapperBase

from omsd.state.outcomes import TYPES as OUTCOME_TYPES
from omsd.state.statuses import STUCK, TERMINAL_PHASES, Phase
from omsd.state.store import Store, database_bytes

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

_RESULT_CODE = re.compile(r"[SE]OI[0-9]{3}")

disable_created_metrics()  # type: ignore[no-untyped-call]

# Seconds: a VTEX call takes tens of milliseconds to the client's timeout; an
# approval from seconds (hook) to days (an order held for manual authorization).
CALL_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LATENCY_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
SYNC_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
INTENT_BUCKETS = (1.0, 10.0, 60.0, 300.0, 3600.0, 6 * 3600.0, 86400.0, 3 * 86400.0, 7 * 86400.0)
HELD_REFUSAL = "EOI011"  # VTEX refused an approval because the order is held: must never happen
PHASES = (*(p.value for p in Phase), STUCK)  # the `phase` label: the machine's, and stuck orders
MAX_TRACKED = 100_000  # orders between release and PUT this process remembers
# In a fleet (daemon/fleet/metrics.py): the families each account exports with an `account` label.
# Every other family is the fleet's, one for all its accounts (`Metrics(aggregate=...)`).
PER_ACCOUNT = frozenset(
    {
        "omsd_orders",
        "omsd_alarm",
        "omsd_ready",
        "omsd_journal_oldest_unapplied_age_seconds",
        "omsd_journal_offset",
        "omsd_processor_offset",
        "omsd_parked_intents",
        "omsd_database_bytes",
        "omsd_approvals_sent",
        "omsd_approvals_confirmed",
        "omsd_approvals_refused",
        "omsd_dead_letters",
        "omsd_events_in",
        "omsd_feed_queue_messages",
        "omsd_feed_oldest_message_age_seconds",
        "omsd_vtex_rate_limit_effective_per_second",
        "omsd_vtex_rate_limited",
        "omsd_vtex_requests",
        "omsd_relay_oldest_undelivered_seconds",
        "omsd_relay_endpoint_disabled",
        "omsd_replica_up",
        "omsd_replica_lag_seconds",
        "omsd_replica_lag_bytes",
        "omsd_replica_last_sync_timestamp_seconds",
    }
)


def omsd_version() -> str:
    try:
        return version("omsd")
    except PackageNotFoundError:
        return "unknown"


class Metrics:
    """omsd's metrics. With `aggregate` (an account of a fleet) only the PER_ACCOUNT families are
    this account's own; the others are `aggregate`'s, shared by every account of the fleet."""

    def __init__(self, monotonic: Callable[[], float] = time.monotonic, *, aggregate: Metrics | None = None) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self._monotonic = monotonic
        self._released: dict[str, float] = {}  # order id -> when it left waiting_release
        self.build_info = Gauge("omsd_build_info", "Always 1; the running omsd's version", ["version"], registry=r)
        self.build_info.labels(version=omsd_version()).set(1)
        self.events_in = Counter("omsd_events_in", "Events journaled, by source", ["source"], registry=r)
        self.duplicates = Counter("omsd_duplicates", "Events dropped as duplicates, by source", ["source"], registry=r)
        self.rejected = Counter("omsd_rejected_input", "Bad input kept as rejected, by source", ["source"], registry=r)
        self.rejected_truncated = Counter(
            "omsd_rejected_bodies_truncated",
            "Rejected bodies of unauthenticated requests kept as head, size and sha256, by source",
            ["source"],
            registry=r,
        )
        self.rejected_dropped = Counter(
            "omsd_rejected_bodies_dropped",
            "Rejected bodies of unauthenticated requests not kept (over the rate per client), by source",
            ["source"],
            registry=r,
        )
        self.feed_commits = Counter("omsd_feed_commits", "Feed handles committed to VTEX", registry=r)
        self.feed_commit_failures = Counter("omsd_feed_commit_failures", "Failed feed commit calls", registry=r)
        self.journal_offset = Gauge("omsd_journal_offset", "Highest journal offset", registry=r)
        self.processor_offset = Gauge("omsd_processor_offset", "Journal offset applied by the processor", registry=r)
        self.oldest_unapplied = Gauge(
            "omsd_journal_oldest_unapplied_age_seconds",
            "Age of the oldest journal event the processor has not applied (0 when caught up)",
            registry=r,
        )
        self.orders = Gauge("omsd_orders", "Orders by local phase", ["phase"], registry=r)
        self.parked_intents = Gauge(
            "omsd_parked_intents", "Approval intents waiting for their order to be known", registry=r
        )
        self.database_bytes = Gauge("omsd_database_bytes", "Size of the database with its -wal file", registry=r)
        self.approvals_sent = Counter("omsd_approvals_sent", "Approval PUTs sent", registry=r)
        self.approvals_confirmed = Counter("omsd_approvals_confirmed", "Orders that reached approved", registry=r)
        self.approvals_refused = Counter(
            "omsd_approvals_refused", "Approval results other than SOI002/SOI003, by code", ["code"], registry=r
        )
        self.release_to_approval = Histogram(
            "omsd_release_to_approval_seconds",
            "From the order seen free (leaving waiting_release) to the approval PUT sent",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.intent_to_approved = Histogram(
            "omsd_intent_to_approved_seconds",
            "From the approval intent journaled to the order confirmed approved",
            buckets=INTENT_BUCKETS,
            registry=r,
        )
        self.vtex_requests = Counter(
            "omsd_vtex_requests", "HTTP calls to VTEX by route and status (or error)", ["route", "status"], registry=r
        )
        self.vtex_duration = Histogram(
            "omsd_vtex_request_duration_seconds",
            "Duration of one HTTP exchange with VTEX, by route",
            ["route"],
            buckets=CALL_BUCKETS,
            registry=r,
        )
        self._rest(r)
        if aggregate is not None:
            self._share(aggregate)

    def _rest(self, r: CollectorRegistry) -> None:
        self.rate_limited = Counter("omsd_vtex_rate_limited", "429 answers from VTEX", registry=r)
        self.rate_limited_wait = Counter(
            "omsd_vtex_rate_limited_wait_seconds", "Seconds paused because of 429", registry=r
        )
        self.retries = Counter("omsd_vtex_retries", "Retries of idempotent VTEX calls", registry=r)
        self.get_orders_coalesced = Counter(
            "omsd_vtex_get_orders_coalesced",
            "Get orders answered by another call for the same order still queued for a slot",
            registry=r,
        )
        self.rate_effective = Gauge(
            "omsd_vtex_rate_limit_effective_per_second",
            "Requests per second the VTEX client allows itself now (429s lower it, quiet raises it)",
            registry=r,
        )
        self.dead_letters = Counter("omsd_dead_letters", "Orders that went to the dead phase", registry=r)
        self.queue_messages = Gauge("omsd_feed_queue_messages", "Messages in VTEX's feed queue (quantity)", registry=r)
        self.queue_age = Gauge(
            "omsd_feed_oldest_message_age_seconds", "Age of the oldest message in VTEX's feed queue", registry=r
        )
        self.alarm = Gauge("omsd_alarm", "1 while an alarm is raised", ["name"], registry=r)
        self.ready = Gauge("omsd_ready", "1 when /readyz answers 200", registry=r)
        self.journal_unreadable = Counter(
            "omsd_journal_unreadable",
            "Journal rows the processor could not read (omsd journal --unreadable)",
            registry=r,
        )
        self.events_not_applied = Counter(
            "omsd_events_not_applied",
            "Events that could not be applied (decide raised): their order is stuck (omsd stuck)",
            registry=r,
        )
        self.scheduled_job_failures = Counter(
            "omsd_scheduled_job_failures", "Scheduled job runs that raised, by job", ["job"], registry=r
        )
        self.intents_expired = Counter(
            "omsd_intents_expired", "Parked intents dropped after OMSD_PARKED_INTENT_TTL_S unlinked", registry=r
        )
        self.link_lookups = Counter(
            "omsd_link_lookups",
            "Get orders asked to link a parked intent's marketplace id, by trigger: intent (an order whose id "
            "derives from it, at the approval's priority) or job (the background lookups)",
            ["trigger"],
            registry=r,
        )
        self.outcomes = Counter(
            "omsd_outcomes", "Outcome events written for the connector, by type", ["type"], registry=r
        )
        self.relay_deliveries = Counter(
            "omsd_relay_deliveries",
            "Relay deliveries to the connector by endpoint and result (delivered, retried, gave_up, disabled, dropped)",
            ["endpoint", "result"],
            registry=r,
        )
        self.relay_oldest = Gauge(
            "omsd_relay_oldest_undelivered_seconds",
            "Age of the oldest outcome an enabled relay endpoint has not delivered yet (0 when caught up)",
            ["endpoint"],
            registry=r,
        )
        self.relay_disabled = Gauge(
            "omsd_relay_endpoint_disabled",
            "1 while a relay endpoint is disabled (it answered 410)",
            ["endpoint"],
            registry=r,
        )
        self.event_waiters = Gauge(
            "omsd_event_waiters", "Long polls and event streams waiting for the next outcome", registry=r
        )
        for trigger in ("intent", "job"):
            self.link_lookups.labels(trigger=trigger)
        self.store_probes = Counter(
            "omsd_store_probes", "Write probes of the database, by result (ok, refused)", ["result"], registry=r
        )
        self.config_resyncs = Counter(
            "omsd_config_resyncs", "Orders re-checked because a feed or hook configuration was recreated", registry=r
        )
        self._replica(r)
        for phase in PHASES:
            self.orders.labels(phase=phase).set(0)
        for kind in OUTCOME_TYPES:
            self.outcomes.labels(type=kind)
        # Exported at 0 from the start, so that increase() sees the first one (an alert).
        self.approvals_refused.labels(code=HELD_REFUSAL)

    def _share(self, aggregate: Metrics) -> None:
        for attribute, metric in list(vars(self).items()):
            if isinstance(metric, MetricWrapperBase) and metric._name not in PER_ACCOUNT:
                self.registry.unregister(metric)
                setattr(self, attribute, getattr(aggregate, attribute))

    def without_per_account(self) -> Metrics:
        """The fleet's aggregate: its PER_ACCOUNT families are the accounts' (they export them)."""
        for metric in list(vars(self).values()):
            if isinstance(metric, MetricWrapperBase) and metric._name in PER_ACCOUNT:
                self.registry.unregister(metric)
        return self

    def _replica(self, r: CollectorRegistry) -> None:
        """OMSD_REPLICA: Litestream's replication, as omsd sees it (docs/operations.md, "Replication")."""
        self.replica_up = Gauge(
            "omsd_replica_up", "1 while Litestream runs and the replica is current (0 without OMSD_REPLICA)", registry=r
        )
        self.replica_lag_seconds = Gauge(
            "omsd_replica_lag_seconds",
            "Seconds since a sync last reached the replica (Litestream syncs every second, idle or not)",
            registry=r,
        )
        self.replica_lag_bytes = Gauge(
            "omsd_replica_lag_bytes", "Bytes of changes written locally that the replica does not hold yet", registry=r
        )
        self.replica_last_sync = Gauge(
            "omsd_replica_last_sync_timestamp_seconds", "When a sync last reached the replica (Unix time)", registry=r
        )
        self.replica_syncs = Counter(
            "omsd_replica_syncs", "Syncs omsd waited for (replicated durability: one covers every waiter)", registry=r
        )
        self.replica_waits = Counter(
            "omsd_replica_waits", "Acknowledgements and approvals that waited for the replica", registry=r
        )
        self.replica_sync_failures = Counter(
            "omsd_replica_sync_failures", "Syncs to the replica that failed or timed out", registry=r
        )
        self.replica_sync_seconds = Histogram(
            "omsd_replica_sync_duration_seconds",
            "One sync omsd waited for, until the replica held it",
            buckets=SYNC_BUCKETS,
            registry=r,
        )
        self.replica_restarts = Counter("omsd_replica_restarts", "Times Litestream died and was restarted", registry=r)

    def on_approval_refused(self, code: str) -> None:
        """Count a refused approval by its result code. The label takes VTEX's code shape
        only (SOI000/EOI000), anything else counts as `other`: a label value must never
        come unchecked from a request body (unbounded series)."""
        self.approvals_refused.labels(code=code if _RESULT_CODE.fullmatch(code) else "other").inc()

    def on_vtex_call(self, method: str, route: str, outcome: int | str, duration_s: float | None = None) -> None:
        self.vtex_requests.labels(route=f"{method} {route}", status=str(outcome)).inc()
        if duration_s is not None:
            self.vtex_duration.labels(route=f"{method} {route}").observe(duration_s)
        if outcome == 429:
            self.rate_limited.inc()

    def on_transition(
        self, order_id: str, from_phase: str | None, to_phase: str, intent_at: datetime | None, now: datetime
    ) -> None:
        """Counters and latencies that follow an order's phase."""
        leaves_wait = from_phase == Phase.WAITING_RELEASE and to_phase != Phase.WAITING_RELEASE
        if leaves_wait and len(self._released) < MAX_TRACKED:
            self._released.setdefault(order_id, self._monotonic())
        if to_phase in TERMINAL_PHASES:
            self._released.pop(order_id, None)
        if to_phase == from_phase:
            return
        if to_phase == Phase.APPROVED:
            self.approvals_confirmed.inc()
            if intent_at is not None:
                self.intent_to_approved.observe(max(0.0, (now - intent_at).total_seconds()))
        elif to_phase == Phase.DEAD:
            self.dead_letters.inc()

    def on_approval_sent(self, order_id: str) -> None:
        self.approvals_sent.inc()
        released = self._released.pop(order_id, None)
        if released is not None:
            self.release_to_approval.observe(max(0.0, self._monotonic() - released))

    async def refresh(self, store: Store, db: Path, now: datetime | None = None) -> None:
        """The gauges read from the database, before a scrape."""
        stats = await store.read.stats()
        self.journal_offset.set(stats["last_offset"])
        self.processor_offset.set(stats["processor_offset"])
        self.parked_intents.set(stats["pending_intents"])
        self.set_phases(await store.read.phase_counts())
        oldest = await store.journal.after(stats["processor_offset"], limit=1)
        now = now or datetime.now(UTC)
        self.oldest_unapplied.set(max(0.0, (now - oldest[0].received_at).total_seconds()) if oldest else 0)
        self.database_bytes.set(database_bytes(db))
        for endpoint in await store.outcomes.endpoints():
            if endpoint.disabled_at is None:
                age = (now - endpoint.oldest_undelivered).total_seconds() if endpoint.oldest_undelivered else 0.0
                self.relay_oldest.labels(endpoint=endpoint.name).set(max(0.0, age))

    def set_phases(self, counts: dict[str, int]) -> None:
        for phase in PHASES:
            self.orders.labels(phase=phase).set(counts.get(phase, 0))

    def sample(self, name: str, **labels: str) -> float:
        """The current value of one sample (0 when it was never set)."""
        return self.registry.get_sample_value(name, labels) or 0.0

    def render(self) -> bytes:
        return generate_latest(self.registry)
