"""The composition root: open resources in order, run the loops, shut down cleanly.

Resources open in an AsyncExitStack (store → HTTP session → VTEX client → HTTP
server → scheduler) and close in reverse. The HTTP server starts before VTEX's
configuration is checked because VTEX pings the hook route when omsd creates
the hook configuration. READY=1 goes to systemd once the database is open, the
server bound and the configuration confirmed. The poller, the processor, the
effect runner and the watchdog run as siblings in a TaskGroup; if one fails,
all stop and the error surfaces (the supervisor restarts the process).
Shutdown: stop intake first, give in-flight work `shutdown_grace_s`, then cancel.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from typing import Any

import aiohttp
from aiohttp import web
from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_MISSED, JobExecutionEvent
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from omsd.daemon.api import ApiContext, build_app
from omsd.daemon.effects import EffectRunner
from omsd.daemon.errors import AuthFailed, VtexError
from omsd.daemon.feed import FeedPoller
from omsd.daemon.health import Health
from omsd.daemon.jobs import ParkedIntents, resync_waiting
from omsd.daemon.logs import get_logger, redact
from omsd.daemon.metrics import Metrics
from omsd.daemon.notify import Notifier, Progress, watchdog_loop
from omsd.daemon.processor import Processor, Transition
from omsd.daemon.settings import Settings
from omsd.daemon.vtex import VtexClient
from omsd.daemon.vtexconfig import SelfCheck, ensure_feed_config, ensure_hook_config
from omsd.daemon.wakeup import wait_any
from omsd.state.statuses import Phase
from omsd.state.store import Store

log = get_logger("omsd.app")


class Daemon:
    """One running omsd. `run(stop)` returns when `stop` is set and work is drained."""

    def __init__(self, settings: Settings, notifier: Notifier | None = None) -> None:
        self.settings = settings
        self.ready = asyncio.Event()
        self.metrics = Metrics()
        self.health = Health(settings, self.metrics)
        self.notifier = notifier or Notifier()
        self.progress = Progress()
        self.store: Store | None = None
        self.processor: Processor | None = None
        self.poller: FeedPoller | None = None
        self.runner: EffectRunner | None = None
        self.self_check: SelfCheck | None = None
        self.url = ""
        redact(
            settings.app_token.get_secret_value(),
            settings.api_token.get_secret_value() if settings.api_token else None,
            settings.hook_secret.get_secret_value() if settings.hook_secret else None,
        )

    async def run(self, stop: asyncio.Event) -> None:
        s = self.settings
        notify = self.notifier
        async with AsyncExitStack() as stack:
            stack.callback(notify.stopping)
            notify.status("opening the database")
            store = await Store.open(s.db)
            stack.push_async_callback(store.close)
            self.store = store
            session = aiohttp.ClientSession()
            stack.push_async_callback(session.close)
            client = VtexClient(s, session, metrics=self.metrics)
            runner = EffectRunner(store, client, concurrency=s.effect_concurrency, metrics=self.metrics)
            processor = Processor(store, s.policy(), on_effects=runner.wake.set)
            processor.listeners.append(self._count_transition)
            runner.on_result = processor.wake.set
            self.processor, self.runner = processor, runner
            poller = FeedPoller(
                store, client, s, on_journal=processor.wake.set, metrics=self.metrics, health=self.health
            )
            self.poller = poller
            self.self_check = SelfCheck(client, s, self.health, self.metrics)

            async def config_recreated(reason: str) -> None:
                if await resync_waiting(store, self.metrics, reason, datetime.now(UTC)):
                    processor.wake.set()

            self.self_check.on_recreated = poller.on_config_recreated = config_recreated
            await runner.recover()

            notify.status("starting the HTTP server")
            web_runner = web.AppRunner(
                build_app(
                    ApiContext(
                        settings=s,
                        store=store,
                        processor=processor,
                        wake=processor.wake.set,
                        health=self.health,
                        metrics=self.metrics,
                    )
                ),
                access_log=None,
                shutdown_timeout=2.0,
            )
            await web_runner.setup()
            stack.push_async_callback(web_runner.cleanup)
            site = web.TCPSite(web_runner, s.listen_host, s.listen_port)
            await site.start()
            self.url = _site_url(site, s)

            if not await self._configure_vtex(client, stop):
                return
            scheduler = self._scheduler(store, processor)
            scheduler.start()
            stack.callback(lambda: scheduler.shutdown(wait=False) if scheduler.running else None)

            log.info("omsd_ready", listen=self.url, db=str(s.db), account=s.account, vtex=s.base_url, source=s.source)
            notify.ready(f"ready: {s.source} source, listening on {self.url}")
            self.ready.set()
            await self._loops(stop, poller, processor, runner)
            log.info("omsd_stopped", offset=processor.offset)

    async def _configure_vtex(self, client: VtexClient, stop: asyncio.Event) -> bool:
        """Confirm (or create) the feed and hook configurations. Retried until it works
        or omsd is stopped; refused credentials are fatal. False when stopped first."""
        delay = 1.0
        while not stop.is_set():
            self.notifier.status("checking VTEX's configuration")
            try:
                if self.settings.uses_feed:
                    await ensure_feed_config(client, self.settings, self.health)
                if self.settings.uses_hook:
                    await ensure_hook_config(client, self.settings, self.health)
                self.health.last_self_check_ok = self.health.clock()
                return True
            except AuthFailed:
                raise
            except VtexError as exc:
                log.warning("vtex_config_check_failed", error=str(exc), retry_in_s=delay)
                self.notifier.status(f"waiting for VTEX: {exc}")
            await wait_any(stop, within_s=delay)
            delay = min(30.0, delay * 2)
        return False

    def _scheduler(self, store: Store, processor: Processor) -> AsyncIOScheduler:
        s = self.settings
        scheduler = AsyncIOScheduler(timezone=UTC)
        self_check = self.self_check
        assert self_check is not None

        async def fire_timers() -> None:
            if await store.fire_due_timers(datetime.now(UTC)):
                processor.wake.set()

        async def report_status() -> None:
            counts = await store.phase_counts()
            open_ = sum(n for phase, n in counts.items() if phase not in ("tracking", "approved", "rejected", "dead"))
            alarms = ", ".join(sorted(self.health.alarms)) or "none"
            self.notifier.status(
                f"{open_} approvals open, {counts.get('approved', 0)} approved, {counts.get('dead', 0)} dead; "
                f"offset {processor.offset}; alarms: {alarms}"
            )

        common: dict[str, Any] = {"coalesce": True, "max_instances": 1}
        scheduler.add_job(
            fire_timers, "interval", seconds=s.timer_tick_s, id="timers",
            misfire_grace_time=max(1, int(s.timer_tick_s * 5)), **common,
        )  # fmt: skip
        scheduler.add_job(
            self_check.run_once, "interval", seconds=s.self_check_s, id="self_check",
            misfire_grace_time=max(1, int(s.self_check_s)), **common,
        )  # fmt: skip
        if s.source == "hook":  # no feed as a safety net: notice a deleted hook sooner while intents wait
            scheduler.add_job(
                self_check.run_if_waiting, "interval", seconds=s.waiting_self_check_s, id="waiting_self_check",
                args=[store.intents_waiting], misfire_grace_time=max(1, int(s.waiting_self_check_s)), **common,
            )  # fmt: skip
        parked = ParkedIntents(
            store, self.metrics, processor.wake.set, ttl_s=s.parked_intent_ttl_s, lookups_per_run=s.link_lookups_per_run
        )
        scheduler.add_job(
            parked.run_once, "interval", seconds=s.link_interval_s, id="parked_intents",
            misfire_grace_time=max(1, int(s.link_interval_s * 5)), **common,
        )  # fmt: skip
        scheduler.add_job(report_status, "interval", seconds=10, id="status", misfire_grace_time=10, **common)
        scheduler.add_listener(_job_listener, EVENT_JOB_ERROR | EVENT_JOB_MISSED)
        return scheduler

    def _count_transition(self, t: Transition) -> None:
        if t.to_phase == Phase.APPROVED and t.from_phase != Phase.APPROVED:
            self.metrics.approvals_confirmed.inc()
        if t.to_phase == Phase.DEAD and t.from_phase != Phase.DEAD:
            self.metrics.dead_letters.inc()

    async def _loops(self, stop: asyncio.Event, poller: FeedPoller, processor: Processor, runner: EffectRunner) -> None:
        grace = self.settings.shutdown_grace_s
        intake_stop = asyncio.Event()
        work_stop = asyncio.Event()
        processor.progress = self.progress.beat("processor")
        runner.progress = self.progress.beat("effect-runner")
        async with asyncio.TaskGroup() as tg:
            intake: list[asyncio.Task[None]] = []
            if self.settings.uses_feed:
                intake.append(tg.create_task(poller.run(intake_stop), name="feed-poller"))
            work = [
                tg.create_task(processor.run(work_stop), name="processor"),
                tg.create_task(runner.run(work_stop), name="effect-runner"),
            ]
            watchdog = tg.create_task(watchdog_loop(self.notifier, self.progress, work_stop), name="watchdog")
            stopper = tg.create_task(stop.wait(), name="stop-signal")
            await asyncio.wait([stopper, *intake, *work], return_when=asyncio.FIRST_COMPLETED)
            if not stop.is_set():
                # A loop ended without being asked to: stop the rest. If it raised,
                # the TaskGroup re-raises its error when this block exits.
                log.error("omsd_loop_ended", tasks=[t.get_name() for t in (*intake, *work) if t.done()])
                stopper.cancel()
                intake_stop.set()
                work_stop.set()
                return
            log.info("omsd_stopping", grace_s=grace)
            self.notifier.stopping()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + grace
            intake_stop.set()
            for task in intake:
                await _wait_until(task, deadline)
            work_stop.set()
            for task in [*work, watchdog]:
                await _wait_until(task, deadline)


async def _wait_until(task: asyncio.Task[Any], deadline: float) -> None:
    remaining = max(0.0, deadline - asyncio.get_running_loop().time())
    done, _ = await asyncio.wait([task], timeout=remaining)
    if not done:
        log.warning("shutdown_grace_exceeded", task=task.get_name())
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _job_listener(event: JobExecutionEvent) -> None:
    if event.exception is not None:
        log.error("scheduled_job_failed", job=event.job_id, error=repr(event.exception))
    else:
        log.warning("scheduled_job_missed", job=event.job_id)


def _site_url(site: web.TCPSite, settings: Settings) -> str:
    server = site._server
    sockets = getattr(server, "sockets", None) or []
    port = sockets[0].getsockname()[1] if sockets else settings.listen_port
    return f"http://{settings.listen_host}:{port}"


async def run_until_signalled(settings: Settings) -> None:
    """`omsd run`: until SIGTERM or SIGINT, then drain and return."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await Daemon(settings).run(stop)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
