"""The composition root: open resources in order, wire the parts, hand the loops to the
supervisor. Nothing else happens here.

Resources open in an AsyncExitStack (lock → store → HTTP session → HTTP server →
scheduler) and close in reverse. The HTTP server starts before VTEX's configuration is
confirmed, because VTEX pings the hook route when omsd creates the hook configuration.
READY=1 goes to systemd once the database is open, the server bound and the
configuration confirmed. A fatal error is logged once as `omsd_fatal` and leaves `run`
as DaemonFailed (`omsd run` exits non-zero and the supervisor restarts it).
"""

from __future__ import annotations

import asyncio
import functools
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from pathlib import Path

import aiohttp

from omsd.state.batch import Transition
from omsd.state.store import Store

from .config.settings import ConfigError, Settings, db_folder_problem
from .http.common import ApiContext
from .http.server import HttpServer
from .intake.feed import FeedPoller
from .intake.reads import FeedReads
from .ops import lock
from .ops.health import Health
from .ops.jobs import Jobs, add_retention
from .ops.litestream import SHUTDOWN_SYNC_S
from .ops.logs import get_logger, redact
from .ops.metrics import Metrics
from .ops.notify import Notifier, Progress, Summary, status_line, watchdog_loop
from .ops.probe import StoreProbe
from .ops.replica import Replica, publish
from .ops.supervisor import Loop, Supervisor, first_error
from .ops.waiting import Watermark
from .pipeline.effects import EffectRunner
from .pipeline.linking import ParkedIntents, resync_waiting
from .pipeline.processor import Processor
from .pipeline.timers import Timers
from .relay.relay import Relay
from .relay.webhooks import endpoints as relay_endpoints
from .vtex.client import VtexClient
from .vtex.configuration import VtexSetup
from .vtex.memory import VtexMemory

log = get_logger("omsd.app")

STATUS_EVERY_S = 10.0
ORPHAN_WAIT_S = SHUTDOWN_SYNC_S + 5.0  # how long a start waits for a dead omsd's Litestream to finish
UNCLEAN_READS = "the last omsd stopped while reading the feed: a release may wait out the visibility timeout"


class DaemonFailed(Exception):
    """omsd stopped on a fatal error, already logged once as `omsd_fatal`."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(f"{type(error).__name__}: {error}")
        self.error = error


class Daemon:
    """One running omsd. `run(stop)` returns when `stop` is set and work is drained,
    or raises DaemonFailed on a fatal error. Its parts are attributes once `run` built them."""

    def __init__(self, settings: Settings, notifier: Notifier | None = None) -> None:
        self.settings = settings
        self.ready = asyncio.Event()
        self.metrics = Metrics()
        self.health = Health(settings, self.metrics)
        self.notifier = notifier or Notifier()
        self.progress = Progress()
        self.http = HttpServer(settings, self.health)
        self.replica = Replica(settings, self.health, self.metrics)
        self.store: Store | None = None
        self.processor: Processor | None = None
        self.poller: FeedPoller | None = None
        self.runner: EffectRunner | None = None
        self.setup: VtexSetup | None = None
        self.relay: Relay | None = None
        self.jobs: Jobs | None = None
        redact(
            settings.app_token.get_secret_value(),
            settings.api_token.get_secret_value() if settings.api_token else None,
            settings.hook_secret.get_secret_value() if settings.hook_secret else None,
            settings.relay_secret.get_secret_value() if settings.relay_secret else None,
        )

    @property
    def url(self) -> str:
        return self.http.url

    async def run(self, stop: asyncio.Event) -> None:
        try:
            await self._run(stop)
        except Exception as exc:
            # A loop or a call raised (VTEX refused the credentials, the database is
            # unusable, a bug): resources are closed by now. One line says why.
            error = first_error(exc)
            log.critical("omsd_fatal", error_type=type(error).__name__, error=str(error))
            raise DaemonFailed(error) from exc

    async def _run(self, stop: asyncio.Event) -> None:
        s, notify, health, metrics = self.settings, self.notifier, self.health, self.metrics
        async with AsyncExitStack() as stack:
            stack.callback(notify.stopping)
            notify.status("opening the database")
            if (problem := db_folder_problem(s.db)) is not None:
                raise ConfigError(f"OMSD_DB: {problem}")
            lock_fd = await _hold_lock(stack, s.db)  # one process owns a database (omsd replay/ingest refuse)
            replica = self.replica
            if replica.enabled:
                # Before the store opens: restore a missing database; Litestream starts first
                # and stops last (after the store closed), so its connection is the last one.
                notify.status("replication: restoring or starting")
                await replica.prepare()
                stack.push_async_callback(replica.stop)
                await replica.start(lock_fd)
            # On a database that refuses writes (a full disk, a read-only file system) omsd
            # starts read-only: it serves, is not ready, and the probe takes up writing.
            store = self.store = await Store.open_or_read(s.db)
            stack.push_async_callback(store.close)
            store.db.on_unwritable, store.db.on_writable = health.store_unwritable, health.store_writable
            if store.db.read_only is not None:
                health.store_unwritable(store.db.read_only)
            probe = StoreProbe(store.db, metrics, every_s=s.store_probe_s)
            await probe.probe()
            on_replica = await replica.first_sync() if replica.enabled else False
            session = await stack.enter_async_context(aiohttp.ClientSession())
            client = VtexClient(s, session, metrics=metrics)

            runner = self.runner = EffectRunner(
                store,
                client,
                concurrency=s.effect_concurrency,
                metrics=metrics,
                before_send=replica.durable if s.replicated else None,
            )
            timers = Timers(store, lambda: processor.wake.set())
            # The outcomes readers see (the /v1/events routes, the relay): the last committed, or
            # under replicated durability the last on the replica (`publish`). Unless the first
            # sync reached it, what the last run committed may not be there: readers wait (they
            # never move back: a reader's `after` above the mark just waits) for publish's sync.
            last = (await store.outcomes.bounds())[1]
            mark = Watermark(last if on_replica or not s.replicated else 0)
            committed = Watermark(last) if s.replicated else mark
            processor = self.processor = Processor(
                store,
                s.policy(),
                on_effects=runner.wake.set,
                on_timer=timers.set_at,
                on_outcomes=committed.advance,
                metrics=metrics,
            )
            processor.listeners.append(self._count_transition)
            processor.on_stuck = health.orders_stuck
            runner.on_result = processor.wake.set
            poller = self.poller = FeedPoller(
                store,
                client,
                s,
                on_journal=processor.wake.set,
                metrics=metrics,
                health=health,
                durable=replica.synced if s.replicated else None,
            )

            async def recreated(reason: str, *, config: bool = True) -> None:
                if await resync_waiting(store, metrics, reason, datetime.now(UTC), recreated=config):
                    processor.wake.set()

            reads = FeedReads(store)

            async def read_feed(stop: asyncio.Event) -> None:
                """The feed poller, its reads marked: a start after a process that died reading
                re-checks the orders whose release may be among the items it took."""
                if await reads.begin() is not None:
                    await recreated(UNCLEAN_READS, config=False)
                await poller.run(stop)
                await reads.end()

            setup = self.setup = VtexSetup(client, s, health, metrics, on_recreated=recreated)
            poller.on_missing = setup.feed_missing
            if s.source == "both":  # the feed shows when the hook missed events: check the hook then
                poller.on_hook_missed = setup.hook_missed
            memory = VtexMemory(store, client, setup)
            await memory.restore()  # the rate learned, the Retry-After windows open, the last confirmations
            if health.store_ok.is_set():
                await runner.recover()  # else the effect runner recovers when writes work again

            notify.status("starting the HTTP server")
            context = ApiContext(
                s,
                store,
                processor,
                processor.wake.set,
                health,
                metrics,
                probe,
                outcome_mark=mark,
                durable=replica.synced,
            )
            await self.http.start(stack, context)
            endpoints = relay_endpoints(
                relay_url=s.relay_url, relay_vtex_url=s.relay_vtex_url, secret=s.relay_secret, account=s.account
            )
            relay = self.relay = Relay(
                store,
                endpoints,
                session,
                mark,
                health,
                metrics,
                timeout_s=s.relay_timeout_s,
                concurrency=s.relay_concurrency,
            )
            if not await setup.confirm_until(stop, notify.status):
                return
            jobs = self.jobs = self._jobs(store, processor, setup)
            jobs.start()
            stack.callback(jobs.shutdown)

            log.info("omsd_ready", listen=self.url, db=str(s.db), account=s.account, vtex=s.base_url, source=s.source)
            notify.ready(f"ready: {s.source} source, listening on {self.url}")
            self.ready.set()
            processor.progress = self.progress.beat("processor")
            runner.progress = self.progress.beat("effect-runner")
            await Supervisor(health.store_ok, grace_s=s.shutdown_grace_s, retry_s=s.store_probe_s).run(
                stop,
                intake=[Loop("feed-poller", read_feed)] if s.uses_feed else [],
                work=[
                    Loop("processor", processor.run, beat=processor.progress),
                    Loop("effect-runner", runner.run, beat=runner.progress, restart=runner.recover),
                    *([Loop("relay", relay.run)] if endpoints else []),
                    *(
                        [Loop("outcomes", functools.partial(publish, committed, mark, replica.durable))]
                        if s.replicated
                        else []
                    ),
                ],
                side=[
                    Loop("watchdog", functools.partial(watchdog_loop, notify, self.progress)),
                    Loop("store-probe", functools.partial(probe.run, writable=health.store_ok)),
                    Loop("timer-alarm", timers.run),
                    Loop("vtex-memory", memory.run),
                    Loop("vtex-setup", setup.run),
                    *([Loop("replica", replica.run)] if replica.enabled else []),
                ],
                on_stopping=notify.stopping,
            )
            log.info("omsd_stopped", offset=processor.offset)

    def _jobs(self, store: Store, processor: Processor, setup: VtexSetup) -> Jobs:
        s = self.settings
        jobs = Jobs(self.health, self.metrics, self.progress)
        summary = Summary()

        async def report_status() -> None:
            counts = await store.read.phase_counts()
            self.notifier.status(status_line(counts, processor.offset, self.health.alarms))
            summary.report(counts, processor.offset, self.health.alarms)

        jobs.add("self_check", setup.check, s.self_check_s)
        if s.source == "hook":  # no feed as a safety net: notice a deleted hook sooner while intents wait
            jobs.add(
                "waiting_self_check",
                functools.partial(setup.check_if_waiting, store.read.intents_waiting),
                s.waiting_self_check_s,
            )
        parked = ParkedIntents(
            store, self.metrics, processor.wake.set, ttl_s=s.parked_intent_ttl_s, lookups_per_run=s.link_lookups_per_run
        )
        jobs.add("parked_intents", parked.run_once, s.link_interval_s, misfire_grace_s=s.link_interval_s * 5)
        jobs.add("status", report_status, STATUS_EVERY_S)
        # While Litestream runs, only it may checkpoint past its read lock (a TRUNCATE would stall
        # every writer for the busy timeout and force a full snapshot upload).
        add_retention(jobs, store, s.retention_days, truncate=not self.replica.enabled)
        return jobs

    def _count_transition(self, t: Transition) -> None:
        self.metrics.on_transition(t.order_id, t.from_phase, t.to_phase, t.intent_at, datetime.now(UTC))


async def _hold_lock(stack: AsyncExitStack, db: Path) -> int:
    """Take the database lock; wait (up to ORPHAN_WAIT_S) while the Litestream of an omsd
    that died still holds it for its last sync."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + ORPHAN_WAIT_S
    while True:
        try:
            return stack.enter_context(lock.hold(db))
        except lock.DatabaseBusy as exc:
            if not exc.orphaned or loop.time() > deadline:
                raise
            await asyncio.sleep(0.2)
