"""Prometheus metrics (prometheus-client), in a registry of omsd's own.

Counters are incremented where things happen; gauges that mirror the database
(offsets, orders by phase) are refreshed when /metrics is scraped.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from omsd.state.statuses import Phase

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.events_in = Counter("omsd_events_in", "Events journaled, by source", ["source"], registry=r)
        self.duplicates = Counter("omsd_duplicates", "Events dropped as duplicates, by source", ["source"], registry=r)
        self.rejected = Counter("omsd_rejected_input", "Bad input kept as rejected, by source", ["source"], registry=r)
        self.feed_commits = Counter("omsd_feed_commits", "Feed handles committed to VTEX", registry=r)
        self.feed_commit_failures = Counter("omsd_feed_commit_failures", "Failed feed commit calls", registry=r)
        self.journal_offset = Gauge("omsd_journal_offset", "Highest journal offset", registry=r)
        self.processor_offset = Gauge("omsd_processor_offset", "Journal offset applied by the processor", registry=r)
        self.orders = Gauge("omsd_orders", "Orders by local phase", ["phase"], registry=r)
        self.approvals_sent = Counter("omsd_approvals_sent", "Approval PUTs sent", registry=r)
        self.approvals_confirmed = Counter("omsd_approvals_confirmed", "Orders that reached approved", registry=r)
        self.approvals_refused = Counter(
            "omsd_approvals_refused", "Approval results other than SOI002/SOI003, by code", ["code"], registry=r
        )
        self.vtex_requests = Counter(
            "omsd_vtex_requests", "HTTP calls to VTEX by route and status (or error)", ["route", "status"], registry=r
        )
        self.rate_limited = Counter("omsd_vtex_rate_limited", "429 answers from VTEX", registry=r)
        self.rate_limited_wait = Counter(
            "omsd_vtex_rate_limited_wait_seconds", "Seconds paused because of 429", registry=r
        )
        self.retries = Counter("omsd_vtex_retries", "Retries of idempotent VTEX calls", registry=r)
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
        self.intents_expired = Counter(
            "omsd_intents_expired", "Parked intents dropped after OMSD_PARKED_INTENT_TTL_S unlinked", registry=r
        )
        self.link_lookups = Counter(
            "omsd_link_lookups", "Get orders asked to link a parked intent's marketplace id", registry=r
        )
        self.config_resyncs = Counter(
            "omsd_config_resyncs", "Orders re-checked because a feed or hook configuration was recreated", registry=r
        )
        for phase in Phase:
            self.orders.labels(phase=phase.value).set(0)

    def on_vtex_call(self, method: str, route: str, outcome: int | str) -> None:
        self.vtex_requests.labels(route=f"{method} {route}", status=str(outcome)).inc()
        if outcome == 429:
            self.rate_limited.inc()

    def set_phases(self, counts: dict[str, int]) -> None:
        for phase in Phase:
            self.orders.labels(phase=phase.value).set(counts.get(phase.value, 0))

    def sample(self, name: str, **labels: str) -> float:
        """The current value of one sample (0 when it was never set)."""
        return self.registry.get_sample_value(name, labels) or 0.0

    def render(self) -> bytes:
        return generate_latest(self.registry)
