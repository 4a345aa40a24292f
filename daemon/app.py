"""The composition root: open resources in order, run the loops, shut down cleanly.

Resources open in an AsyncExitStack (store → HTTP session → VTEX client → HTTP
server → scheduler) and close in reverse. The HTTP server starts before VTEX's
configuration is checked because VTEX pings the hook route when omsd creates
the hook configuration. READY=1 goes to systemd once the database is open, the
server bound and the configuration confirmed. The poller, the processor, the
effect runner and the watchdog run as siblings in a TaskGroup (the effect
runner's calls in a TaskGroup of their own); if one fails, all stop, resources
close, one `omsd_fatal` line is logged and `run` raises DaemonFailed (`omsd run`
exits 1 and the supervisor restarts it). Scheduled jobs are watched by
`jobs.Jobs`. Shutdown: stop intake first, give in-flight work `shutdown_grace_s`, then cancel.

A database that refuses writes (disk full, read-only file, I/O error) is not
fatal: the store reports it, `Health` raises the `database_unwritable` alarm and
pauses intake (no feed GET; POSTs answer 503 with Retry-After), a loop whose
write failed waits and starts again, and a probe writes every `store_probe_s`
until a write commits, which resumes everything. The HTTP server's connections
are guarded (`connections.py`): a read deadline per request and a cap.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import os
import signal
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from typing import Any

import aiohttp
from aiohttp import web

from omsd.state.batch import Transition
from omsd.state.store import Store, StoreUnwritable

from .config.settings import ConfigError, Settings
from .http.guard import ConnectionGuard, install_accept_error_handler
from .http.routes import ApiContext, build_app
from .intake.feed import FeedPoller
from .ops import lock
from .ops.health import Health
from .ops.jobs import Jobs, add_retention
from .ops.logs import get_logger, redact
from .ops.metrics import Metrics
from .ops.notify import Notifier, Progress, watchdog_loop
from .ops.waiting import Alarm, wait_any
from .pipeline.effects import EffectRunner
from .pipeline.linking import ParkedIntents, resync_waiting
from .pipeline.processor import Processor
from .vtex.client import VtexClient
from .vtex.configuration import SelfCheck, ensure_feed_config, ensure_hook_config
from .vtex.errors import AuthFailed, VtexError

log = get_logger("omsd.app")

STATUS_EVERY_S = 10.0


class DaemonFailed(Exception):
    """omsd stopped on a fatal error, already logged once as `omsd_fatal`."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(f"{type(error).__name__}: {error}")
        self.error = error


class Daemon:
    """One running omsd. `run(stop)` returns when `stop` is set and work is drained,
    or raises DaemonFailed on a fatal error."""

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
        self.jobs: Jobs | None = None
        self.guard: ConnectionGuard | None = None
        self.store_probes = 0  # turns of the store probe's loop, paused or not
        self.alarm = Alarm()  # fires timers when due; the `timers` job's tick is the safety net
        self.url = ""
        redact(
            settings.app_token.get_secret_value(),
            settings.api_token.get_secret_value() if settings.api_token else None,
            settings.hook_secret.get_secret_value() if settings.hook_secret else None,
        )

    async def run(self, stop: asyncio.Event) -> None:
        try:
            await self._run(stop)
        except Exception as exc:
            # A loop or a call raised (VTEX refused the credentials, the database is
            # unusable, a bug): resources are closed by now. One line says why.
            error = _first_error(exc)
            log.critical("omsd_fatal", error_type=type(error).__name__, error=str(error))
            raise DaemonFailed(error) from exc

    async def _run(self, stop: asyncio.Event) -> None:
        s = self.settings
        notify = self.notifier
        async with AsyncExitStack() as stack:
            stack.callback(notify.stopping)
            notify.status("opening the database")
            if not s.db.parent.is_dir():
                raise ConfigError(f"OMSD_DB: the folder {s.db.parent} does not exist")
            stack.enter_context(lock.hold(s.db))  # one process owns a database (omsd replay/ingest refuse)
            store = await Store.open(s.db)
            stack.push_async_callback(store.close)
            self.store = store
            store.db.on_unwritable = self.health.store_unwritable
            store.db.on_writable = self.health.store_writable
            await store.db.probe_write()
            session = aiohttp.ClientSession()
            stack.push_async_callback(session.close)
            client = VtexClient(s, session, metrics=self.metrics)
            runner = EffectRunner(store, client, concurrency=s.effect_concurrency, metrics=self.metrics)
            processor = Processor(
                store, s.policy(), on_effects=runner.wake.set, on_timer=self.alarm.set_at, metrics=self.metrics
            )
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
            if self.health.store_ok.is_set():
                await runner.recover()  # else the effect runner recovers when writes work again

            notify.status("starting the HTTP server")
            await self._serve(stack, ApiContext(s, store, processor, processor.wake.set, self.health, self.metrics))

            if not await self._configure_vtex(client, stop):
                return
            jobs = self.jobs = self._jobs(store, processor)
            jobs.start()
            stack.callback(jobs.shutdown)

            log.info("omsd_ready", listen=self.url, db=str(s.db), account=s.account, vtex=s.base_url, source=s.source)
            notify.ready(f"ready: {s.source} source, listening on {self.url}")
            self.ready.set()
            await self._loops(stop, poller, processor, runner)
            log.info("omsd_stopped", offset=processor.offset)

    async def _serve(self, stack: AsyncExitStack, ctx: ApiContext) -> None:
        """omsd's routes behind the connection guard and the database's state. The
        listening socket is asyncio's own (not aiohttp's TCPSite) so that every
        connection goes through the guard; it closes before the runner cleans up."""
        s = self.settings
        loop = asyncio.get_running_loop()
        previous = loop.get_exception_handler()
        install_accept_error_handler(loop)
        stack.callback(loop.set_exception_handler, previous)
        guard = self.guard = ConnectionGuard(
            read_timeout_s=s.http_read_timeout_s, max_connections=s.http_max_connections
        )
        app = build_app(ctx)
        app.middlewares.append(guard.middleware)
        app.middlewares.append(self._store_state)
        web_runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0, keepalive_timeout=s.http_keepalive_s)
        await web_runner.setup()
        stack.push_async_callback(web_runner.cleanup)
        assert web_runner.server is not None
        try:
            server = await loop.create_server(guard.factory(web_runner.server), s.listen_host, s.listen_port)
        except OSError as exc:  # in use, not an address of this machine, a privileged port
            raise ConfigError(
                f"OMSD_LISTEN: cannot listen on {s.listen}: {os.strerror(exc.errno) if exc.errno else exc}"
            ) from None
        stack.push_async_callback(_close_listener, server)
        self.url = _site_url(server, s)

    @web.middleware
    async def _store_state(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """While the database refuses writes: 503 with Retry-After for every POST (all
        of them write), and /healthz says why. A write refused meanwhile: 503 too."""
        problem = self.health.store_problem
        if problem is not None and request.method == "POST":
            return self._unavailable(problem)
        try:
            response = await handler(request)
        except StoreUnwritable as exc:
            return self._unavailable(exc.reason)
        if problem is not None and request.path == "/healthz" and response.status == 200:
            return web.json_response({"status": "ok", "intake": "paused", "database": problem})
        return response

    def _unavailable(self, reason: str) -> web.Response:
        retry = str(math.ceil(self.settings.store_probe_s))
        body = {"error": f"database not writable: {reason}"}
        return web.json_response(body, status=503, headers={"Retry-After": retry})

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

    def _jobs(self, store: Store, processor: Processor) -> Jobs:
        s = self.settings
        jobs = Jobs(self.health, self.metrics, self.progress)
        self_check = self.self_check
        assert self_check is not None

        async def report_status() -> None:
            counts = await store.read.phase_counts()
            open_ = sum(n for phase, n in counts.items() if phase not in ("tracking", "approved", "rejected", "dead"))
            alarms = ", ".join(sorted(self.health.alarms)) or "none"
            self.notifier.status(
                f"{open_} approvals open, {counts.get('approved', 0)} approved, {counts.get('dead', 0)} dead; "
                f"offset {processor.offset}; alarms: {alarms}"
            )

        jobs.add("timers", self._fire_timers, s.timer_tick_s, misfire_grace_s=s.timer_tick_s * 5)
        jobs.add("self_check", self_check.run_once, s.self_check_s)
        if s.source == "hook":  # no feed as a safety net: notice a deleted hook sooner while intents wait
            jobs.add(
                "waiting_self_check",
                functools.partial(self_check.run_if_waiting, store.read.intents_waiting),
                s.waiting_self_check_s,
            )
        parked = ParkedIntents(
            store, self.metrics, processor.wake.set, ttl_s=s.parked_intent_ttl_s, lookups_per_run=s.link_lookups_per_run
        )
        jobs.add("parked_intents", parked.run_once, s.link_interval_s, misfire_grace_s=s.link_interval_s * 5)
        jobs.add("status", report_status, STATUS_EVERY_S)
        add_retention(jobs, store, s.retention_days)
        return jobs

    async def _fire_timers(self) -> None:
        """Turn due timers into events, then set the alarm for the next one (it holds only
        the earliest it was told of). Run by the alarm when a timer is due, and by the
        `timers` job every `timer_tick_s` as a safety net."""
        store, processor = self.store, self.processor
        assert store is not None
        assert processor is not None
        if await store.outbox.fire_due_timers(datetime.now(UTC)):
            processor.wake.set()
        if (due := await store.outbox.next_timer_due()) is not None:
            self.alarm.set_at(due)

    async def _alarm_fired(self) -> None:
        """The alarm's firing. A failure (the database refusing writes, a bug) is logged
        and left to the `timers` job, which tries again on its tick and is supervised."""
        try:
            await self._fire_timers()
        except Exception as exc:
            log.warning("timer_alarm_failed", error_type=type(exc).__name__, error=str(exc))

    def _count_transition(self, t: Transition) -> None:
        self.metrics.on_transition(t.order_id, t.from_phase, t.to_phase, t.intent_at, datetime.now(UTC))

    async def _loops(self, stop: asyncio.Event, poller: FeedPoller, processor: Processor, runner: EffectRunner) -> None:
        grace = self.settings.shutdown_grace_s
        intake_stop = asyncio.Event()
        work_stop = asyncio.Event()
        processor.progress = self.progress.beat("processor")
        runner.progress = self.progress.beat("effect-runner")
        resilient = self._resilient
        async with asyncio.TaskGroup() as tg:
            intake: list[asyncio.Task[None]] = []
            if self.settings.uses_feed:
                intake.append(tg.create_task(resilient(poller.run, intake_stop), name="feed-poller"))
            work = [
                tg.create_task(resilient(processor.run, work_stop, beat=processor.progress), name="processor"),
                tg.create_task(
                    resilient(runner.run, work_stop, beat=runner.progress, restart=runner.recover),
                    name="effect-runner",
                ),
            ]
            watchdog = tg.create_task(watchdog_loop(self.notifier, self.progress, work_stop), name="watchdog")
            tg.create_task(self._probe_store(work_stop), name="store-probe")
            self.alarm.set_at(datetime.now(UTC))  # timers left by the last run: fire the due, then the next
            tg.create_task(
                resilient(functools.partial(self.alarm.run, self._fire_timers), work_stop), name="timer-alarm"
            )
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

    async def _resilient(
        self,
        loop_: Callable[[asyncio.Event], Awaitable[None]],
        stop: asyncio.Event,
        *,
        beat: Callable[[], None] = lambda: None,
        restart: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        """Run `loop_(stop)`; when a write of it is refused, wait for the database
        (beating, so the watchdog knows it is waiting, not stuck), then start it
        again (after `restart`, e.g. recovering effects its failure left started)."""
        health = self.health
        starting = restart is not None and not health.store_ok.is_set()
        while True:
            try:
                if starting and restart is not None:
                    await restart()
                await loop_(stop)
                return
            except* StoreUnwritable as group:
                log.warning("loop_paused_database_unwritable", error=str(group.exceptions[0]))
            starting = restart is not None
            while not health.store_ok.is_set() and not stop.is_set():
                beat()
                await wait_any(health.store_ok, stop, within_s=self.settings.store_probe_s)
            if stop.is_set():
                return

    async def _probe_store(self, stop: asyncio.Event) -> None:
        """While the database refuses writes, try a real write every `store_probe_s`;
        the first that commits clears the alarm and resumes intake."""
        store = self.store
        assert store is not None
        while not stop.is_set():
            await wait_any(stop, within_s=self.settings.store_probe_s)
            if not self.health.store_ok.is_set():
                await store.db.probe_write()
            self.store_probes += 1


async def _close_listener(server: asyncio.Server) -> None:
    server.close()
    await server.wait_closed()


async def _wait_until(task: asyncio.Task[Any], deadline: float) -> None:
    remaining = max(0.0, deadline - asyncio.get_running_loop().time())
    done, _ = await asyncio.wait([task], timeout=remaining)
    if not done:
        log.warning("shutdown_grace_exceeded", task=task.get_name())
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _first_error(exc: BaseException) -> BaseException:
    """The first error a TaskGroup collected (groups nest: a loop's own TaskGroup)."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def _site_url(server: asyncio.Server, settings: Settings) -> str:
    sockets = server.sockets
    port = sockets[0].getsockname()[1] if sockets else settings.listen_port
    return f"http://{settings.listen_host}:{port}"


async def run_until_signalled(settings: Settings) -> None:
    """`omsd run`: until SIGTERM or SIGINT, then drain and return; DaemonFailed on a fatal error."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await Daemon(settings).run(stop)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
