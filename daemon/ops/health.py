"""What /healthz and /readyz report, kept up to date by the loops and the self-check."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..config.settings import Settings
from .logs import get_logger
from .metrics import Metrics

log = get_logger("omsd.health")

STORE_ALARM = "database_unwritable"
STUCK_ALARM = "orders_stuck"


@dataclass
class Health:
    settings: Settings
    metrics: Metrics
    clock: Callable[[], float] = time.monotonic
    feed_config_ok: bool = False
    hook_config_ok: bool = False
    last_poll_ok: float | None = None
    last_push_ok: float | None = None
    last_self_check_ok: float | None = None
    alarms: dict[str, str] = field(default_factory=dict)
    # Alarms about the connector's side (a relay endpoint disabled): raised and counted like
    # the others, but they do not make omsd unready, since approvals go on without them.
    outside: set[str] = field(default_factory=set)
    store_problem: str | None = None  # why the database refuses writes; intake waits meanwhile
    store_ok: asyncio.Event = field(default_factory=asyncio.Event)
    # why the replica may be behind (Litestream down, a sync failed, no sync for a while);
    # with OMSD_DURABILITY=replicated intake waits meanwhile
    replica_problem: str | None = None
    replica_ok: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.store_ok.set()
        self.replica_ok.set()

    def replica_behind(self, reason: str) -> None:
        """The replica may be behind: with replicated durability, intake pauses."""
        if self.replica_problem is None:
            log.warning("replica_behind", reason=reason, intake_paused=self.settings.replicated)
        self.replica_problem = reason
        self.replica_ok.clear()

    def replica_current(self) -> None:
        if self.replica_problem is not None:
            log.info("replica_current", intake_resumed=self.settings.replicated)
            self.replica_problem = None
        self.replica_ok.set()

    @property
    def intake_problem(self) -> str | None:
        """Why intake waits: the database refuses writes, or (replicated durability) the
        replica is not current."""
        if self.store_problem is not None:
            return f"database not writable: {self.store_problem}"
        if self.settings.replicated and self.replica_problem is not None:
            return f"replica not current: {self.replica_problem}"
        return None

    def store_unwritable(self, reason: str) -> None:
        """The database refused a write: pause intake, raise the alarm (the probe clears it)."""
        self.store_problem = reason
        self.store_ok.clear()
        self.raise_alarm(STORE_ALARM, reason)

    def store_writable(self) -> None:
        if self.store_problem is not None:
            self.store_problem = None
            self.clear_alarm(STORE_ALARM)
        self.store_ok.set()

    def orders_stuck(self, count: int) -> None:
        """Orders stuck on an event omsd could not apply: an alarm while any is (`omsd stuck`)."""
        if count:
            detail = f"{count} order(s) stuck on an event omsd could not apply (omsd stuck; then omsd retry)"
            self.raise_alarm(STUCK_ALARM, detail)
        else:
            self.clear_alarm(STUCK_ALARM)

    def poll_ok(self) -> None:
        self.last_poll_ok = self.clock()

    def push_ok(self) -> None:
        self.last_push_ok = self.clock()

    def raise_alarm(self, name: str, detail: str, *, outside: bool = False) -> None:
        """Raise (or update) an alarm. `outside`: a fault on the connector's side, which does
        not fail readiness."""
        if self.alarms.get(name) != detail:
            log.error("alarm_raised", alarm=name, detail=detail)
        self.alarms[name] = detail
        if outside:
            self.outside.add(name)
        self.metrics.alarm.labels(name=name).set(1)

    def clear_alarm(self, name: str) -> None:
        if self.alarms.pop(name, None) is not None:
            log.info("alarm_cleared", alarm=name)
        self.outside.discard(name)
        self.metrics.alarm.labels(name=name).set(0)

    def _fresh(self, at: float | None, within_s: float) -> bool:
        return at is not None and self.clock() - at <= within_s

    def problems(self, db_writable: bool) -> list[str]:
        """Why omsd is not ready; empty when it is."""
        s = self.settings
        out: list[str] = []
        if not db_writable and self.store_problem is None:
            out.append("database not writable")
        if s.uses_feed and not self.feed_config_ok:
            out.append("feed configuration not confirmed at VTEX")
        if s.uses_hook and not self.hook_config_ok:
            out.append("hook configuration not confirmed at VTEX")
        if s.uses_feed:
            if not self._fresh(self.last_poll_ok, s.ready_stale_s):
                out.append(f"no successful feed poll in {s.ready_stale_s:.0f}s")
        elif not (
            self._fresh(self.last_push_ok, s.ready_stale_s)
            or self._fresh(self.last_self_check_ok, 2 * s.self_check_s + s.ready_stale_s)
        ):
            out.append("no push and no successful VTEX check recently")
        out.extend(
            f"alarm {name}: {detail}" for name, detail in sorted(self.alarms.items()) if name not in self.outside
        )
        return out
