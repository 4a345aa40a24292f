"""The fleet: one process serving every account of `OMSD_ACCOUNTS_DIR`.

The composition root of the process (each account's own is `Daemon`, daemon/app.py): it
opens what the accounts share, in an AsyncExitStack (HTTP client session → scheduler →
HTTP server) and runs, in one TaskGroup, an `AccountRunner` per account
(daemon/fleet/runner.py: isolation, restarts), the journal watcher, the watchdog and the
status line. What is shared, and why:

- one aiohttp ClientSession: its connection pool is per host and VTEX's hosts are per
  account (`{account}.vtexcommercestable.com.br`), so one account cannot take another's
  connections; the total is not capped (each account caps its own calls in flight);
- one scheduler (APScheduler), each account's jobs staggered across their interval;
- one HTTP server (http/fleet.py), one Prometheus exposition (daemon/fleet/metrics.py);
- turns across accounts for applying batches (ops/turns.py), so a busy account yields to a
  quiet one after each batch;
- one journal watcher (daemon/fleet/watcher.py) instead of a journal poll per account;
- one sd_notify: READY=1 once every account had its first start, one STATUS= line, and the
  watchdog while the fleet's own loop runs; an account whose loop stops beating is
  restarted alone (`account_stalled`), not the whole process.

`reload()` (SIGHUP) reads the directory again: a new file starts its account, a changed file
restarts only that account (the old one drains first: it holds the database's lock), a
removed file stops that account's intake and drains it; its database stays where it is.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from contextlib import AsyncExitStack
from pathlib import Path

import aiohttp

from ..app import Host
from ..config.accounts import AccountConfig, FleetSettings, read_accounts
from ..config.settings import ConfigError
from ..http.fleet import Directory, build_fleet_app
from ..http.server import HttpServer
from ..ops.jobs import SharedScheduler
from ..ops.logs import get_logger, redact
from ..ops.notify import Notifier
from ..ops.turns import Turns
from ..ops.waiting import wait_any
from .metrics import FleetMetrics, Scraped
from .runner import AccountRunner, stagger_of
from .watcher import JournalWatcher

log = get_logger("omsd.fleet")

STATUS_EVERY_S = 10.0
START_WAIT_S = 60.0  # /readyz passes once every account settled, or this long after the start
CACHE_KIB = 128  # SQLite's page cache per account (2 MiB alone): an idle account reads a few pages
STATEMENTS = 16  # prepared statements per account's connection (128 alone): ~100 KiB an account
TURNS_AT_ONCE = 1  # accounts applying a batch at the same time (ops/turns.py)
STALL_S = 900.0  # an account loop that did not beat this long is stuck: that account is restarted
# (its idle loops poll every third of that, so they beat in time; a thousand accounts: 7 polls a second)


class Fleet:
    """Every account of the accounts directory. `run(stop)` until `stop`; `reload()` on SIGHUP."""

    def __init__(
        self,
        shared: FleetSettings,
        directory: Path,
        *,
        notifier: Notifier | None = None,
        environ: Mapping[str, str] | None = None,
        watch_every_s: float = 1.0,
        backoff_s: tuple[float, ...] | None = None,
        stall_s: float = STALL_S,
    ) -> None:
        self.shared = shared
        self.path = directory
        self.notifier = notifier or Notifier()
        self._environ = environ
        self.directory = Directory(operator_token=shared.api_token)
        self.metrics = FleetMetrics()
        self.watcher = JournalWatcher(watch_every_s)
        self.turns = Turns(TURNS_AT_ONCE)
        self.http = HttpServer(shared)
        self.runners: dict[str, AccountRunner] = {}
        self.ready = asyncio.Event()
        self._backoff_s = backoff_s
        self._stall_s = stall_s
        self._reload = asyncio.Event()
        self._reloaded = asyncio.Event()
        self._tg: asyncio.TaskGroup | None = None
        self._session: aiohttp.ClientSession | None = None
        self._scheduler: SharedScheduler | None = None
        redact(shared.api_token.get_secret_value() if shared.api_token else None)

    @property
    def url(self) -> str:
        return self.http.url

    def read(self) -> dict[str, AccountConfig]:
        known = {name: runner.config for name, runner in self.runners.items()}
        return read_accounts(self.path, self._environ, known=known)

    async def run(self, stop: asyncio.Event) -> None:
        configs = self.read()  # an unreadable directory is the process's error (exit 2)
        notify = self.notifier
        async with AsyncExitStack() as stack:
            stack.callback(notify.stopping)
            connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
            self._session = await stack.enter_async_context(aiohttp.ClientSession(connector=connector))
            self._scheduler = SharedScheduler()
            self._scheduler.start()
            stack.callback(self._scheduler.shutdown)
            self.directory.render_metrics = self._render_metrics
            app = build_fleet_app(self.directory, self.shared.connector_endpoint)
            await self.http.start(stack, app=app)
            fleet_stop = asyncio.Event()
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                for config in configs.values():
                    self._start(config)
                tg.create_task(self.watcher.run(fleet_stop), name="journal-watcher")
                tg.create_task(self._watchdog(fleet_stop), name="watchdog")
                tg.create_task(self._status(fleet_stop), name="status")
                await self._settle(stop)
                self.directory.started = True
                self.ready.set()
                ready = sum(1 for r in self.runners.values() if r.daemon is not None and r.daemon.ready.is_set())
                log.info("omsd_ready", listen=self.url, accounts=len(self.runners), ready=ready)
                notify.ready(f"ready: {len(self.runners)} accounts, listening on {self.url}")
                while not stop.is_set():
                    await wait_any(stop, self._reload, within_s=3600)
                    if self._reload.is_set() and not stop.is_set():
                        self._reload.clear()
                        self._apply_reload()
                        self._reloaded.set()
                log.info("omsd_stopping", grace_s=self.shared.shutdown_grace_s, accounts=len(self.runners))
                notify.stopping()
                for runner in self.runners.values():
                    runner.stop.set()
                await self._drained()
                fleet_stop.set()
            log.info("omsd_stopped", accounts=len(self.runners))

    async def _settle(self, stop: asyncio.Event) -> None:
        """Until every account became ready, failed or cannot start (or START_WAIT_S, or stop)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_WAIT_S
        for runner in list(self.runners.values()):
            remaining = deadline - loop.time()
            if stop.is_set() or remaining <= 0:
                return
            await wait_any(runner.settled, stop, within_s=remaining)

    async def _drained(self) -> None:
        """Every account drains within the grace period (each is given it: they drain together)."""
        waits = [r.wait_finished() for r in self.runners.values()]
        if waits:
            await asyncio.gather(*waits)

    # ---- accounts -----------------------------------------------------------------------
    def host(self, name: str) -> Host:
        assert self._session is not None
        assert self._scheduler is not None
        return Host(
            session=self._session,
            scheduler=self._scheduler,
            serve=self.directory.attach,
            watch=self.watcher.watch,
            turn=self.turns.turn,
            metrics=self.metrics.aggregate,
            stagger=stagger_of(name),
            poll_s=self._stall_s / 3,
            cache_kib=CACHE_KIB,
            statements=STATEMENTS,
        )

    def _start(self, config: AccountConfig, after: AccountRunner | None = None) -> AccountRunner:
        assert self._tg is not None
        kw = {"backoff_s": self._backoff_s} if self._backoff_s is not None else {}
        runner = AccountRunner(config, self.host, self.directory, self.metrics, after=after, **kw)
        self.runners[config.name] = runner
        self._tg.create_task(runner.run(), name=f"runner:{config.name}")
        self._count()
        return runner

    def reload(self) -> None:
        """SIGHUP: read the accounts directory again, soon (in the fleet's own task)."""
        self._reloaded.clear()
        self._reload.set()

    async def reloaded(self) -> None:
        """Wait for the reload asked for last to be applied."""
        await self._reloaded.wait()

    def _apply_reload(self) -> None:
        try:
            configs = self.read()
        except ConfigError as exc:
            self.metrics.reloads.labels(result="failed").inc()
            log.error("reload_failed", error=str(exc))
            return
        added = [n for n in configs if n not in self.runners]
        removed = [n for n in self.runners if n not in configs]
        changed = [n for n in configs if n in self.runners and configs[n].digest != self.runners[n].config.digest]
        for name in removed:
            runner = self.runners.pop(name)
            runner.stop.set()
            assert self._tg is not None
            self._tg.create_task(self._forget(runner), name=f"remove:{name}")
        for name in changed:
            old = self.runners[name]
            old.stop.set()
            self._start(configs[name], after=old)
        for name in added:
            self._start(configs[name])
        self._count()
        self.metrics.reloads.labels(result="ok").inc()
        log.info("fleet_reloaded", added=added, changed=changed, removed=removed, accounts=len(self.runners))

    async def _forget(self, runner: AccountRunner) -> None:
        await runner.wait_finished()
        if runner.name not in self.runners:  # not added back meanwhile
            self.directory.remove(runner.name)
            self.metrics.forget(runner.name)
        log.info(
            "account_removed",
            account=runner.name,
            db=str(runner.config.settings.db) if runner.config.settings else None,
        )

    def _count(self) -> None:
        invalid = sum(1 for r in self.runners.values() if r.config.settings is None)
        running = sum(1 for r in self.runners.values() if r.name in self.directory.running)
        self.metrics.accounts.labels(state="invalid").set(invalid)
        self.metrics.accounts.labels(state="running").set(running)
        self.metrics.accounts.labels(state="not_running").set(len(self.runners) - invalid - running)

    # ---- the process's loops ------------------------------------------------------------
    async def _render_metrics(self) -> bytes:
        self._count()
        running = {
            name: Scraped(ctx.metrics, ctx.store, ctx.settings.db) for name, ctx in self.directory.running.items()
        }
        for ctx in self.directory.running.values():  # as /readyz would answer, from the last probe (no write)
            ctx.metrics.ready.set(0 if ctx.health.problems(ctx.probe.ok) else 1)
        return await self.metrics.render(running, self.watcher.version)

    async def _watchdog(self, stop: asyncio.Event) -> None:
        """WATCHDOG=1 while the fleet's loop runs; an account whose loop stopped beating is
        restarted alone."""
        interval = min(self.notifier.watchdog_interval_s or 30.0, self._stall_s / 2)
        while not stop.is_set():
            for runner in list(self.runners.values()):
                daemon = runner.daemon
                if daemon is None or not daemon.ready.is_set():
                    continue
                stale = daemon.progress.stale(self._stall_s)
                if stale:
                    log.error("account_stalled", account=runner.name, stale_loops=stale)
                    runner.kick(f"account_stalled: {', '.join(stale)} stopped beating")
            self.notifier.watchdog()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval)

    async def _status(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            running = len(self.directory.running)
            down = sorted(self.directory.down)
            alarmed = sum(1 for ctx in self.directory.running.values() if ctx.health.alarms)
            self.notifier.status(
                f"{len(self.runners)} accounts: {running} running, {len(down)} not running, {alarmed} with alarms"
            )
            await wait_any(stop, within_s=STATUS_EVERY_S)
