"""`omsd ingest`, `omsd export`, `omsd backup`, `omsd restore`: events in, the journal out, the
database copied, the database brought back from its replica."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

from omsd.state.events import ENTRY_KINDS
from omsd.state.store import Store

from ..config.settings import load_db_path, load_policy, load_replica_settings
from ..tools import ingest
from .common import EXIT_BUSY, EXIT_CONFIG, EXIT_FAIL, EXIT_OK, OFFSET, Subparsers, command, offline, preview_options


def add(sub: Subparsers[argparse.ArgumentParser]) -> None:
    ing = command(
        sub,
        "ingest",
        offline(_ingest, owns=True),
        help="append captured events (feed items, hook pushes, notifications, exports)",
        description="Append events captured elsewhere: feed items as GET /api/orders/feed returns them, hook "
        "pushes (PascalCase), processing-result notifications, or journal rows as `omsd export` writes them. "
        "FILE (or - for stdin) is a JSON array or JSON lines; the kind is detected per item unless --kind. "
        "Same validation and dedup as live intake; all good lines are appended in one transaction. "
        "Exit 1 when a line was refused (with --strict nothing is appended). Refuses to run beside a daemon.",
    )
    ing.add_argument("file", metavar="FILE", help="a file, or - for standard input")
    ing.add_argument("--kind", choices=ingest.KINDS, help="treat every item as this kind")
    ing.add_argument("--strict", action="store_true", help="append nothing if any line is bad")
    preview_options(
        ing, "change nothing; show what would be added and decided", "log each transition as the daemon would"
    )

    ex = command(
        sub,
        "export",
        offline(_export),
        help="write the journal as JSON lines",
        description="Write journal rows as JSON lines on stdout (kind, version, source, order id, dedup keys, "
        "received time, payload as stored), oldest first. `omsd ingest` reads this format back.",
    )
    ex.add_argument("--order", metavar="ID", help="only this order (either id; includes entries routed to it)")
    ex.add_argument("--from-offset", type=OFFSET, default=0, metavar="N", help="only entries after offset N")
    ex.add_argument(
        "--kind",
        action="append",
        default=[],
        choices=[*ENTRY_KINDS, "rejected"],
        metavar="KIND",
        help=f"only entries of this kind (repeatable): {', '.join([*ENTRY_KINDS, 'rejected'])}",
    )

    b = command(
        sub,
        "backup",
        _backup,
        help="copy the database, consistently, while the daemon runs",
        description="Copy the database at OMSD_DB to PATH with SQLite's online backup API: the copy is the "
        "database as of one commit, written with mode 0600 and renamed into place when whole. The daemon "
        "keeps running. Refuses to replace an existing file unless --force. Restore: stop the daemon, copy the "
        "backup to OMSD_DB, start it (see docs/operations.md).",
    )
    b.add_argument("path", metavar="PATH", type=Path, help="where to write the copy")
    b.add_argument("--force", action="store_true", help="replace PATH if it exists")
    b.add_argument("--json", action="store_true", help="print what was written as JSON")

    r = command(
        sub,
        "restore",
        _restore,
        help="bring the database back from its replica (OMSD_REPLICA), checked",
        description="Restore the database from the Litestream replica at OMSD_REPLICA: its latest state, or as "
        "it was at --to TIME. The copy is restored beside the target, checked (SQLite's integrity check; the "
        "orders rebuilt from its journal must be the orders it holds) and only then renamed into place; a "
        "database it replaces is kept beside it (NAME.before-restore-TIME). Refuses to replace an existing "
        "database without --force, and to work beside a running daemon (exit 3). `omsd run` restores by "
        "itself when OMSD_DB is missing (docs/operations.md, 'Replication').",
    )
    r.add_argument("--to", metavar="TIME", help="the state at this time (ISO 8601, e.g. 2026-12-06T08:30:00Z)")
    r.add_argument("--dry-run", action="store_true", help="restore into a temporary file, check it, remove it")
    r.add_argument("--output", metavar="PATH", type=Path, help="restore here instead of OMSD_DB (e.g. to look)")
    r.add_argument("--force", action="store_true", help="replace the target if it exists (kept beside, renamed)")
    r.add_argument("--json", action="store_true", help="print the report as one JSON object")


def _read_input(name: str) -> str:
    """The whole input as text, refused past MAX_INPUT bytes (`/dev/zero` never ends)."""
    limit = ingest.MAX_INPUT
    if name == "-" and not hasattr(sys.stdin, "buffer"):  # a text stream stands in for stdin
        text = sys.stdin.read(limit + 1)
        data = text.encode("utf-8")
    else:
        with contextlib.ExitStack() as stack:
            stream = sys.stdin.buffer if name == "-" else stack.enter_context(Path(name).open("rb"))
            data = stream.read(limit + 1)
    if len(data) > limit:
        raise ingest.InputTooLarge(f"larger than {limit // 2**20} MiB: split it (JSON lines split at any line)")
    return data.decode("utf-8")


async def _ingest(store: Store, args: argparse.Namespace) -> int:
    try:
        text = await asyncio.to_thread(_read_input, args.file)
    except (OSError, UnicodeDecodeError, ingest.InputTooLarge) as exc:
        print(f"omsd: cannot read {args.file}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    lines = ingest.parse(text, args.kind, args.clock())
    bad = [line for line in lines if line.entry is None]
    good = [line for line in lines if line.entry is not None]
    if args.strict and bad:
        good = []
    entries = [line.entry for line in good if line.entry is not None]
    # With --dry-run `store` is read-only: the work happens on a scratch copy in memory.
    async with await Store.open_copy(store.path) if args.dry_run else contextlib.nullcontext(store) as target:
        appended = await target.journal.ingest(entries) if entries else []
        decided = await ingest.decisions(target, load_policy(), args.clock)
    dups = [line.number for line, a in zip(good, appended, strict=True) if a.duplicate]
    report = {
        "dry_run": args.dry_run,
        "added": len(appended) - len(dups),
        "duplicates": dups,
        "bad": [{"line": line.number, "reason": line.error} for line in bad],
        "refused_all": bool(args.strict and bad),
        "decisions": decided,
    }
    _print_ingest(report, args.json)
    return EXIT_FAIL if bad else EXIT_OK


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


def _restore(args: argparse.Namespace) -> int:
    from ..ops import lock
    from ..tools.restore import RestoreFailed, RestoreRefused, parse_time, restore_replica

    settings = load_replica_settings()
    target = args.output or settings.db
    owns = not args.dry_run and Path(target).absolute() == settings.db.absolute()
    try:
        to = parse_time(args.to) if args.to else None
        with lock.hold(settings.db) if owns else contextlib.nullcontext():
            report = asyncio.run(
                restore_replica(
                    settings, load_policy(), to=to, dry_run=args.dry_run, output=args.output, force=args.force
                )
            )
    except RestoreRefused as exc:
        print(f"omsd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except lock.DatabaseBusy as exc:
        print(f"omsd: {exc}", file=sys.stderr)
        return EXIT_BUSY
    except RestoreFailed as exc:
        print(f"omsd: {exc}", file=sys.stderr)
        return EXIT_FAIL
    if args.json:
        print(json.dumps(report.as_dict(), sort_keys=True))
    else:
        _print_restore(report)
    return EXIT_OK if report.ok else EXIT_FAIL


def _print_restore(report: Any) -> None:
    when = f" as of {report.to}" if report.to else ""
    print(f"restored {report.replica}{when}: txid {report.txid}, {report.bytes} bytes in {report.seconds:.2f}s")
    print(f"integrity check: {report.integrity}")
    replay = report.replay
    if replay:
        differing = replay["differing_orders"]
        verdict = "every order matches" if not differing else f"{differing} order(s) differ"
        print(
            f"replay check: {replay['orders']} orders rebuilt from the journal "
            f"up to offset {replay['to_offset']}: {verdict}"
        )
        for order in replay["differences"]:
            print(f"  {order['order_id']}: {order['differences']}")
    if report.last_offset is not None:
        print(f"journal: last offset {report.last_offset}, last event at {report.last_event_at}")
    if not report.ok:
        print("checks failed: nothing was replaced", file=sys.stderr)
    elif report.dry_run:
        print(f"dry run: {report.target} unchanged")
    else:
        kept = f"; the database it replaced is at {report.replaced}" if report.replaced else ""
        print(f"{report.target} is the restored database{kept}")


def _backup(args: argparse.Namespace) -> int:
    from ..tools.backup import BackupExists, BadPath, backup

    db = load_db_path()
    if not db.exists():
        print(f"omsd: no database at {db} (set OMSD_DB)", file=sys.stderr)
        return EXIT_CONFIG
    try:
        done = backup(db, args.path, force=args.force)
    except (BackupExists, BadPath) as exc:
        print(f"omsd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.json:
        print(json.dumps(done.as_dict(), sort_keys=True))
    else:
        print(f"backed up {done.source} to {done.path}: {done.bytes} bytes, schema version {done.schema_version}")
    return EXIT_OK
