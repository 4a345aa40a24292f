"""The `omsd` command line: run the daemon, the demo, and the operator's tools.

Exit codes: 0 success; 1 runtime failure (including a demo that did not end as
it should, an unknown order, input lines refused by `ingest`); 2 bad configuration
or usage (one line naming the variable), or no database at OMSD_DB for a command
that needs one; 3 another process owns the database (`run`, `replay`, `ingest`,
`prune` refuse to work beside a running daemon; the message names its pid).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.table import Table

from omsd.state.events import Resync
from omsd.state.models import Order
from omsd.state.statuses import Phase
from omsd.state.store import HistoryRow, JournalRow, NewEntry, Store, StoreError, StoreUnwritable

from ..config.instance import instance_environment
from ..config.settings import (
    ConfigError,
    Settings,
    load_db_path,
    load_local,
    load_policy,
    load_settings,
    warn_unknown_variables,
)
from ..intake import entries as intake
from ..ops import lock as _lock
from ..ops import logs, retention
from ..ops.waiting import wait_any
from ..tools import ingest, replay
from ..tools.ingest import KINDS
from ..vtex.errors import VtexError

EXIT_OK, EXIT_FAIL, EXIT_CONFIG, EXIT_BUSY = 0, 1, 2, 3
EXIT_TEMPFAIL = 75  # sysexits EX_TEMPFAIL: the database refused writes at start-up (disk full, read-only)
EXIT_CODES = (
    "exit codes: 0 success; 1 failure (an unknown order, refused input lines, a fatal error); "
    "2 bad configuration or usage, or no database at OMSD_DB; 3 another process owns the database; "
    "75 (omsd run) the database refused writes at start-up"
)

DESCRIPTION = """\
omsd approves VTEX marketplace orders exactly when they leave
waiting-for-manual-authorization. It reads the VTEX order feed, journals every
event in SQLite before acknowledging it, runs a state machine per order, and
sends the Channel Order API approval only after Get order confirms the order is
neither held nor canceled.

Configuration comes from OMSD_* environment variables (see README.md).
The offline commands (init, approve, orders, show, journal, intents, dead,
replay, ingest, export, retry, status, prune) need only OMSD_DB. Only `run` and
`init` create a database. `replay`, `ingest` and `prune` refuse to work beside a
running daemon.

Exit codes: 0 success; 1 failure (unknown order, refused input lines);
2 bad configuration or usage, or no database at OMSD_DB; 3 another process
(a running daemon) owns the database."""


Handler = Callable[[argparse.Namespace], int]
StoreCommand = Callable[[Store, argparse.Namespace], Awaitable[int]]
Subparsers = argparse._SubParsersAction  # argparse names no public type for it


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="omsd", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--version", action="version", version=f"omsd {_version()}")
    unit = p.add_mutually_exclusive_group()
    unit.add_argument(
        "--instance",
        metavar="NAME",
        help="run the command as the unit omsd@NAME sees it: settings from /etc/omsd/NAME.env, credentials "
        "from /etc/omsd/credentials/NAME/, the database in /var/lib/omsd/NAME/ (OMSD_* variables of the "
        "caller are ignored)",
    )
    unit.add_argument(
        "--service",
        action="store_true",
        help="the same for the single-account unit omsd.service: /etc/omsd/omsd.env, /etc/omsd/credentials/, "
        "/var/lib/omsd/omsd.db",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_run_commands(sub)
    _add_store_commands(sub)
    _add_looking_commands(sub)
    _add_list_commands(sub)
    _add_repair_commands(sub)
    _add_retention_commands(sub)
    _add_transfer_commands(sub)
    _add_vtex_commands(sub)
    _add_tool_commands(sub)
    _add_backup_command(sub)
    return p


def _version() -> str:
    """The installed package's version (the one `pip install` recorded)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("omsd")
    except PackageNotFoundError:
        return "unknown"


def _command(
    sub: Subparsers[argparse.ArgumentParser], name: str, handler: Handler, **kw: Any
) -> argparse.ArgumentParser:
    """A subcommand whose parsed arguments go to `handler`."""
    parser = sub.add_parser(name, epilog=EXIT_CODES, **kw)
    parser.set_defaults(handler=handler)
    return parser


def _add_run_commands(sub: Subparsers[argparse.ArgumentParser]) -> None:
    _command(
        sub,
        "run",
        _run,
        help="run the daemon until SIGTERM/SIGINT",
        description="Run the daemon (feed poller, processor, effect runner, HTTP server, timers) until "
        "SIGTERM or SIGINT, then stop polling, drain in-flight work within OMSD_SHUTDOWN_GRACE_S and exit 0. "
        "Needs OMSD_ACCOUNT, OMSD_APP_KEY, OMSD_APP_TOKEN, OMSD_CONNECTOR_NAME, OMSD_CONNECTOR_ENDPOINT.",
    )

    d = _command(
        sub,
        "demo",
        _demo,
        help="run the simulator and the daemon together on a scenario",
        description="Start the built-in VTEX simulator and the daemon in one process on a temporary database, "
        "run a scenario of orders (some held then authorized, some held then rejected, some put back on hold), "
        "show live progress and a summary. Exit 0 only when every order reached the end it should.",
    )
    d.add_argument("--orders", type=int, default=60, help="number of orders (default 60)")
    d.add_argument("--seed", type=int, default=7, help="simulator random seed (default 7)")
    d.add_argument("--timeout", type=float, default=180.0, help="give up after this many seconds (default 180)")


def _add_store_commands(sub: Subparsers[argparse.ArgumentParser]) -> None:
    """The offline commands that record an intent or read; they need only OMSD_DB."""
    _command(
        sub,
        "init",
        _offline(_init, create=True),
        help="create an empty database at OMSD_DB",
        description="Create the database at OMSD_DB with the current schema (or migrate an existing one). "
        "The other offline commands refuse a database that does not exist, so a wrong OMSD_DB is an error, "
        "not a new empty database.",
    )
    a = _command(
        sub,
        "approve",
        _offline(_approve),
        help="record an approval intent for a marketplace order",
        description="Record an approval intent in the journal. The running daemon sends the approval as soon "
        "as VTEX shows the order is not held (and never if it is canceled). Idempotent.",
    )
    a.add_argument("marketplace_order_id", metavar="MARKETPLACE_ORDER_ID")
    a.add_argument("--order-id", help="the VTEX order id, when known (links the two at once)")


def _add_looking_commands(sub: Subparsers[argparse.ArgumentParser]) -> None:
    """The reading commands: they work beside a running daemon (they take no lock)."""
    o = _command(
        sub,
        "orders",
        _offline(_orders),
        help="list orders and their phase",
        description="List orders, newest first. The title counts every matching order. In a pipe: tab-separated "
        "lines with a header, whole values (the title goes to stderr).",
    )
    o.add_argument("--phase", choices=[ph.value for ph in Phase], help="only orders in this phase")
    o.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    o.add_argument("--json", action="store_true", help="print each order's whole record as JSON lines")
    o.epilog = "exit codes: 0 listed (also when none match); 2 no database at OMSD_DB"

    s = _command(
        sub,
        "show",
        _offline(_show),
        help="one order: state, history, journal",
        description="Show one order (by VTEX order id or marketplace order id): its state, transitions and journal "
        "entries (with the intents and notifications that came under its marketplace id). A marketplace id with only "
        "a parked intent shows that intent.",
    )
    s.add_argument("key", metavar="ORDER")
    s.add_argument("--json", action="store_true", help="print one JSON object: order, history, journal")
    s.epilog = f"exit codes: 0 shown; 1 {UNKNOWN}; 2 no database at OMSD_DB"

    j = _command(
        sub,
        "journal",
        _offline(_journal),
        help="tail (or follow) the journal",
        description="Print the last journal entries, or those from an offset on; --follow goes on printing new "
        "ones until interrupted (Ctrl-C exits 0). Works beside the running daemon (read only).",
    )
    j.add_argument("--limit", type=int, default=30, help="the last this many entries (default 30)")
    j.add_argument("--from-offset", type=int, metavar="N", help="every entry from offset N on (not only the last)")
    j.add_argument("--order", metavar="ID", help="only this order (either id), with what came under its marketplace id")
    j.add_argument("--rejected", action="store_true", help="only rejected input, with its reason and raw body")
    j.add_argument("--unreadable", action="store_true", help="only rows the processor could not read, with why")
    j.add_argument("-f", "--follow", action="store_true", help="keep printing new entries until interrupted")
    j.add_argument(
        "--json", action="store_true", help="JSON lines with the whole payload (a rejected body as received)"
    )
    j.epilog = f"exit codes: 0 printed (a follow ended by SIGINT/SIGTERM too); 1 {UNKNOWN}; 2 no database at OMSD_DB"


def _add_list_commands(sub: Subparsers[argparse.ArgumentParser]) -> None:
    """What waits for a person: parked intents and dead orders."""
    i = _command(
        sub,
        "intents",
        _offline(_intents),
        help="list parked intents",
        description="Approval intents that name a marketplace order id no VTEX order is linked to yet: the "
        "marketplace id, where the intent came from, since when, and why it waits.",
    )
    i.add_argument("--json", action="store_true", help="print JSON lines")
    i.epilog = "exit codes: 0 listed (also when none are parked); 2 no database at OMSD_DB"

    d = _command(
        sub,
        "dead",
        _offline(_dead),
        help="list dead orders and why",
        description="Orders whose approval spent its retry budget: attempts, the last result code and error, "
        "and the cause of the move to dead. `omsd retry ORDER` (or --all-dead) gives them another go.",
    )
    d.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    d.add_argument("--json", action="store_true", help="print JSON lines")
    d.epilog = "exit codes: 0 listed (also when none are dead); 2 no database at OMSD_DB"


def _add_retention_commands(sub: Subparsers[argparse.ArgumentParser]) -> None:
    p = _command(
        sub,
        "prune",
        _prune_command,
        help="shrink the journal: quiet closed orders keep one snapshot row",
        description="Replace the journal rows and history of every order closed (approved, rejected) or only "
        "followed (tracking), and unchanged for DAYS, by one snapshot row each (a replay still rebuilds the same "
        "state); remove rejected input older than DAYS; give the free pages back to the disk. Open and dead orders "
        "are kept. The running daemon does this by itself (OMSD_RETENTION_DAYS, every 6 hours): this command owns "
        "the database and refuses beside it.",
    )
    p.add_argument(
        "--older-than", type=int, metavar="DAYS", help="quiet for this many days (default OMSD_RETENTION_DAYS, 30)"
    )
    p.add_argument("--dry-run", action="store_true", help="change nothing; count what would go")
    p.add_argument("--json", action="store_true", help="print the counts as one JSON object")
    p.epilog = (
        "exit codes: 0 pruned (or nothing to prune); 2 no database at OMSD_DB, or no age (OMSD_RETENTION_DAYS=0 "
        "and no --older-than); 3 another process (the daemon, which prunes by itself) owns the database"
    )


UNKNOWN = "no order with that id (VTEX order id or marketplace order id)"


def _add_repair_commands(sub: Subparsers[argparse.ArgumentParser]) -> None:
    """The offline commands that rebuild or reopen orders."""
    rp = _command(
        sub,
        "replay",
        _offline(_replay, owns=True),
        help="rebuild order state from the journal and carry on open work",
        description="Apply the journal again to an empty state (the machine is pure: the result is the state "
        "the daemon had) and write it. Open work carries on: a Get order the outbox lost is queued again, an "
        "approval whose outcome is unknown is re-checked with Get order, parked intents stay parked; an approval "
        "the journal shows as sent and answered is never sent again. Refuses to run beside a daemon (exit 3).",
    )
    rp.add_argument("--order", metavar="ID", help="only this order (VTEX order id or marketplace order id)")
    rp.add_argument("--from-offset", type=int, metavar="N", help="only orders with journal entries from offset N on")
    rp.add_argument("--to-offset", type=int, metavar="N", help="rebuild as of offset N (every order only)")
    _preview_options(rp, "change nothing; print what would differ and be called", "log each routed event")

    r = _command(
        sub,
        "retry",
        _offline(_retry),
        help="give a dead (or stuck) order another go",
        description="Append a resync for the order: its retry budget is reset and it is re-checked with Get "
        "order before anything is sent. Closed orders (approved, rejected) and orders nobody asked to approve "
        "are left alone, and the command says so.",
    )
    r.add_argument("key", metavar="ORDER", nargs="?")
    r.add_argument("--all-dead", action="store_true", help="every order in the dead phase")
    r.epilog = (
        "exit codes: 0 a resync recorded for the order (or each dead order; none dead is not an error); "
        "1 unknown order, or nothing done (the order is closed, or has no approval intent); "
        "2 neither ORDER nor --all-dead, or no database at OMSD_DB"
    )

    _command(
        sub,
        "status",
        _offline(_status),
        help="counts by phase, offsets, backlog",
        description="Counts by phase, journal and processor offsets, pending feed commits, timers and parked intents.",
    )


def _add_transfer_commands(sub: Subparsers[argparse.ArgumentParser]) -> None:
    """Events into the journal from elsewhere, and the journal out."""
    ing = _command(
        sub,
        "ingest",
        _offline(_ingest, owns=True),
        help="append captured events (feed items, hook pushes, notifications, exports)",
        description="Append events captured elsewhere: feed items as GET /api/orders/feed returns them, hook "
        "pushes (PascalCase), processing-result notifications, or journal rows as `omsd export` writes them. "
        "FILE (or - for stdin) is a JSON array or JSON lines; the kind is detected per item unless --kind. "
        "Same validation and dedup as live intake; all good lines are appended in one transaction. "
        "Exit 1 when a line was refused (with --strict nothing is appended). Refuses to run beside a daemon.",
    )
    ing.add_argument("file", metavar="FILE", help="a file, or - for standard input")
    ing.add_argument("--kind", choices=KINDS, help="treat every item as this kind")
    ing.add_argument("--strict", action="store_true", help="append nothing if any line is bad")
    _preview_options(
        ing, "change nothing; show what would be added and decided", "log each transition as the daemon would"
    )

    ex = _command(
        sub,
        "export",
        _offline(_export),
        help="write the journal as JSON lines",
        description="Write journal rows as JSON lines on stdout (kind, version, source, order id, dedup keys, "
        "received time, payload as stored), oldest first. `omsd ingest` reads this format back.",
    )
    ex.add_argument("--order", metavar="ID", help="only this order (either id; includes entries routed to it)")
    ex.add_argument("--from-offset", type=int, default=0, metavar="N", help="only entries after offset N")
    ex.add_argument("--kind", action="append", default=[], help="only entries of this kind (repeatable)")


def _add_vtex_commands(sub: Subparsers[argparse.ArgumentParser]) -> None:
    for name, what in (("feed", "the feed configuration"), ("hook", "the order hook configuration")):
        c = _command(
            sub,
            name,
            _vtex_config_command,
            help=f"show or apply {what} at VTEX",
            description=f"`omsd {name} config show` prints {what} VTEX has (header values masked) and what "
            f"differs from omsd's settings. `omsd {name} config apply` prints the differences, then writes omsd's "
            "configuration (asks first on a terminal; --yes to skip the question). Needs the full OMSD_* settings.",
        )
        c.add_argument("what", choices=["config"])
        c.add_argument("action", choices=["show", "apply"])
        c.add_argument("--yes", action="store_true", help="apply without asking")


def _add_tool_commands(sub: Subparsers[argparse.ArgumentParser]) -> None:
    _command(
        sub,
        "check",
        _check_command,
        help="diagnose the set-up in one screen",
        description="Check that the settings are valid, VTEX accepts the credentials, the feed/hook configuration "
        "exists and its filter has the statuses omsd needs, the feed queue is not near expiry, the database is "
        "writable with a current schema, and the listen address is free. Exit 0 only when every check passes.",
    )

    _command(
        sub,
        "healthcheck",
        _healthcheck_command,
        help="exit 0 when the local daemon answers /healthz",
        description="GET /healthz of the daemon at OMSD_LISTEN (0.0.0.0 and :: are reached via loopback); "
        "exit 0 on 200, 1 otherwise. For container HEALTHCHECKs; needs only OMSD_LISTEN.",
    )

    sim = _command(
        sub,
        "sim",
        _sim,
        help="run the VTEX simulator alone",
        description="Run the built-in VTEX simulator (feed, Get order, Channel Order API, faults) until interrupted.",
    )
    sim.add_argument("--listen", default="127.0.0.1:8788", help="HOST:PORT (default 127.0.0.1:8788)")
    sim.add_argument("--seed", type=int, default=7)
    sim.add_argument("--visibility-s", type=float, default=None, help="override the feed visibility timeout")


def _add_backup_command(sub: Subparsers[argparse.ArgumentParser]) -> None:
    b = _command(
        sub,
        "backup",
        _backup_command,
        help="copy the database, consistently, while the daemon runs",
        description="Copy the database at OMSD_DB to PATH with SQLite's online backup API: the copy is the "
        "database as of one commit, written with mode 0600 and renamed into place when whole. The daemon "
        "keeps running. Refuses to replace an existing file unless --force. Restore: stop the daemon, copy the "
        "backup to OMSD_DB, start it (see docs/operations.md).",
    )
    b.add_argument("path", metavar="PATH", type=Path, help="where to write the copy")
    b.add_argument("--force", action="store_true", help="replace PATH if it exists")
    b.add_argument("--json", action="store_true", help="print what was written as JSON")


def _backup_command(args: argparse.Namespace) -> int:
    from ..tools.backup import BackupExists, backup

    db = load_db_path()
    if not db.exists():
        print(f"omsd: no database at {db} (set OMSD_DB)", file=sys.stderr)
        return EXIT_CONFIG
    try:
        done = backup(db, args.path, force=args.force)
    except BackupExists as exc:
        print(f"omsd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.json:
        print(json.dumps(done.as_dict(), sort_keys=True))
    else:
        print(f"backed up {done.source} to {done.path}: {done.bytes} bytes, schema version {done.schema_version}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        if args.instance is not None or args.service:
            environment = instance_environment(args.instance, os.environ)
            os.environ.clear()
            os.environ.update(environment)
        warn_unknown_variables()
        return handler(args)
    except ConfigError as exc:
        print(f"omsd: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except StoreError as exc:
        print(f"omsd: database error: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except KeyboardInterrupt:
        return EXIT_FAIL
    except BrokenPipeError:
        return _reader_gone()


def _reader_gone() -> int:
    """Whoever read our output went away (`omsd journal --follow | head`): what they wanted
    was printed, so end quietly with 0; stdout goes to /dev/null so the flush at exit
    does not raise again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_OK


def _run(args: argparse.Namespace) -> int:
    settings = load_settings()
    logs.configure(settings.log_level, settings.log_format)
    from ..app import DaemonFailed

    try:
        asyncio.run(run_until_signalled(settings))
    except DaemonFailed as exc:
        if isinstance(exc.error, ConfigError):  # OMSD_LISTEN or OMSD_DB unusable: found only at start
            print(f"omsd: configuration error: {exc.error}", file=sys.stderr)
            return EXIT_CONFIG
        if isinstance(exc.error, _lock.DatabaseBusy):
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
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await Daemon(settings).run(stop)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def _vtex_config_command(args: argparse.Namespace) -> int:
    settings = load_settings()
    logs.configure("warning", "console", stream=sys.stderr)
    return asyncio.run(_vtex_config(settings, args.command, args.action, args.yes))


def _check_command(args: argparse.Namespace) -> int:
    settings = load_settings()
    logs.configure("error", "console", stream=sys.stderr)
    return asyncio.run(_check(settings))


def _demo(args: argparse.Namespace) -> int:
    from ..tools.demo import run_demo

    if args.orders < 4:
        print("omsd: --orders must be at least 4", file=sys.stderr)
        return EXIT_CONFIG
    return asyncio.run(run_demo(args.orders, args.seed, args.timeout))


def _sim(args: argparse.Namespace) -> int:
    from omsd.sim.server import serve

    logs.configure("info", "auto")
    host, _, port = args.listen.rpartition(":")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(host, int(port), seed=args.seed, visibility_override_s=args.visibility_s))
    return EXIT_OK


def _healthcheck_command(args: argparse.Namespace) -> int:
    return _healthcheck(load_local().listen)


def _preview_options(p: argparse.ArgumentParser, dry_run: str, verbose: str) -> None:
    """--dry-run, --json and -v, as the commands that rebuild or append state take them."""
    p.add_argument("--dry-run", action="store_true", help=dry_run)
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("-v", "--verbose", action="store_true", help=verbose)


def _offline(command: StoreCommand, *, create: bool = False, owns: bool = False) -> Handler:
    """A command on the database alone. Only `create` commands may create it: every other
    refuses to make an empty database by accident. `owns` commands own the database while
    they work and refuse when another process (a running daemon) owns it; with --dry-run
    they open it read-only instead, so the file is left exactly as it was."""

    def handler(args: argparse.Namespace) -> int:
        db = load_db_path()
        if not create and not db.exists():
            print(f"omsd: no database at {db} (set OMSD_DB, or create one with `omsd init`)", file=sys.stderr)
            return EXIT_CONFIG
        logs.configure("info" if getattr(args, "verbose", False) else "warning", "auto", stream=sys.stderr)
        preview = owns and args.dry_run
        try:
            with _lock.hold(db) if owns and not preview else contextlib.nullcontext():
                return asyncio.run(_with_store(db, command, args, readonly=preview))
        except _lock.DatabaseBusy as exc:
            print(f"omsd: {exc}", file=sys.stderr)
            return EXIT_BUSY

    return handler


async def _vtex_config(settings: Settings, kind: str, action: str, yes: bool) -> int:
    import aiohttp

    from ..vtex.client import VtexClient, feed_config_body, hook_config_body
    from ..vtex.configuration import feed_plan, hook_plan

    if kind == "hook" and settings.hook_secret is None:
        if action == "apply":
            print("omsd: OMSD_HOOK_SECRET: is required to configure the hook", file=sys.stderr)
            return EXIT_CONFIG
        print("OMSD_HOOK_SECRET is not set: the hook's header is not compared")
    async with aiohttp.ClientSession() as session:
        client = VtexClient(settings, session, max_rate_limited=1)
        try:
            if kind == "feed":
                feed = await client.get_feed_config()
                current: dict[str, Any] | None = feed.raw if feed else None
                changes = feed_plan(feed, settings)
            else:
                hook = await client.get_hook_config()
                current = _masked(hook.raw) if hook else None
                changes = hook_plan(hook, settings)
        except VtexError as exc:
            print(f"omsd: {exc}", file=sys.stderr)
            return EXIT_FAIL
        print(f"VTEX's {kind} configuration:")
        print(json.dumps(current, indent=2, sort_keys=True) if current is not None else "  (none)")
        if not changes:
            print(f"omsd's settings match: nothing to {'apply' if action == 'apply' else 'change'}")
            return EXIT_OK
        print(f"{'Changes' if action == 'apply' else 'Differences from omsd settings'}:")
        for line in changes:
            print(f"  {line}")
        if action == "show":
            return EXIT_OK
        if not yes:
            if not sys.stdin.isatty():
                print("omsd: not applied: pass --yes to apply without a terminal", file=sys.stderr)
                return EXIT_CONFIG
            answer = await asyncio.to_thread(input, "Apply these changes? [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                print("not applied")
                return EXIT_FAIL
        try:
            if kind == "feed":
                await client.save_feed_config(feed_config_body(settings))
            else:
                await client.save_hook_config(hook_config_body(settings))
        except VtexError as exc:
            print(f"omsd: VTEX refused the configuration: {exc}", file=sys.stderr)
            return EXIT_FAIL
        print("applied")
        return EXIT_OK


def _healthcheck(listen: str) -> int:
    import urllib.error
    import urllib.request

    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)  # noqa: S104 - mapping, not binding
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=4) as resp:
            return EXIT_OK if resp.status == 200 else EXIT_FAIL
    except (urllib.error.URLError, OSError) as exc:
        print(f"omsd: {url}: {exc}", file=sys.stderr)
        return EXIT_FAIL


def _masked(raw: dict[str, Any]) -> dict[str, Any]:
    hook = raw.get("hook")
    if isinstance(hook, dict) and isinstance(hook.get("headers"), dict):
        return {**raw, "hook": {**hook, "headers": dict.fromkeys(hook["headers"], "***")}}
    return raw


async def _check(settings: Settings) -> int:
    from ..tools.check import run_checks

    results = await run_checks(settings)
    table = Table(title="omsd check")
    for col in ("check", "result", "detail"):
        table.add_column(col)
    for r in results:
        table.add_row(r.name, "[green]ok[/]" if r.ok else "[red]FAIL[/]", r.detail)
    Console().print(table)
    return EXIT_OK if all(r.ok for r in results) else EXIT_FAIL


async def _with_store(db: Path, fn: StoreCommand, args: argparse.Namespace, *, readonly: bool = False) -> int:
    async with await (Store.open_readonly(db) if readonly else Store.open(db)) as store:
        return await fn(store, args)


def _now() -> datetime:
    return datetime.now(UTC)


async def _approve(store: Store, args: argparse.Namespace) -> int:
    mkt: str = args.marketplace_order_id.strip()
    if not mkt:
        print("omsd: MARKETPLACE_ORDER_ID must not be empty", file=sys.stderr)
        return EXIT_CONFIG
    now = _now()
    [appended] = await store.journal.append([intake.intent_entry(mkt, args.order_id, "cli", now)], now=now)
    print(f"intent recorded at journal offset {appended.offset}; the running daemon will act on it")
    return EXIT_OK


async def _init(store: Store, args: argparse.Namespace) -> int:
    print(f"database ready at {store.path} (schema version {await store.db.schema_version()})")
    return EXIT_OK


async def _replay(store: Store, args: argparse.Namespace) -> int:
    partial = args.order is not None or args.from_offset is not None
    if partial and args.to_offset is not None and not args.dry_run:
        print("omsd: --to-offset rebuilds every order: it cannot go with --order or --from-offset", file=sys.stderr)
        return EXIT_CONFIG
    meter = Meter("replayed", await store.journal.last_offset() if args.to_offset is None else args.to_offset)
    try:
        # Same policy knobs as the daemon (OMSD_MAX_ATTEMPTS etc.), so the replayed
        # state is the state the daemon had.
        result = await replay.plan(
            store,
            load_policy(),
            order=args.order,
            from_offset=args.from_offset,
            to_offset=args.to_offset,
            on_rows=meter,
        )
    except replay.UnknownOrder as exc:
        print(f"omsd: no order {exc}", file=sys.stderr)
        return EXIT_FAIL
    finally:
        meter.close()
    if not args.dry_run:
        await replay.apply(store, result, _now())
    _print_replay(result, args.dry_run, args.json)
    return EXIT_OK


def _print_replay(result: replay.Plan, dry_run: bool, as_json: bool) -> None:
    shown = [o for o in result.orders if o.differences() or o.calls()]
    summary = {**result.summary(), "dry_run": dry_run, "offset": result.rebuilt.batch.offset}
    if as_json:
        print(json.dumps({"summary": summary, "orders": [o.view() for o in shown]}, sort_keys=True))
        return
    for o in shown:
        diffs = ", ".join(f"{k} {_short(a)} -> {_short(b)}" for k, (a, b) in o.differences().items())
        calls = "; ".join(o.calls())
        print(
            f"{o.order_id}: {diffs or 'unchanged'}"
            + (f"; {'would call' if dry_run else 'calls'}: {calls}" if calls else "")
        )
    verb = "would rebuild" if dry_run else "rebuilt"
    counts = f"{summary['unchanged']} unchanged, {summary['changed']} changed"
    print(
        f"{verb} {summary['orders']} orders from {summary['events']} journal entries (to offset {summary['offset']}): "
        f"{counts}, {summary['newly_actionable']} newly actionable"
    )


def _short(value: Any) -> str:
    if value is None:
        return "-"
    if hasattr(value, "reason") and hasattr(value, "due_at"):
        return f"{value.reason}@{value.due_at.isoformat(timespec='seconds')}"
    return str(value)


class Meter:
    """Progress of long work on a terminal (count, rate, ETA) on stderr; silent in a pipe."""

    def __init__(self, what: str, total: int, stream: TextIO | None = None, every_s: float = 0.25) -> None:
        self.what, self.total, self.done, self.every_s = what, total, 0, every_s
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.start = self.shown = time.monotonic()

    def __call__(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if not self.tty or now - self.shown < self.every_s:
            return
        self.shown = now
        rate = self.done / max(now - self.start, 1e-6)
        eta = max(self.total - self.done, 0) / rate if rate else 0.0
        self.stream.write(f"\r{self.what} {self.done:,}/{self.total:,} events  {rate:,.0f}/s  ETA {eta:,.0f} s  ")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self.shown > self.start:
            self.stream.write("\n")


def _read_input(name: str) -> str:
    return sys.stdin.read() if name == "-" else Path(name).read_text(encoding="utf-8")


async def _ingest(store: Store, args: argparse.Namespace) -> int:
    try:
        text = await asyncio.to_thread(_read_input, args.file)
    except (OSError, UnicodeDecodeError) as exc:
        print(f"omsd: cannot read {args.file}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    lines = ingest.parse(text, args.kind, _now())
    bad = [line for line in lines if line.entry is None]
    good = [line for line in lines if line.entry is not None]
    if args.strict and bad:
        good = []
    entries = [line.entry for line in good if line.entry is not None]
    decisions: list[str] = []
    # With --dry-run `store` is read-only: the work happens on a scratch copy in memory.
    async with await Store.open_copy(store.path) if args.dry_run else contextlib.nullcontext(store) as target:
        appended = await target.journal.ingest(entries) if entries else []
        decisions = await _decisions(target)
    dups = [line.number for line, a in zip(good, appended, strict=True) if a.duplicate]
    report = {
        "dry_run": args.dry_run,
        "added": len(appended) - len(dups),
        "duplicates": dups,
        "bad": [{"line": line.number, "reason": line.error} for line in bad],
        "refused_all": bool(args.strict and bad),
        "decisions": decisions,
    }
    _print_ingest(report, args.json)
    return EXIT_FAIL if bad else EXIT_OK


async def _decisions(store: Store) -> list[str]:
    """Apply what the journal holds beyond the processor's offset, as the daemon would at
    start (the effects wait in the outbox for it), and say what the machine decided."""
    from omsd.state.batch import Transition

    from ..pipeline.processor import Processor

    before = await store.outbox.states()
    seen: list[Transition] = []
    processor = Processor(store, load_policy(), clock=_now)
    processor.listeners.append(seen.append)
    await processor.drain()
    out = [f"{t.order_id}: {t.from_phase or 'new'} -> {t.to_phase} ({t.cause})" for t in seen]
    calls = sorted(k for k in await store.outbox.states() if k not in before)
    return out + [f"{order_id}: queues effect seq {seq} (a VTEX call)" for order_id, seq in calls]


def _print_ingest(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(report, sort_keys=True))
        return
    for bad in report["bad"]:
        print(f"line {bad['line']}: {bad['reason']}", file=sys.stderr)
    for n in report["duplicates"]:
        print(f"line {n}: duplicate (already in the journal)")
    for d in report["decisions"]:
        print(f"  {d}")
    if report["refused_all"]:
        print(f"nothing added: {len(report['bad'])} bad line(s) and --strict", file=sys.stderr)
        return
    verb = "would add" if report["dry_run"] else "added"
    print(f"{verb} {report['added']} entries; {len(report['duplicates'])} duplicates; {len(report['bad'])} bad lines")


async def _export(store: Store, args: argparse.Namespace) -> int:
    order_id = mkt = args.order
    if args.order is not None and (order := await store.read.find_order(args.order)) is not None:
        order_id, mkt = order.order_id, order.marketplace_order_id
    count = 0
    async for row in store.journal.export(
        after=args.from_offset, order_id=order_id, marketplace_order_id=mkt, kinds=args.kind
    ):
        sys.stdout.write(ingest.export_line(row) + "\n")
        count += 1
    if args.order is not None and count == 0:
        print(f"omsd: no order {args.order}", file=sys.stderr)
        return EXIT_FAIL
    return EXIT_OK


async def _append_resync(store: Store, order_id: str, reason: str) -> None:
    now = _now()
    await store.journal.append(
        [NewEntry.of(Resync(order_id=order_id, reason=reason), source="operator", received_at=now)], now=now
    )


async def _unreadable(store: Store) -> int:
    table = Table(title="unreadable journal rows")
    for col in ("offset", "received", "kind", "order", "error"):
        table.add_column(col)
    for u in await store.read.unreadable_rows():
        table.add_row(
            str(u.journal_offset), u.received_at.isoformat(timespec="seconds"), u.kind, u.order_id or "-", u.error
        )
    Console().print(table)
    return EXIT_OK


async def _status(store: Store, args: argparse.Namespace) -> int:
    out = {"phases": await store.read.phase_counts(), "outbox": await store.outbox.counts(), **await store.read.stats()}
    print(json.dumps(out, indent=2, sort_keys=True))
    return EXIT_OK


# ---- looking ----------------------------------------------------------------------------
def _table(title: str, columns: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
    """A table on a terminal (long values fold, never cut); in a pipe, tab-separated lines
    with a header and whole values, and the title on stderr."""
    console = Console()
    if console.is_terminal:
        table = Table(title=title)
        for col in columns:
            table.add_column(col, overflow="fold")
        for row in rows:
            table.add_row(*row)
        console.print(table)
        return
    print(title, file=sys.stderr)
    print("\t".join(columns))
    for row in rows:
        print("\t".join(" ".join(value.split()) for value in row))


def _when(at: datetime | None) -> str:
    return at.isoformat(timespec="seconds") if at is not None else "-"


def _order_row(o: Order) -> list[str]:
    return [
        o.order_id,
        o.marketplace_order_id or "-",
        o.phase.value,
        o.status or "-",
        "yes" if o.held else "",
        str(o.sent),
        o.last_code or "",
        o.last_error or "",
    ]


async def _orders(store: Store, args: argparse.Namespace) -> int:
    orders = await store.read.list_orders(args.phase, args.limit)
    if args.json:
        for o in orders:
            print(o.model_dump_json())
        return EXIT_OK
    total = await store.read.count_orders(args.phase)
    title = f"{total} orders" + (f" in {args.phase}" if args.phase else "")
    if len(orders) < total:
        title += f", the newest {len(orders)} shown (--limit)"
    columns = ("order", "marketplace id", "phase", "VTEX status", "held", "sent", "last code", "last error")
    _table(title, columns, map(_order_row, orders))
    return EXIT_OK


def _history_view(h: HistoryRow) -> dict[str, Any]:
    return {
        "offset": h.journal_offset,
        "at": h.at.isoformat(),
        "from": h.from_phase,
        "to": h.to_phase,
        "status": h.status,
        "cause": h.cause,
    }


def _journal_view(r: JournalRow) -> dict[str, Any]:
    """A journal row for --json: the payload parsed, a rejected body exactly as received."""
    payload: Any = r.payload
    if r.kind != "rejected":
        with contextlib.suppress(ValueError):
            payload = json.loads(r.payload)
    return {
        "offset": r.offset,
        "kind": r.kind,
        "version": r.version,
        "source": r.source,
        "order_id": r.order_id,
        "received_at": r.received_at.isoformat(),
        "reason": r.reason,
        "payload": payload,
    }


def _journal_line(r: JournalRow) -> str:
    detail = f"{r.reason} | body: {r.payload}" if r.kind == "rejected" else r.reason or r.payload
    return f"{r.offset}\t{_when(r.received_at)}\t{r.kind}\t{r.source}\t{r.order_id or '-'}\t{' '.join(detail.split())}"


def _print_rows(rows: Iterable[JournalRow], as_json: bool) -> None:
    for r in rows:
        print(json.dumps(_journal_view(r), sort_keys=True) if as_json else _journal_line(r))
    sys.stdout.flush()


async def _show(store: Store, args: argparse.Namespace) -> int:
    order = await store.read.find_order(args.key)
    if order is None:
        return await _show_parked(store, args)
    history = await store.read.history(order.order_id)
    rows = await store.journal.tail(50, order_id=order.order_id, marketplace_order_id=order.marketplace_order_id)
    if args.json:
        view = {
            "order": order.model_dump(mode="json"),
            "history": [_history_view(h) for h in history],
            "journal": [_journal_view(r) for r in rows],
        }
        print(json.dumps(view, sort_keys=True))
        return EXIT_OK
    Console().print_json(order.model_dump_json())
    columns = ("offset", "at", "from", "to", "VTEX status", "cause")
    _table(
        f"{len(history)} transitions",
        columns,
        (
            [str(h.journal_offset), _when(h.at), h.from_phase or "-", h.to_phase, h.status or "-", h.cause]
            for h in history
        ),
    )
    print(f"journal (the last {len(rows)} entries: offset, received, kind, source, order, reason / payload):")
    _print_rows(rows, as_json=False)
    return EXIT_OK


async def _show_parked(store: Store, args: argparse.Namespace) -> int:
    parked = await store.read.pending_intent(args.key)
    if parked is None:
        print(f"omsd: no order {args.key}", file=sys.stderr)
        return EXIT_FAIL
    source, offset = parked
    if args.json:
        print(json.dumps({"marketplace_order_id": args.key, "parked_intent": {"source": source, "offset": offset}}))
    else:
        print(f"{args.key}: intent parked (source {source}, offset {offset}); no VTEX order linked yet")
    return EXIT_OK


async def _journal(store: Store, args: argparse.Namespace) -> int:
    if args.unreadable:
        return await _unreadable(store)
    order_id = mkt = None
    if args.order is not None:
        order = await store.read.find_order(args.order)
        if order is not None:
            order_id, mkt = order.order_id, order.marketplace_order_id
        elif await store.journal.tail(1, marketplace_order_id=args.order):
            mkt = args.order  # intents or notifications for a marketplace id no order is linked to
        else:
            print(f"omsd: no order {args.order}", file=sys.stderr)
            return EXIT_FAIL
    where: dict[str, Any] = {
        "order_id": order_id,
        "marketplace_order_id": mkt,
        "kind": "rejected" if args.rejected else None,
    }
    after = await store.journal.last_offset()
    if args.from_offset is None:
        rows = await store.journal.tail(args.limit, **where)
        _print_rows(rows, args.json)
    else:
        after = args.from_offset - 1
        while rows := await store.journal.since(after, 1000, **where):
            _print_rows(rows, args.json)
            after = rows[-1].offset
    if args.follow:
        await _follow(store, max(after, rows[-1].offset if rows else after), where, args.json)
    return EXIT_OK


FOLLOW_POLL_S = 1.0


async def _follow(store: Store, after: int, where: dict[str, Any], as_json: bool) -> None:
    """Print new journal rows as the daemon writes them, until SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        while not stop.is_set():
            rows = await store.journal.since(after, 1000, **where)
            if rows:
                _print_rows(rows, as_json)
                after = rows[-1].offset
                continue
            await wait_any(stop, within_s=FOLLOW_POLL_S)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


PARKED_WHY = "no VTEX order linked to this marketplace id yet: waits for the order to appear and Get order to link it"


async def _intents(store: Store, args: argparse.Namespace) -> int:
    parked = await store.read.parked_intents()
    if args.json:
        for p in parked:
            view = {
                "marketplace_order_id": p.marketplace_order_id,
                "source": p.source,
                "offset": p.journal_offset,
                "since": p.since.isoformat() if p.since else None,
                "why": PARKED_WHY,
            }
            print(json.dumps(view, sort_keys=True))
        return EXIT_OK
    rows = ([p.marketplace_order_id, p.source, str(p.journal_offset), _when(p.since), PARKED_WHY] for p in parked)
    _table(f"{len(parked)} parked intents", ("marketplace id", "source", "offset", "since", "why"), rows)
    return EXIT_OK


async def _dead(store: Store, args: argparse.Namespace) -> int:
    orders = await store.read.list_orders(Phase.DEAD.value, args.limit)
    views = []
    for o in orders:
        why = next((h.cause for h in reversed(await store.read.history(o.order_id)) if h.to_phase == Phase.DEAD), None)
        views.append(
            {
                "order_id": o.order_id,
                "marketplace_order_id": o.marketplace_order_id,
                "since": o.updated_at.isoformat() if o.updated_at else None,
                "attempts": o.attempts,
                "eoi008": o.eoi008,
                "last_code": o.last_code,
                "last_error": o.last_error,
                "why": why,
            }
        )
    if args.json:
        for v in views:
            print(json.dumps(v, sort_keys=True))
        return EXIT_OK
    total = await store.read.count_orders(Phase.DEAD.value)
    columns = ("order", "marketplace id", "since", "attempts", "last code", "last error", "why dead")
    keys = ("order_id", "marketplace_order_id", "since", "attempts", "last_code", "last_error", "why")
    title = f"{total} dead orders" + (f", the newest {len(orders)} shown (--limit)" if len(orders) < total else "")
    _table(title, columns, ([str(v[k]) if v[k] is not None else "-" for k in keys] for v in views))
    return EXIT_OK


async def _retry(store: Store, args: argparse.Namespace) -> int:
    if args.all_dead:
        targets = await store.read.list_orders(Phase.DEAD.value, limit=1_000_000)
        if not targets:
            print("no dead orders: nothing to retry")
            return EXIT_OK
    elif args.key:
        order = await store.read.find_order(args.key)
        if order is None:
            print(f"omsd: no order {args.key}", file=sys.stderr)
            return EXIT_FAIL
        if order.phase in (Phase.APPROVED, Phase.REJECTED):
            print(f"omsd: {order.order_id} is {order.phase.value}: closed, nothing to retry", file=sys.stderr)
            return EXIT_FAIL
        if not order.has_intent:
            print(
                f"omsd: {order.order_id} has no approval intent: nothing to retry (record one with `omsd approve`)",
                file=sys.stderr,
            )
            return EXIT_FAIL
        targets = [order]
    else:
        print("omsd: name an ORDER or use --all-dead", file=sys.stderr)
        return EXIT_CONFIG
    for order in targets:
        await _append_resync(store, order.order_id, "operator retry")
    print(f"resync recorded for {len(targets)} order(s); the running daemon re-checks them with Get order")
    return EXIT_OK


# ---- retention ----------------------------------------------------------------------------
def _prune_command(args: argparse.Namespace) -> int:
    code = _prune_offline(args)
    if code == EXIT_BUSY:
        print(
            "omsd: the running daemon prunes by itself (OMSD_RETENTION_DAYS, every 6 hours); "
            "to prune now, stop it, run `omsd prune`, start it again",
            file=sys.stderr,
        )
    return code


async def _prune(store: Store, args: argparse.Namespace) -> int:
    days = args.older_than if args.older_than is not None else load_local().retention_days
    if days <= 0:
        print("omsd: retention is off (OMSD_RETENTION_DAYS=0): name the age with --older-than DAYS", file=sys.stderr)
        return EXIT_CONFIG
    report = await retention.prune(store, days, _now(), dry_run=args.dry_run)
    if args.json:
        print(json.dumps(report.view(), sort_keys=True))
        return EXIT_OK
    p = report.pruned
    verb = "would prune" if report.dry_run else "pruned"
    print(
        f"{verb} {p.orders} orders quiet since before {_when(report.cutoff)}: {p.journal_rows} journal rows into "
        f"{p.orders} snapshots, {p.history_rows} history rows, {p.outbox_rows} outbox rows; "
        f"{p.rejected_rows} rejected inputs"
        + ("" if report.dry_run else f"; {report.freed_bytes:,} bytes given back to the disk")
    )
    return EXIT_OK


_prune_offline = _offline(_prune, owns=True)


if __name__ == "__main__":
    raise SystemExit(main())
