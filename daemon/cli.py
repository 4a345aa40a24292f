"""The `omsd` command line: run the daemon, the demo, and the operator's tools.

Exit codes: 0 success; 1 runtime failure (including a demo that did not end as
it should); 2 bad configuration or usage (one line naming the variable).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from omsd.daemon import intake, logs
from omsd.daemon.errors import VtexError
from omsd.daemon.settings import ConfigError, Settings, load_db_path, load_local, load_policy, load_settings
from omsd.state.events import Resync
from omsd.state.models import Order
from omsd.state.statuses import TERMINAL_PHASES, Phase
from omsd.state.store import NewEntry, Store, StoreError

EXIT_OK, EXIT_FAIL, EXIT_CONFIG = 0, 1, 2

DESCRIPTION = """\
omsd approves VTEX marketplace orders exactly when they leave
waiting-for-manual-authorization. It reads the VTEX order feed, journals every
event in SQLite before acknowledging it, runs a state machine per order, and
sends the Channel Order API approval only after Get order confirms the order is
neither held nor canceled.

Configuration comes from OMSD_* environment variables (see README.md).
The offline commands (approve, orders, show, journal, replay, retry, status)
need only OMSD_DB and work whether or not the daemon is running."""


Handler = Callable[[argparse.Namespace], int]
StoreCommand = Callable[[Store, argparse.Namespace], Awaitable[int]]
Subparsers = argparse._SubParsersAction  # argparse names no public type for it


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="omsd", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--version", action="version", version=f"omsd {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_run_commands(sub)
    _add_store_commands(sub)
    _add_repair_commands(sub)
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
    parser = sub.add_parser(name, **kw)
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
    a = _command(
        sub,
        "approve",
        _offline(_approve, create=True),
        help="record an approval intent for a marketplace order",
        description="Record an approval intent in the journal. The running daemon sends the approval as soon "
        "as VTEX shows the order is not held (and never if it is canceled). Idempotent.",
    )
    a.add_argument("marketplace_order_id", metavar="MARKETPLACE_ORDER_ID")
    a.add_argument("--order-id", help="the VTEX order id, when known (links the two at once)")

    o = _command(
        sub, "orders", _offline(_orders), help="list orders and their phase", description="List orders, newest first."
    )
    o.add_argument("--phase", choices=[ph.value for ph in Phase], help="only orders in this phase")
    o.add_argument("--limit", type=int, default=50)
    o.add_argument("--json", action="store_true", help="print JSON lines")

    s = _command(
        sub,
        "show",
        _offline(_show),
        help="one order: state, history, journal",
        description="Show one order "
        "(by VTEX order id or marketplace order id): its state, transitions and journal entries.",
    )
    s.add_argument("key", metavar="ORDER")

    j = _command(
        sub, "journal", _offline(_journal), help="tail the journal", description="Print the last journal entries."
    )
    j.add_argument("--limit", type=int, default=30)
    j.add_argument("--order", help="only entries of this VTEX order id")
    j.add_argument("--rejected", action="store_true", help="only rejected input, with its reason")
    j.add_argument("--unreadable", action="store_true", help="only rows the processor could not read, with why")


def _add_repair_commands(sub: Subparsers[argparse.ArgumentParser]) -> None:
    """The offline commands that rebuild or reopen orders."""
    _command(
        sub,
        "replay",
        _offline(_replay),
        help="rebuild all order state from the journal",
        description="Forget every derived row (orders, timers, history, pending effects) and apply the whole "
        "journal again. Because the machine is pure, the result is the state the daemon had; open approvals "
        "are then re-checked with Get order. Stop the daemon first.",
    )

    r = _command(
        sub,
        "retry",
        _offline(_retry),
        help="give a dead (or stuck) order another go",
        description="Append a resync for the order: its retry budget is reset and it is re-checked with Get "
        "order before anything is sent. Closed orders (approved, rejected) are left alone.",
    )
    r.add_argument("key", metavar="ORDER", nargs="?")
    r.add_argument("--all-dead", action="store_true", help="every order in the dead phase")

    _command(
        sub,
        "status",
        _offline(_status),
        help="counts by phase, offsets, backlog",
        description="Counts by phase, journal and processor offsets, pending feed commits, timers and parked intents.",
    )


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
    from omsd.daemon.backup import BackupExists, backup

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
        return handler(args)
    except ConfigError as exc:
        print(f"omsd: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except StoreError as exc:
        print(f"omsd: database error: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except KeyboardInterrupt:
        return EXIT_FAIL


def _run(args: argparse.Namespace) -> int:
    settings = load_settings()
    logs.configure(settings.log_level, settings.log_format)
    from omsd.daemon.app import DaemonFailed, run_until_signalled

    try:
        asyncio.run(run_until_signalled(settings))
    except DaemonFailed:
        return EXIT_FAIL  # logged once as `omsd_fatal`
    return EXIT_OK


def _vtex_config_command(args: argparse.Namespace) -> int:
    settings = load_settings()
    logs.configure("warning", "console", stream=sys.stderr)
    return asyncio.run(_vtex_config(settings, args.command, args.action, args.yes))


def _check_command(args: argparse.Namespace) -> int:
    settings = load_settings()
    logs.configure("error", "console", stream=sys.stderr)
    return asyncio.run(_check(settings))


def _demo(args: argparse.Namespace) -> int:
    from omsd.daemon.demo import run_demo

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


def _offline(command: StoreCommand, *, create: bool = False) -> Handler:
    """A command on the database alone. Only `create` commands may create it: reading
    commands refuse to make an empty database by accident."""

    def handler(args: argparse.Namespace) -> int:
        db = load_db_path()
        if not create and not db.exists():
            print(f"omsd: no database at {db} (set OMSD_DB)", file=sys.stderr)
            return EXIT_CONFIG
        return asyncio.run(_with_store(db, command, args))

    return handler


async def _vtex_config(settings: Settings, kind: str, action: str, yes: bool) -> int:
    import aiohttp

    from omsd.daemon.vtex import VtexClient, feed_config_body, hook_config_body
    from omsd.daemon.vtexconfig import feed_plan, hook_plan

    if kind == "hook" and settings.hook_secret is None:
        print("omsd: OMSD_HOOK_SECRET: is required to configure the hook", file=sys.stderr)
        return EXIT_CONFIG
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
    from omsd.daemon.check import run_checks

    results = await run_checks(settings)
    table = Table(title="omsd check")
    for col in ("check", "result", "detail"):
        table.add_column(col)
    for r in results:
        table.add_row(r.name, "[green]ok[/]" if r.ok else "[red]FAIL[/]", r.detail)
    Console().print(table)
    return EXIT_OK if all(r.ok for r in results) else EXIT_FAIL


async def _with_store(db: Path, fn: StoreCommand, args: argparse.Namespace) -> int:
    async with await Store.open(db) as store:
        return await fn(store, args)


def _now() -> datetime:
    return datetime.now(UTC)


async def _approve(store: Store, args: argparse.Namespace) -> int:
    mkt: str = args.marketplace_order_id.strip()
    if not mkt:
        print("omsd: MARKETPLACE_ORDER_ID must not be empty", file=sys.stderr)
        return EXIT_CONFIG
    now = _now()
    [appended] = await store.append([intake.intent_entry(mkt, args.order_id, "cli", now)], now=now)
    print(f"intent recorded at journal offset {appended.offset}; the running daemon will act on it")
    return EXIT_OK


def _order_row(o: Order) -> list[str]:
    return [
        o.order_id,
        o.marketplace_order_id or "-",
        o.phase.value,
        o.status or "-",
        "yes" if o.held else "",
        str(o.sent),
        o.last_code or "",
        (o.last_error or "")[:60],
    ]


async def _orders(store: Store, args: argparse.Namespace) -> int:
    orders = await store.list_orders(args.phase, args.limit)
    if args.json:
        for o in orders:
            print(o.model_dump_json())
        return EXIT_OK
    table = Table(title=f"{len(orders)} orders")
    for col in ("order", "marketplace id", "phase", "VTEX status", "held", "sent", "last code", "last error"):
        table.add_column(col)
    for o in orders:
        table.add_row(*_order_row(o))
    Console().print(table)
    return EXIT_OK


async def _show(store: Store, args: argparse.Namespace) -> int:
    order = await store.find_order(args.key)
    if order is None:
        parked = await store.pending_intent(args.key)
        if parked:
            print(f"{args.key}: intent parked (source {parked[0]}, offset {parked[1]}); no VTEX order linked yet")
            return EXIT_OK
        print(f"omsd: no order {args.key}", file=sys.stderr)
        return EXIT_FAIL
    console = Console()
    console.print_json(order.model_dump_json())
    table = Table(title="transitions")
    for col in ("offset", "at", "from", "to", "VTEX status", "cause"):
        table.add_column(col)
    for h in await store.history(order.order_id):
        table.add_row(
            str(h.journal_offset),
            h.at.isoformat(timespec="seconds"),
            h.from_phase or "-",
            h.to_phase,
            h.status or "-",
            h.cause,
        )
    console.print(table)
    await _print_journal(await store.journal_tail(50, order_id=order.order_id))
    return EXIT_OK


async def _print_journal(rows: list[Any]) -> None:
    table = Table(title="journal")
    for col in ("offset", "received", "kind", "source", "order", "reason / payload"):
        table.add_column(col)
    for r in rows:
        detail = r.reason or r.payload
        table.add_row(
            str(r.offset),
            r.received_at.isoformat(timespec="seconds"),
            r.kind,
            r.source,
            r.order_id or "-",
            detail[:100],
        )
    Console().print(table)


async def _journal(store: Store, args: argparse.Namespace) -> int:
    if args.unreadable:
        return await _unreadable(store)
    rows = await store.journal_tail(args.limit, order_id=args.order, kind="rejected" if args.rejected else None)
    await _print_journal(rows)
    return EXIT_OK


async def _replay(store: Store, args: argparse.Namespace) -> int:
    from omsd.daemon.processor import Processor

    # Same policy knobs as the daemon (OMSD_MAX_ATTEMPTS etc.), so the replayed
    # state is the state the daemon had.
    policy = load_policy()
    await store.reset_derived(now=_now())
    processor = Processor(store, policy, emit_effects=False)
    applied = await processor.drain()
    reopened = 0
    for order in await store.list_orders(limit=1_000_000):
        if order.has_intent and order.phase not in TERMINAL_PHASES:
            await _append_resync(store, order.order_id, "replay")
            reopened += 1
    print(f"replayed {applied} journal entries; {reopened} open orders will be re-checked by the daemon")
    return EXIT_OK


async def _append_resync(store: Store, order_id: str, reason: str) -> None:
    now = _now()
    await store.append(
        [NewEntry.of(Resync(order_id=order_id, reason=reason), source="operator", received_at=now)], now=now
    )


async def _unreadable(store: Store) -> int:
    table = Table(title="unreadable journal rows")
    for col in ("offset", "received", "kind", "order", "error"):
        table.add_column(col)
    for u in await store.unreadable_rows():
        table.add_row(
            str(u.journal_offset), u.received_at.isoformat(timespec="seconds"), u.kind, u.order_id or "-", u.error
        )
    Console().print(table)
    return EXIT_OK


async def _retry(store: Store, args: argparse.Namespace) -> int:
    targets: list[Order] = []
    if args.all_dead:
        targets = await store.list_orders(Phase.DEAD.value, limit=1_000_000)
    elif args.key:
        order = await store.find_order(args.key)
        if order is None:
            print(f"omsd: no order {args.key}", file=sys.stderr)
            return EXIT_FAIL
        targets = [order]
    else:
        print("omsd: name an ORDER or use --all-dead", file=sys.stderr)
        return EXIT_CONFIG
    for order in targets:
        await _append_resync(store, order.order_id, "operator retry")
    print(f"resync recorded for {len(targets)} order(s)")
    return EXIT_OK


async def _status(store: Store, args: argparse.Namespace) -> int:
    out = {"phases": await store.phase_counts(), "outbox": await store.outbox_counts(), **await store.stats()}
    print(json.dumps(out, indent=2, sort_keys=True))
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
