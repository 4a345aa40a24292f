"""The sd_notify protocol, spoken directly (a datagram to `$NOTIFY_SOCKET`).

READY=1 once omsd can serve, STATUS= lines saying what it does, WATCHDOG=1 only
while its loops make progress, STOPPING=1 on shutdown. Without `NOTIFY_SOCKET`
every call is a no-op.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections import deque
from collections.abc import Callable

from ..config.settings import systemd_environment
from .logs import get_logger

log = get_logger("omsd.notify")

SENT_KEPT = 64  # messages `Notifier.sent` remembers, for tests and debugging


class Notifier:
    def __init__(self, address: str | None = None, watchdog_usec: int | None = None, watchdog_pid: int | None = None):
        if address is None and watchdog_usec is None:
            env = systemd_environment()
            address, watchdog_usec, watchdog_pid = env.notify_socket, env.watchdog_usec, env.watchdog_pid
        self._address: str | bytes | None = None
        if address:
            # A leading "@" names a socket in the abstract namespace.
            self._address = b"\0" + address[1:].encode() if address.startswith("@") else address
        mine = watchdog_pid is None or watchdog_pid == os.getpid()
        self.watchdog_interval_s = watchdog_usec / 2e6 if watchdog_usec and mine else None
        self.sent: deque[str] = deque(maxlen=SENT_KEPT)  # the latest messages only

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, *lines: str) -> None:
        if self._address is None:
            return
        message = "\n".join(lines)
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(message.encode(), self._address)
        except OSError as exc:
            log.warning("sd_notify_failed", error=str(exc))
            return
        self.sent.append(message)

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")


class Progress:
    """Loops and scheduled jobs report progress here; the watchdog pings only while
    every one of them reported in time, so a stuck loop or a job that stopped
    running stops the pings."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._beats: dict[str, tuple[float, float]] = {}  # name -> (last beat, period)

    def beat(self, name: str, period_s: float = 0.0) -> Callable[[], None]:
        """Register a loop (or a job that runs every `period_s`); returns the
        function it calls on each turn."""
        self._beats[name] = (self._clock(), period_s)

        def tick() -> None:
            self._beats[name] = (self._clock(), period_s)

        return tick

    def stale(self, within_s: float) -> list[str]:
        """Who has not reported within `within_s`, plus two of its periods for a job."""
        now = self._clock()
        return [name for name, (at, period) in self._beats.items() if now - at > within_s + 2 * period]


async def watchdog_loop(notifier: Notifier, progress: Progress, stop: asyncio.Event) -> None:
    interval = notifier.watchdog_interval_s
    if interval is None:
        return
    window = 2 * interval  # systemd's WatchdogSec
    while not stop.is_set():
        stale = progress.stale(window)
        if stale:
            log.error("watchdog_withheld", stale_loops=stale)
        else:
            notifier.watchdog()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval)


def status_line(counts: dict[str, int], offset: int, alarms: dict[str, str]) -> str:
    """The STATUS= line systemd shows: approvals open and closed, the processor's offset, alarms."""
    open_ = sum(n for phase, n in counts.items() if phase not in ("tracking", "approved", "rejected", "dead"))
    named = ", ".join(sorted(alarms)) or "none"
    return (
        f"{open_} approvals open, {counts.get('approved', 0)} approved, {counts.get('dead', 0)} dead; "
        f"offset {offset}; alarms: {named}"
    )


SUMMARY_EVERY_S = 300.0


class Summary:
    """The `omsd_summary` info line: what the STATUS= line says, in the log at most once
    every `every_s` (the status job asks every 10 s). It is an idle omsd's only regular
    info line, so `journalctl -u omsd` shows that it runs and how it stands."""

    def __init__(self, every_s: float = SUMMARY_EVERY_S, clock: Callable[[], float] = time.monotonic) -> None:
        self._every_s = every_s
        self._clock = clock
        self._last = clock()

    def report(self, counts: dict[str, int], offset: int, alarms: dict[str, str]) -> bool:
        """Log the summary when it is due; True when it did."""
        now = self._clock()
        if now - self._last < self._every_s:
            return False
        self._last = now
        open_ = sum(n for phase, n in counts.items() if phase not in ("tracking", "approved", "rejected", "dead"))
        log.info(
            "omsd_summary",
            approvals_open=open_,
            phases={phase: n for phase, n in sorted(counts.items()) if n},
            offset=offset,
            alarms=sorted(alarms),
        )
        return True
