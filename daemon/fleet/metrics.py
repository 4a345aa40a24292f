"""A fleet's /metrics: the process's own metrics, the accounts' shared ones, and each account's.

Each account keeps a `Metrics` (daemon/ops/metrics.py) whose `PER_ACCOUNT` families are its own:
orders by phase, alarms, readiness, lag and offsets, parked intents, database size, approvals
sent, confirmed and refused, dead orders, events in, VTEX's feed queue, VTEX calls by route and
status, its 429s and the rate omsd allows itself (VTEX's limits are per account), the relay's
lag, the replica's. At a scrape these get an `account` label: about 40 series an idle account,
60 a busy one; 60,000 for a thousand. Every other family (latency histograms, VTEX call
durations, rejected input, retries, job failures, outcomes by type, ...)
is one object for the whole fleet (`Metrics(aggregate=...)`), counted by every account,
without an `account` label: per account those would be hundreds of series each (a histogram
per VTEX route alone is 13 series a route), and they are read for the process as a whole.

The gauges an account mirrors from its database (offsets, orders by phase, parked intents,
size, lag) are read again only for the accounts whose database changed since the last scrape
(the journal watcher's version), or a minute ago.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample

from omsd.state.store import Store

from ..ops.metrics import Metrics

REFRESH_EVERY_S = 60.0


@dataclass
class Scraped:
    """What the merge needs of one running account."""

    metrics: Metrics
    store: Store
    db: Path


class FleetMetrics:
    """The process's own metrics (accounts by state, restarts, reloads), the accounts' shared
    families (`aggregate`), and the merge."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self._clock = clock
        self._refreshed: dict[str, tuple[int, float]] = {}  # account -> (db version, when)
        self.aggregate = Metrics().without_per_account()
        self.accounts = Gauge(
            "omsd_fleet_accounts",
            "Accounts configured, by state (running, not_running, invalid)",
            ["state"],
            registry=r,
        )
        self.account_up = Gauge(
            "omsd_account_up", "1 while the account runs, 0 while it waits to start again", ["account"], registry=r
        )
        self.account_failures = Counter(
            "omsd_account_failures",
            "Times an account stopped on a fatal error and was restarted",
            ["account"],
            registry=r,
        )
        self.alarm = Gauge(
            "omsd_alarm",
            "1 while an alarm is raised (account_failed: the account waits to start again)",
            ["account", "name"],
            registry=r,
        )
        self.reloads = Counter(
            "omsd_fleet_reloads", "SIGHUP reloads of the accounts directory, by result", ["result"], registry=r
        )
        for state in ("running", "not_running", "invalid"):
            self.accounts.labels(state=state).set(0)

    def forget(self, account: str) -> None:
        """An account left the fleet: its series go."""
        for metric in (self.account_up, self.account_failures):
            with contextlib.suppress(KeyError):
                metric.remove(account)
        with contextlib.suppress(KeyError):
            self.alarm.remove(account, "account_failed")
        self._refreshed.pop(account, None)

    async def render(self, accounts: Mapping[str, Scraped], version: Callable[[Path], int]) -> bytes:
        now = self._clock()
        for name, account in accounts.items():
            seen = version(account.db)
            last = self._refreshed.get(name)
            if last is None or last[0] != seen or now - last[1] >= REFRESH_EVERY_S:
                await account.metrics.refresh(account.store, account.db)
                self._refreshed[name] = (seen, now)
        merged = CollectorRegistry(auto_describe=False)
        merged.register(_Merged([self.registry, self.aggregate.registry], {n: a.metrics for n, a in accounts.items()}))
        return generate_latest(merged)


class _Merged:
    """A collector: the fleet's families, then each account's with its `account` label."""

    def __init__(self, own: list[CollectorRegistry], accounts: Mapping[str, Metrics]) -> None:
        self._own = own
        self._accounts = accounts

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for registry in self._own:
            for family in registry.collect():
                families[family.name] = family
        for account, metrics in sorted(self._accounts.items()):
            for family in metrics.registry.collect():
                merged = families.get(family.name)
                if merged is None:
                    merged = families[family.name] = Metric(family.name, family.documentation, family.type)
                merged.samples.extend(_labelled(family.samples, account))
        yield from families.values()


def _labelled(samples: Iterable[Sample], account: str) -> Iterator[Sample]:
    for s in samples:
        yield Sample(s.name, {"account": account, **s.labels}, s.value, s.timestamp, s.exemplar)
