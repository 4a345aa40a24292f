"""Scheduled jobs (APScheduler 3.x) and their health.

APScheduler swallows a job's exception, so every job is watched here. Each run,
failed or not, is a beat for the watchdog: a job that stops running (the
scheduler died, or a run hangs and later runs are skipped) stops the pings once
it is two intervals overdue. Each failure is logged and counted in
`omsd_scheduled_job_failures_total{job}`; `FAILURES_BEFORE_ALARM` failures in a
row raise the alarm `scheduled_job_<id>`, which makes /readyz fail until the
job succeeds again. A run whose write the database refused (disk full) is not
counted: the `database_unwritable` alarm already says so.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

from apscheduler.events import (
    EVENT_JOB_ERROR,
    EVENT_JOB_EXECUTED,
    EVENT_JOB_MAX_INSTANCES,
    EVENT_JOB_MISSED,
    JobEvent,
)
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from omsd.state.store import Store, StoreUnwritable

from . import retention
from .health import Health
from .logs import get_logger
from .metrics import Metrics
from .notify import Progress

log = get_logger("omsd.jobs")

FAILURES_BEFORE_ALARM = 3
EVENTS = EVENT_JOB_EXECUTED | EVENT_JOB_ERROR | EVENT_JOB_MISSED | EVENT_JOB_MAX_INSTANCES


def alarm_name(job_id: str) -> str:
    return f"scheduled_job_{job_id}"


class Jobs:
    """The scheduler, its jobs, and what their runs say about health.

    In a fleet the accounts share one scheduler (`scheduler`): each account's jobs are named
    `PREFIX:job` there, and each account's first run comes `stagger` (0..1) of an interval
    after the start, so that a thousand accounts' jobs do not all fire in the same second."""

    def __init__(
        self,
        health: Health,
        metrics: Metrics,
        progress: Progress,
        *,
        failures_before_alarm: int = FAILURES_BEFORE_ALARM,
        shared: SharedScheduler | None = None,
        prefix: str = "",
        stagger: float = 0.0,
    ) -> None:
        self.scheduler = shared.scheduler if shared else AsyncIOScheduler(timezone=UTC)
        self._shared = shared
        self._prefix = f"{prefix}:" if shared else ""
        self._stagger = stagger
        self._health = health
        self._metrics = metrics
        self._progress = progress
        self._threshold = failures_before_alarm
        self._beats: dict[str, Callable[[], None]] = {}
        self.failures: dict[str, int] = {}  # failed runs in a row, by job
        if shared is not None:
            shared.listen(prefix, self._on_event)
        else:
            self.scheduler.add_listener(self._on_event, EVENTS)

    def add(
        self, job_id: str, func: Callable[[], Awaitable[object]], every_s: float, misfire_grace_s: float | None = None
    ) -> None:
        """Run `func` every `every_s`: one run at a time, missed runs coalesced."""
        self._beats[job_id] = self._progress.beat(f"job:{job_id}", period_s=every_s)
        self.failures[job_id] = 0
        self._metrics.alarm.labels(name=alarm_name(job_id)).set(0)
        first = {"start_date": datetime.now(UTC) + timedelta(seconds=every_s * self._stagger)} if self._stagger else {}
        self.scheduler.add_job(
            func,
            "interval",
            seconds=every_s,
            id=self._prefix + job_id,
            coalesce=True,
            max_instances=1,
            misfire_grace_time=max(1, int(misfire_grace_s if misfire_grace_s is not None else every_s)),
            **first,
        )

    def soon(self, job_id: str, in_s: float = 0.0) -> None:
        """Run `job_id` in `in_s` seconds rather than at its next interval (sooner only)."""
        job = self.scheduler.get_job(self._prefix + job_id)
        if job is None:
            return
        when = datetime.now(UTC) + timedelta(seconds=in_s)
        if job.next_run_time is None or job.next_run_time > when:
            job.modify(next_run_time=when)

    def start(self) -> None:
        if self._shared is None:
            self.scheduler.start()

    def shutdown(self) -> None:
        if self._shared is not None:  # the fleet's scheduler goes on: take this account's jobs out of it
            self._shared.forget(self._prefix[:-1])
            for job_id in self.failures:
                job = self.scheduler.get_job(self._prefix + job_id)
                if job is not None:
                    job.remove()
        elif self.scheduler.running:
            self.scheduler.shutdown(wait=False)

    def _on_event(self, event: JobEvent) -> None:
        job = event.job_id[len(self._prefix) :]
        if job not in self.failures:
            return
        if event.code == EVENT_JOB_MISSED:
            log.warning("scheduled_job_missed", job=job)
        elif event.code == EVENT_JOB_MAX_INSTANCES:
            log.warning("scheduled_job_skipped", job=job, reason="the previous run is still going")
        elif event.code == EVENT_JOB_ERROR and isinstance(event.exception, StoreUnwritable):
            self._beats[job]()
            log.warning("scheduled_job_paused", job=job, reason=event.exception.reason)
        elif event.code == EVENT_JOB_ERROR:
            self._beats[job]()
            self._failed(job, event.exception)
        else:
            self._beats[job]()
            self._succeeded(job)

    def _failed(self, job: str, exc: BaseException) -> None:
        in_row = self.failures[job] = self.failures[job] + 1
        self._metrics.scheduled_job_failures.labels(job=job).inc()
        error = f"{type(exc).__name__}: {exc}"
        log.error("scheduled_job_failed", job=job, error=error, failures_in_row=in_row)
        if in_row >= self._threshold:
            self._health.raise_alarm(alarm_name(job), f"{self._threshold} or more runs in a row failed; last {error}")

    def _succeeded(self, job: str) -> None:
        if self.failures[job]:
            self.failures[job] = 0
            self._health.clear_alarm(alarm_name(job))


class SharedScheduler:
    """One scheduler for a fleet's accounts, and one listener that hands each job's events to
    its account's `Jobs` (jobs are named `ACCOUNT:job`): not a listener per account, each
    called for every account's every run."""

    def __init__(self) -> None:
        self.scheduler = AsyncIOScheduler(timezone=UTC)
        self._listeners: dict[str, Callable[[JobEvent], None]] = {}
        self.scheduler.add_listener(self._on_event, EVENTS)

    def listen(self, prefix: str, listener: Callable[[JobEvent], None]) -> None:
        self._listeners[prefix] = listener

    def forget(self, prefix: str) -> None:
        self._listeners.pop(prefix, None)

    def start(self) -> None:
        self.scheduler.start()

    def shutdown(self) -> None:
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)

    def _on_event(self, event: JobEvent) -> None:
        listener = self._listeners.get(event.job_id.partition(":")[0])
        if listener is not None:
            listener(event)


def add_retention(
    jobs: Jobs, store: Store, days: int, every_s: float = retention.EVERY_S, *, truncate: bool = True
) -> None:
    """The `retention` job: prune what has been closed and quiet for `days`
    (OMSD_RETENTION_DAYS; 0: no job). It writes through the daemon's own store, so it
    never races the processor: each chunk of orders is one of the store's transactions.
    Not `truncate` (Litestream runs): the write-ahead log is left to Litestream's checkpoints."""
    if days <= 0:
        return

    async def prune() -> None:
        await retention.run_job(store, days, datetime.now(UTC), truncate=truncate)

    jobs.add("retention", prune, every_s)
