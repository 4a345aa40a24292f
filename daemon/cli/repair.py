"""`omsd replay`, `omsd retry`, `omsd prune`: the commands that rebuild, reopen or shrink."""

from __future__ import annotations

import argparse
import json
import sys

from omsd.state.statuses import STUCK, Phase
from omsd.state.store import Store

from ..config.settings import load_local, load_policy
from ..ops import retention
from ..tools import replay, retry
from . import render
from .common import (
    DAYS,
    EXIT_BUSY,
    EXIT_CONFIG,
    EXIT_FAIL,
    EXIT_OK,
    OFFSET,
    Subparsers,
    command,
    offline,
    preview_options,
)


def add(sub: Subparsers[argparse.ArgumentParser]) -> None:
    rp = command(
        sub,
        "replay",
        offline(_replay, owns=True),
        help="rebuild order state from the journal and carry on open work",
        description="Apply the journal again to an empty state (the machine is pure: the result is the state "
        "the daemon had) and write it. Open work carries on: a Get order the outbox lost is queued again, an "
        "approval whose outcome is unknown is re-checked with Get order, parked intents stay parked; an approval "
        "the journal shows as sent and answered is never sent again. Refuses to run beside a daemon (exit 3).",
    )
    rp.add_argument("--order", metavar="ID", help="only this order (VTEX order id or marketplace order id)")
    rp.add_argument("--from-offset", type=OFFSET, metavar="N", help="only orders with journal entries from offset N on")
    rp.add_argument("--to-offset", type=OFFSET, metavar="N", help="rebuild as of offset N (every order only)")
    preview_options(rp, "change nothing; print what would differ and be called", "log each routed event")

    r = command(
        sub,
        "retry",
        offline(_retry),
        help="give a dead (or stuck) order another go",
        description="Append a resync for the order: its retry budget is reset and it is re-checked with Get "
        "order before anything is sent. Closed orders (approved, rejected) and orders nobody asked to approve "
        "are left alone, and the command says so.",
    )
    r.add_argument("key", metavar="ORDER", nargs="?")
    r.add_argument("--all-dead", action="store_true", help="every order in the dead phase")
    r.add_argument(
        "--all-stuck", action="store_true", help="every order stuck on an event omsd could not apply (omsd stuck)"
    )
    r.epilog = (
        "exit codes: 0 a resync recorded for the order (or each dead or stuck order; none is not an error); "
        "1 unknown order, or nothing done (the order is closed, or has no approval intent); "
        "2 neither ORDER nor --all-dead/--all-stuck, or no database at OMSD_DB"
    )

    p = command(
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
        "--older-than",
        type=DAYS,
        metavar="DAYS",
        help="quiet for this many days, 0 to 36500 (0: every closed order, however recent; "
        "default OMSD_RETENTION_DAYS, 30)",
    )
    p.add_argument("--dry-run", action="store_true", help="change nothing; count what would go")
    p.add_argument("--json", action="store_true", help="print the counts as one JSON object")
    p.epilog = (
        "exit codes: 0 pruned (or nothing to prune); 2 no database at OMSD_DB, or no age (OMSD_RETENTION_DAYS=0 "
        "and no --older-than); 3 another process (the daemon, which prunes by itself) owns the database"
    )


async def _replay(store: Store, args: argparse.Namespace) -> int:
    partial = args.order is not None or args.from_offset is not None
    if partial and args.to_offset is not None and not args.dry_run:
        print("omsd: --to-offset rebuilds every order: it cannot go with --order or --from-offset", file=sys.stderr)
        return EXIT_CONFIG
    stuck = await store.read.count_orders(STUCK)
    meter = render.Meter("replayed", await store.journal.last_offset() if args.to_offset is None else args.to_offset)
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
    try:
        if not args.dry_run:
            await replay.apply(store, result, args.clock())
        await _print_replay(result, args.dry_run, args.json)
    finally:
        await result.close()
    if stuck:
        # A rebuild derives no outcome events (the stream keeps what it said): the held events of
        # a stuck order it applies reach the connector only through `retry`, which writes them.
        orders = "1 order was" if stuck == 1 else f"{stuck} orders were"
        print(
            f"omsd: warning: {orders} stuck on an event: a replay rebuilds their held events without telling "
            "the connector how they end (no outcome events); `omsd retry --all-stuck` (or starting the fixed "
            "daemon) applies them and tells it: do that before a replay",
            file=sys.stderr,
        )
    return EXIT_OK


async def _print_replay(result: replay.Plan, dry_run: bool, as_json: bool) -> None:
    """The orders that differ or need a call, then the summary; written as they are read
    (a replay that changes every order shows every order, whatever their number)."""
    summary = {**result.summary(), "dry_run": dry_run, "offset": result.rebuilt.offset}
    out = sys.stdout
    if as_json:  # the same text as json.dumps({"orders": [...], "summary": ...}, sort_keys=True)
        out.write('{"orders": [')
        first = True
        async for page in result.shown():
            for o in page:
                out.write(("" if first else ", ") + json.dumps(o.view(), sort_keys=True))
                first = False
        out.write(f'], "summary": {json.dumps(summary, sort_keys=True)}}}\n')
        return
    async for page in result.shown():
        for o in page:
            diffs = ", ".join(f"{k} {render.short(a)} -> {render.short(b)}" for k, (a, b) in o.differences().items())
            calls = "; ".join(o.calls())
            out.write(
                f"{o.order_id}: {diffs or 'unchanged'}"
                + (f"; {'would call' if dry_run else 'calls'}: {calls}" if calls else "")
                + "\n"
            )
    verb = "would rebuild" if dry_run else "rebuilt"
    counts = f"{summary['unchanged']} unchanged, {summary['changed']} changed"
    out.write(
        f"{verb} {summary['orders']} orders from {summary['events']} journal entries (to offset {summary['offset']}): "
        f"{counts}, {summary['newly_actionable']} newly actionable\n"
    )


async def _retry(store: Store, args: argparse.Namespace) -> int:
    every = [phase for phase, flag in ((Phase.DEAD.value, args.all_dead), (STUCK, args.all_stuck)) if flag]
    if (args.key is not None) + len(every) != 1:
        print("omsd: name an ORDER, or use --all-dead or --all-stuck", file=sys.stderr)
        return EXIT_CONFIG
    try:
        orders = await retry.targets(store, args.key, *every)
    except retry.UnknownOrder:
        print(f"omsd: no order {args.key}", file=sys.stderr)
        return EXIT_FAIL
    except retry.NotRetryable as exc:
        print(f"omsd: {exc}", file=sys.stderr)
        return EXIT_FAIL
    if not orders:
        print(f"no {'stuck' if args.all_stuck else 'dead'} orders: nothing to retry")
        return EXIT_OK
    count = await retry.retry(store, orders, args.clock())
    print(f"resync recorded for {count} order(s); the running daemon re-checks them with Get order")
    return EXIT_OK


def _prune_command(args: argparse.Namespace) -> int:
    code = offline(_prune, owns=True)(args)
    if code == EXIT_BUSY:
        print(
            "omsd: the running daemon prunes by itself (OMSD_RETENTION_DAYS, every 6 hours); "
            "to prune now, stop it, run `omsd prune`, start it again",
            file=sys.stderr,
        )
    return code


async def _prune(store: Store, args: argparse.Namespace) -> int:
    days = args.older_than if args.older_than is not None else load_local().retention_days
    if args.older_than is None and days == 0:
        print("omsd: retention is off (OMSD_RETENTION_DAYS=0): name the age with --older-than DAYS", file=sys.stderr)
        return EXIT_CONFIG
    report = await retention.prune(store, days, args.clock(), dry_run=args.dry_run)
    if args.json:
        print(json.dumps(report.view(), sort_keys=True))
        return EXIT_OK
    p = report.pruned
    verb = "would prune" if report.dry_run else "pruned"
    print(
        f"{verb} {p.orders} orders quiet since before {render.when(report.cutoff)}: {p.journal_rows} journal rows "
        f"into {p.orders} snapshots, {p.history_rows} history rows, {p.outbox_rows} outbox rows; "
        f"{p.rejected_rows} rejected inputs, {p.outcome_rows} outcome events"
        + ("" if report.dry_run else f"; {report.freed_bytes:,} bytes given back to the disk")
    )
    return EXIT_OK
