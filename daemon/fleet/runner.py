"""One account of a fleet, supervised: started, restarted with backoff when it fails, stopped.

An account's fatal error (VTEX refuses its credentials, its database is corrupt or from a
newer omsd, a bug in one of its loops, a loop that stopped beating) stops that account's
loops and closes its resources (`Daemon.run` raises DaemonFailed), raises its alarm
(`account_failed`: /readyz, `omsd_alarm{account,name="account_failed"}`, `omsd accounts`)
and starts it again after a backoff: 5 s, then doubling to 5 minutes (`BACKOFF_S`), back to
5 s once a start ran `HEALTHY_S` (10 minutes). Meanwhile its routes answer 503 with
Retry-After to requests that prove its credential. The process and the other accounts go on.

A NAME.env that does not parse is not started at all: its error is shown until the file is
fixed and the fleet reloaded (SIGHUP).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Callable

import structlog

from ..app import Daemon, DaemonFailed, Host
from ..config.accounts import AccountConfig
from ..http.fleet import Directory
from ..ops.logs import get_logger
from ..ops.waiting import wait_any
from .metrics import FleetMetrics

log = get_logger("omsd.fleet")

BACKOFF_S = (5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 300.0)
HEALTHY_S = 600.0  # a start that ran this long resets the backoff
FAILED_ALARM = "account_failed"


def stagger_of(name: str) -> float:
    """Where in each interval this account's jobs run (0..1), the same at every start."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2**64


class AccountRunner:
    """Runs one account until `stop` (its own: a reload stops one account, not the fleet)."""

    def __init__(
        self,
        config: AccountConfig,
        host: Callable[[str], Host],
        directory: Directory,
        metrics: FleetMetrics,
        *,
        after: AccountRunner | None = None,
        backoff_s: tuple[float, ...] = BACKOFF_S,
    ) -> None:
        self.config = config
        self.name = config.name
        self._host = host
        self._directory = directory
        self._metrics = metrics
        self._after = after  # the runner this one replaces: it must let go of the database first
        self._backoff_s = backoff_s
        self.stop = asyncio.Event()
        self.settled = asyncio.Event()  # its first start became ready, or failed, or cannot happen
        self.finished = asyncio.Event()
        self.daemon: Daemon | None = None
        self.failures = 0
        self.last_error: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._kicked: str | None = None

    async def run(self) -> None:
        structlog.contextvars.bind_contextvars(account=self.name)
        try:
            if self._after is not None:
                await self._after.finished.wait()
            await self._run()
        finally:
            self.settled.set()
            self.finished.set()

    async def _run(self) -> None:
        config, directory = self.config, self._directory
        directory.configure(self.name, config.settings, config.error)
        if config.settings is None:
            log.error("account_invalid", error=config.error)
            self.settled.set()
            await self.stop.wait()
            return
        for warning in config.warnings:
            log.warning("account_setting_ignored", detail=warning)
        attempt = 0
        loop = asyncio.get_running_loop()
        while not self.stop.is_set():
            started = loop.time()
            error = await self._start_once()
            if error is None:
                return  # asked to stop
            if loop.time() - started >= HEALTHY_S:
                attempt = 0
            delay = self._backoff_s[min(attempt, len(self._backoff_s) - 1)]
            attempt += 1
            self.failures += 1
            self.last_error = error
            self._metrics.account_failures.labels(account=self.name).inc()
            self._metrics.account_up.labels(account=self.name).set(0)
            self._metrics.alarm.labels(account=self.name, name=FAILED_ALARM).set(1)
            directory.down[self.name] = f"{error} (next start in {delay:g}s)"
            log.error("account_failed", error=error, attempt=attempt, retry_in_s=delay)
            self.settled.set()
            await wait_any(self.stop, within_s=delay)

    async def _start_once(self) -> str | None:
        """Run the account once; None when it stopped as asked, else why it failed."""
        settings = self.config.settings
        assert settings is not None
        try:
            settings.db.parent.mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            return f"cannot create {settings.db.parent}: {exc.strerror or exc}"
        daemon = self.daemon = Daemon(settings, host=self._host(self.name))
        self._kicked = None
        task = self._task = asyncio.create_task(daemon.run(self.stop), name=f"account:{self.name}")
        ready = asyncio.create_task(daemon.ready.wait())
        try:
            await asyncio.wait([task, ready], return_when=asyncio.FIRST_COMPLETED)
            if daemon.ready.is_set():
                self._metrics.account_up.labels(account=self.name).set(1)
                self._metrics.alarm.labels(account=self.name, name=FAILED_ALARM).set(0)
                self.settled.set()
            await task
        except DaemonFailed as exc:
            return f"{type(exc.error).__name__}: {exc.error}"
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if self._kicked is None or current is None or current.cancelling():
                raise  # the fleet itself is being cancelled
            return self._kicked
        finally:
            ready.cancel()
            self._task = None
        return None

    def kick(self, reason: str) -> None:
        """Stop the running account at once (a loop stopped beating): it fails, and starts again."""
        if self._task is not None and not self._task.done():
            self._kicked = reason
            self._task.cancel()

    async def wait_finished(self) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await self.finished.wait()
