"""What every command shares: exit codes, how a subcommand is declared, and how the
offline commands open the database (`offline`)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from omsd.state.store import Store, StoreError, StoreUnwritable

from ..config.settings import load_db_path
from ..ops import lock, logs
from ..ops.waiting import wait_any

EXIT_OK, EXIT_FAIL, EXIT_CONFIG, EXIT_BUSY = 0, 1, 2, 3
EXIT_TEMPFAIL = 75  # sysexits EX_TEMPFAIL: the database refused writes at start-up (disk full, read-only)
EXIT_CODES = (
    "exit codes: 0 success; 1 failure (an unknown order, refused input lines, a fatal error); "
    "2 bad configuration or usage, or no database at OMSD_DB; 3 another process owns the database; "
    "75 (omsd run) the database refused writes at start-up"
)
UNKNOWN = "no order with that id (VTEX order id or marketplace order id)"

Handler = Callable[[argparse.Namespace], int]
StoreCommand = Callable[[Store, argparse.Namespace], Awaitable[int]]
Subparsers = argparse._SubParsersAction  # argparse names no public type for it


def command(
    sub: Subparsers[argparse.ArgumentParser], name: str, handler: Handler, **kw: Any
) -> argparse.ArgumentParser:
    """A subcommand whose parsed arguments go to `handler`."""
    parser = sub.add_parser(name, epilog=EXIT_CODES, **kw)
    parser.set_defaults(handler=handler)
    return parser


def bounded(name: str, low: int, high: int) -> Callable[[str], int]:
    """An argparse type: a whole number from `low` to `high`, else a usage error (exit 2)
    rather than an OverflowError from SQLite or a date far outside the calendar."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text[:40]!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{name} must be {low}..{high}")
        return value

    parse.__name__ = name
    return parse


OFFSET = bounded("offset", 0, 2**63 - 1)  # SQLite's integers
LIMIT = bounded("limit", 1, 1_000_000_000)
DAYS = bounded("days", 0, 36500)  # OMSD_RETENTION_DAYS' range (0: no age at all)


def preview_options(p: argparse.ArgumentParser, dry_run: str, verbose: str) -> None:
    """--dry-run, --json and -v, as the commands that rebuild or append state take them."""
    p.add_argument("--dry-run", action="store_true", help=dry_run)
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("-v", "--verbose", action="store_true", help=verbose)


def offline(fn: StoreCommand, *, create: bool = False, owns: bool = False) -> Handler:
    """A command on the database alone. Only `create` commands may create it: every other
    refuses to make an empty database by accident. `owns` commands own the database while
    they work and refuse when another process (a running daemon) owns it; with --dry-run
    they open it read-only instead, so the file is left exactly as it was."""

    def handler(args: argparse.Namespace) -> int:
        db = load_db_path()
        if not create and not db.exists():
            print(f"omsd: no database at {db} ({_how_to_create(args)})", file=sys.stderr)
            return EXIT_CONFIG
        logs.configure("info" if getattr(args, "verbose", False) else "warning", "auto", stream=sys.stderr)
        preview = owns and args.dry_run
        try:
            with lock.hold(db) if owns and not preview else contextlib.nullcontext():
                return asyncio.run(_with_store(db, fn, args, readonly=preview))
        except lock.DatabaseBusy as exc:
            print(f"omsd: {exc}", file=sys.stderr)
            return EXIT_BUSY

    return handler


def _how_to_create(args: argparse.Namespace) -> str:
    """Where a missing database comes from: the service's own first start under a unit (an
    `omsd init` as root would leave files the service's user cannot write), else `omsd init`."""
    instance: str | None = getattr(args, "instance", None)
    if instance is not None or getattr(args, "service", False):
        unit = f"omsd@{instance}" if instance is not None else "omsd"
        return f"the service creates it at its first start: systemctl start {unit}; do not `omsd init` it as root"
    return "set OMSD_DB, or create one with `omsd init`"


async def _with_store(db: Path, fn: StoreCommand, args: argparse.Namespace, *, readonly: bool = False) -> int:
    async with await (Store.open_readonly(db) if readonly else _open(db)) as store:
        return await fn(store, args)


FOLLOW_POLL_S = 1.0


async def follow(step: Callable[[], Awaitable[bool]]) -> None:
    """Run `step` (print what is new; True when it printed something) again and again, a
    poll interval apart while nothing is new, until SIGINT or SIGTERM (`--follow`)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        while not stop.is_set():
            if not await step():
                await wait_any(stop, within_s=FOLLOW_POLL_S)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def _open(db: Path) -> Store:
    """For writing; read-only when the database refuses writes (a full disk, a read-only file
    system): the reading commands still work, a write says why it cannot."""
    try:
        return await Store.open(db)
    except StoreUnwritable as refused:
        reason = refused.reason
        try:
            store = await Store.open_readonly(db)
        except StoreError:
            raise refused from None
    print(f"omsd: warning: the database refuses writes ({reason}): opened read-only", file=sys.stderr)
    if store.db.unread_wal:
        print(
            "omsd: warning: its write-ahead log cannot be read without room for its -shm file: "
            "the latest writes may be missing",
            file=sys.stderr,
        )
    return store
