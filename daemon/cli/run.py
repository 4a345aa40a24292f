"""`omsd run`, `omsd demo`, `omsd sim`: the daemon, the demo, the simulator."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from omsd.state.store import StoreUnwritable

from ..config.accounts import FleetSettings, accounts_dir, load_fleet_settings
from ..config.settings import ConfigError, Settings, load_settings
from ..ops import lock, logs
from ..ops.supervisor import first_error
from .common import EXIT_BUSY, EXIT_CONFIG, EXIT_FAIL, EXIT_OK, EXIT_TEMPFAIL, Subparsers, command

log = logs.get_logger("omsd.run")


def add(sub: Subparsers[argparse.ArgumentParser]) -> None:
    command(
        sub,
        "run",
        _run,
        help="run the daemon until SIGTERM/SIGINT",
        description="Run the daemon (feed poller, processor, effect runner, HTTP server, timers) until "
        "SIGTERM or SIGINT, then stop polling, drain in-flight work within OMSD_SHUTDOWN_GRACE_S and exit 0. "
        "Needs OMSD_ACCOUNT, OMSD_APP_KEY, OMSD_APP_TOKEN, OMSD_CONNECTOR_NAME, OMSD_CONNECTOR_ENDPOINT. Without "
        "OMSD_ACCOUNT and with an accounts directory (OMSD_ACCOUNTS_DIR, default /etc/omsd/accounts.d): every "
        "account of it, one NAME.env each, in this one process; SIGHUP reads the directory again.",
    )
    d = command(
        sub,
        "demo",
        _demo,
        help="run the simulator and the daemon together on a scenario",
        description="Start the built-in VTEX simulator (three seller accounts) and one omsd serving all three, in one "
        "process on temporary databases, run a scenario of orders (some held then authorized, some held then "
        "rejected, some put back on hold), show live progress and a summary. Exit 0 only when every order reached "
        "the end it should.",
    )
    d.add_argument("--orders", type=int, default=60, help="number of orders (default 60)")
    d.add_argument("--seed", type=int, default=7, help="simulator random seed (default 7)")
    d.add_argument("--timeout", type=float, default=180.0, help="give up after this many seconds (default 180)")
    d.add_argument("--accounts", type=int, default=3, choices=range(1, 6), help="seller accounts (1..5, default 3)")
    d.add_argument(
        "--replicated",
        action="store_true",
        help="replicate the database with Litestream to a file:// replica beside it, with replicated durability",
    )
    sim = command(
        sub,
        "sim",
        _sim,
        help="run the VTEX simulator alone",
        description="Run the built-in VTEX simulator (feed, Get order, Channel Order API, faults) until interrupted.",
    )
    sim.add_argument("--listen", default="127.0.0.1:8788", help="HOST:PORT (default 127.0.0.1:8788)")
    sim.add_argument("--seed", type=int, default=7)
    sim.add_argument("--visibility-s", type=float, default=None, help="override the feed visibility timeout")
    sim.add_argument(
        "--accounts",
        metavar="A,B,...",
        help="serve these seller accounts, each under /NAME (its base URL) with its own credentials",
    )


def _run(args: argparse.Namespace) -> int:
    directory = accounts_dir(os.environ)
    if directory is not None:
        return _run_fleet(directory)
    settings = load_settings()
    logs.configure(settings.log_level, settings.log_format)
    from ..app import DaemonFailed

    try:
        asyncio.run(run_until_signalled(settings))
    except DaemonFailed as exc:
        if isinstance(exc.error, ConfigError):  # OMSD_LISTEN or OMSD_DB unusable: found only at start
            print(f"omsd: configuration error: {exc.error}", file=sys.stderr)
            return EXIT_CONFIG
        if isinstance(exc.error, lock.DatabaseBusy):
            print(f"omsd: {exc.error}", file=sys.stderr)
            return EXIT_BUSY
        # logged once as `omsd_fatal`
        return EXIT_TEMPFAIL if isinstance(exc.error, StoreUnwritable) else EXIT_FAIL
    return EXIT_OK


async def run_until_signalled(settings: Settings) -> None:
    """`omsd run`: until SIGTERM or SIGINT, then drain and return; DaemonFailed on a fatal error."""
    from ..app import Daemon

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    handlers: dict[signal.Signals, Callable[[], object]] = {
        signal.SIGTERM: stop.set,
        signal.SIGINT: stop.set,
        signal.SIGHUP: _reload_not_supported,
        signal.SIGUSR1: functools.partial(_ignored, "SIGUSR1"),
        signal.SIGUSR2: functools.partial(_ignored, "SIGUSR2"),
    }
    for sig, handler in handlers.items():
        loop.add_signal_handler(sig, handler)
    try:
        await Daemon(settings).run(stop)
    finally:
        for sig in handlers:
            loop.remove_signal_handler(sig)


def _run_fleet(directory: Path) -> int:
    """`omsd run` with an accounts directory: every account in one process (daemon/fleet)."""
    shared = load_fleet_settings()
    logs.configure(shared.log_level, shared.log_format)
    try:
        asyncio.run(run_fleet_until_signalled(shared, directory))
    except Exception as exc:  # the process's own (an account's are that account's: it restarts)
        error = first_error(exc)
        if isinstance(error, ConfigError):  # the listen address, an unreadable accounts directory
            print(f"omsd: configuration error: {error}", file=sys.stderr)
            return EXIT_CONFIG
        log.critical("omsd_fatal", error_type=type(error).__name__, error=str(error))
        return EXIT_FAIL
    return EXIT_OK


async def run_fleet_until_signalled(shared: FleetSettings, directory: Path) -> None:
    """A fleet until SIGTERM or SIGINT; SIGHUP reloads the accounts directory."""
    from ..fleet.fleet import Fleet

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    fleet = Fleet(shared, directory)
    handlers: dict[signal.Signals, Callable[[], object]] = {
        signal.SIGTERM: stop.set,
        signal.SIGINT: stop.set,
        signal.SIGHUP: fleet.reload,
        signal.SIGUSR1: functools.partial(_ignored, "SIGUSR1"),
        signal.SIGUSR2: functools.partial(_ignored, "SIGUSR2"),
    }
    for sig, handler in handlers.items():
        loop.add_signal_handler(sig, handler)
    try:
        await fleet.run(stop)
    finally:
        for sig in handlers:
            loop.remove_signal_handler(sig)


def _reload_not_supported() -> None:
    """SIGHUP conventionally asks for a reload; this version has none: say so and go on."""
    log.warning("reload_not_supported", signal="SIGHUP", detail="settings are read at start only; restart to apply")


def _ignored(name: str) -> None:
    """A stray signal whose default action would end omsd without a drain."""
    log.warning("signal_ignored", signal=name)


def _demo(args: argparse.Namespace) -> int:
    from ..tools.demo import run_demo

    if args.orders < 4:
        print("omsd: --orders must be at least 4", file=sys.stderr)
        return EXIT_CONFIG
    return asyncio.run(
        run_demo(args.orders, args.seed, args.timeout, replicated=args.replicated, accounts=args.accounts)
    )


def _sim(args: argparse.Namespace) -> int:
    from omsd.sim.server import serve, serve_fleet

    logs.configure("info", "auto")
    host, _, port = args.listen.rpartition(":")
    kw = {"seed": args.seed, "visibility_override_s": args.visibility_s}
    with contextlib.suppress(KeyboardInterrupt):
        if args.accounts:
            try:
                asyncio.run(serve_fleet(host, int(port), [a.strip() for a in args.accounts.split(",")], **kw))
            except ValueError as exc:
                print(f"omsd: --accounts: {exc}", file=sys.stderr)
                return EXIT_CONFIG
        else:
            asyncio.run(serve(host, int(port), **kw))
    return EXIT_OK
