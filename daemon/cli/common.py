"""What every command shares: exit codes, how a subcommand is declared, and how the
offline commands open the database (`offline`)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from omsd.state.store import Store

from ..config.settings import load_db_path
from ..ops import lock, logs

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
    async with await (Store.open_readonly(db) if readonly else Store.open(db)) as store:
        return await fn(store, args)
