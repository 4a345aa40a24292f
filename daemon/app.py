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
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from dataclasses import dataclass
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
from .ops.jobs import Jobs, SharedScheduler, add_retention
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
from .pipeline.processor import MAX_BATCH, Processor
from .pipeline.timers import Timers
from .relay.relay import Relay
from .relay.webhooks import endpoints as relay_endpoints
from .vtex.client import VtexClient
from .vtex.configuration import VtexSetup
from .vtex.memory import VtexMemory

log = get_logger("omsd.app")

STATUS_EVERY_S = 10.0
# In a fleet, the jobs that only look for work: the parked intents' while none is parked (one is: at
# OMSD_LINK_INTERVAL_S), hook mode's check while intents wait (at least this: OMSD_WAITING_SELF_CHECK_S).
HOSTED_JOB_S = 60.0
HOSTED_PROBE_OK_S = 600.0  # in a fleet, the write probe while writes work (a real write failing tells sooner)
HOSTED_MAX_BATCH = 256  # in a fleet a batch is one turn across the accounts (ops/turns.py): keep it short
ORPHAN_WAIT_S = SHUTDOWN_SYNC_S + 5.0  # how long a start waits for a dead omsd's Litestream to finish
UNCLEAN_READS = "the last omsd stopped while reading the feed: a release may wait out the visibility timeout"


class DaemonFailed(Exception):
    """omsd stopped on a fatal error, already logged once as `omsd_fatal`."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(f"{type(error).__name__}: {error}")
        self.error = error


@dataclass
class Host:
    """What a fleet (daemon/fleet) lends each account it runs, in place of the account's own:
    the HTTP client session, the scheduler (jobs staggered by `stagger`), the HTTP server
    (`serve(account, context)` attaches the account's routes, `serve(account, None)` detaches
    them), the journal watcher (`watch(db, wake)` calls `wake` when the database changes, e.g.
    `omsd approve` wrote to it; it returns the call that stops watching), the turns across
    accounts for applying batches, the metrics every account shares, and a smaller SQLite page
    cache and statement cache (a thousand accounts hold a thousand connections). A hosted account sends
    nothing to systemd and runs no watchdog: the fleet does, once."""

    session: aiohttp.ClientSession
    scheduler: SharedScheduler
    serve: Callable[[str, ApiContext | None], None]
    watch: Callable[[Path, Callable[[], None]], Callable[[], None]]
    turn: Callable[[str], AbstractAsyncContextManager[object]]
    metrics: Metrics  # the fleet's families (daemon/fleet/metrics.py): the account adds its own
    stagger: float = 0.0  # 0..1: where in each interval this account's jobs run
    # The journal watcher wakes the processor, which wakes the effect runner: their own polls are
    # only a safety net, and their beats for the fleet's check of stuck accounts.
    poll_s: float = 300.0
    cache_kib: int | None = None
    statements: int | None = None  # prepared statements its connection keeps


class Daemon:
    """One running omsd. `run(stop)` returns when `stop` is set and work is drained,
    or raises DaemonFailed on a fatal error. Its parts are attributes once `run` built them.
    With a `host` it is one account of a fleet (see `Host`)."""

    def __init__(self, settings: Settings, notifier: Notifier | None = None, *, host: Host | None = None) -> None:
        self.settings = settings
        self.host = host
        self.ready = asyncio.Event()
        self.metrics = Metrics(aggregate=host.metrics if host else None)
        self.health = Health(settings, self.metrics)
        self.notifier = notifier or (Notifier("", 0) if host else Notifier())
        self.progress = Progress()
        self.http = HttpServer(settings)
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
            # unusable, a bug): resources are closed by now. One line says why (in a fleet
            # the fleet says it, with when it tries again).
            error = first_error(exc)
            if self.host is None:
                log.critical("omsd_fatal", error_type=type(error).__name__, error=str(error))
            raise DaemonFailed(error) from exc

    async def _run(self, stop: asyncio.Event) -> None:
        s, notify, health, metrics, host = self.settings, self.notifier, self.health, self.metrics, self.host
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
            kept = {"statements": host.statements} if host is not None and host.statements else {}
            store = self.store = await Store.open_or_read(s.db, **kept)
            stack.push_async_callback(store.close)
            if host is not None and host.cache_kib is not None:
                await store.db.limit_cache(host.cache_kib)
            store.db.on_unwritable, store.db.on_writable = health.store_unwritable, health.store_writable
            if store.db.read_only is not None:
                health.store_unwritable(store.db.read_only)
            probe = StoreProbe(
                store.db, metrics, every_s=s.store_probe_s, ok_every_s=HOSTED_PROBE_OK_S if host else None
            )
            await probe.probe()
            on_replica = await replica.first_sync() if replica.enabled else False
            session = host.session if host else await stack.enter_async_context(aiohttp.ClientSession())
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
                max_batch_size=HOSTED_MAX_BATCH if host else MAX_BATCH,
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
            if host is None:
                await self.http.start(stack, context)
            else:
                host.serve(s.account, context)
                stack.callback(host.serve, s.account, None)
                stack.callback(host.watch(s.db, processor.wake.set))
                processor.turn = functools.partial(host.turn, s.account)
            endpoints = relay_endpoints(
                relay_url=s.relay_url,
                relay_vtex_url=s.relay_vtex_url,
                secret=s.relay_secret,
                account=s.account,
                scoped=host is not None,
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

            ready = log.debug if host else log.info  # a fleet says it once for all its accounts
            ready("omsd_ready", listen=self.url, db=str(s.db), account=s.account, vtex=s.base_url, source=s.source)
            notify.ready(f"ready: {s.source} source, listening on {self.url}")
            self.ready.set()
            processor.progress = self.progress.beat("processor")
            runner.progress = self.progress.beat("effect-runner")
            await Supervisor(health.store_ok, grace_s=s.shutdown_grace_s, retry_s=s.store_probe_s).run(
                stop,
                intake=[Loop("feed-poller", read_feed)] if s.uses_feed else [],
                work=[
                    Loop(
                        "processor",
                        functools.partial(processor.run, poll_s=host.poll_s) if host else processor.run,
                        beat=processor.progress,
                    ),
                    Loop(
                        "effect-runner",
                        functools.partial(runner.run, poll_s=host.poll_s) if host else runner.run,
                        beat=runner.progress,
                        restart=runner.recover,
                    ),
                    *([Loop("relay", relay.run)] if endpoints else []),
                    *(
                        [Loop("outcomes", functools.partial(publish, committed, mark, replica.durable))]
                        if s.replicated
                        else []
                    ),
                ],
                side=[
                    *([] if host else [Loop("watchdog", functools.partial(watchdog_loop, notify, self.progress))]),
                    Loop("store-probe", functools.partial(probe.run, writable=health.store_ok)),
                    Loop("timer-alarm", timers.run),
                    Loop("vtex-memory", memory.run),
                    Loop("vtex-setup", setup.run),
                    *([Loop("replica", replica.run)] if replica.enabled else []),
                ],
                on_stopping=notify.stopping,
            )
            (log.debug if host else log.info)("omsd_stopped", offset=processor.offset)

    def _jobs(self, store: Store, processor: Processor, setup: VtexSetup) -> Jobs:
        s, host = self.settings, self.host
        if host is None:
            jobs = Jobs(self.health, self.metrics, self.progress)
        else:
            jobs = Jobs(
                self.health, self.metrics, self.progress, shared=host.scheduler, prefix=s.account, stagger=host.stagger
            )
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
                max(s.waiting_self_check_s, HOSTED_JOB_S) if host else s.waiting_self_check_s,
            )
        parked = ParkedIntents(
            store, self.metrics, processor.wake.set, ttl_s=s.parked_intent_ttl_s, lookups_per_run=s.link_lookups_per_run
        )
        if host is None:
            jobs.add("parked_intents", parked.run_once, s.link_interval_s, misfire_grace_s=s.link_interval_s * 5)
        else:
            # A thousand accounts' jobs every 2 s would be most of an idle fleet's work: the job runs
            # at the link interval only while intents are parked (the processor says when one is).

            async def parked_run() -> None:
                await parked.run_once()
                if await store.read.parked_count():
                    jobs.soon("parked_intents", s.link_interval_s)

            every = max(s.link_interval_s, HOSTED_JOB_S)
            jobs.add("parked_intents", parked_run, every, misfire_grace_s=every)
            processor.on_parked = functools.partial(jobs.soon, "parked_intents")
        if host is None:  # a fleet reports one status line for all its accounts
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
