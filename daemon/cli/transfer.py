"""`omsd ingest`, `omsd export`, `omsd backup`, `omsd restore`: events in, the journal out, the
database copied, the database brought back from its replica."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, TextIO

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
        "Same validation and dedup as live intake; all good lines are appended in one transaction, read and "
        "staged in bounded memory whatever the input's size. "
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


def _open_input(name: str) -> TextIO:
    return sys.stdin if name == "-" else Path(name).open(encoding="utf-8")


async def _ingest(store: Store, args: argparse.Namespace) -> int:
    """Bad lines and duplicates are found while the input streams in, and shown first (as
    they were before ingest streamed): they wait in spool files, not in memory."""
    try:
        stream = await asyncio.to_thread(_open_input, args.file)
    except OSError as exc:
        print(f"omsd: cannot read {args.file}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    with (
        stream if stream is not sys.stdin else contextlib.nullcontext(stream),
        tempfile.TemporaryFile("w+", encoding="utf-8") as bad,
        tempfile.TemporaryFile("w+", encoding="utf-8") as duplicates,
    ):
        # With --dry-run `store` is read-only: the work happens on a scratch copy.
        async with await Store.open_copy(store.path) if args.dry_run else contextlib.nullcontext(store) as target:
            try:
                result = await ingest.append(
                    target,
                    ingest.chunks(stream, args.kind, args.clock()),
                    strict=args.strict,
                    on_bad=lambda n, why: bad.write(json.dumps({"line": n, "reason": why}, sort_keys=True) + "\n"),
                    on_duplicate=lambda n: duplicates.write(f"{n}\n"),
                )
            except ingest.NotAnArray as exc:  # the whole input is one bad item: nothing appended
                result = ingest.Ingested(bad=1)
                bad.seek(0)
                bad.truncate()
                bad.write(json.dumps({"line": 1, "reason": f"not a JSON array: {exc}"}, sort_keys=True) + "\n")
            except (OSError, UnicodeDecodeError, ingest.InputTooLarge) as exc:
                print(f"omsd: cannot read {args.file}: {exc}", file=sys.stderr)
                return EXIT_CONFIG
            if result.refused_all:
                duplicates.truncate(0)
            bad.seek(0)
            duplicates.seek(0)
            out = _IngestReport(args.json, args.dry_run, result)
            out.head(bad, duplicates)
            await ingest.decisions(target, load_policy(), args.clock, out.decision)
            out.tail(duplicates)
    return EXIT_FAIL if result.bad else EXIT_OK


class _IngestReport:
    """What `omsd ingest` prints, written as it is known: bad lines (stderr), duplicates,
    each decision, the summary. `--json`: the same as one object, keys in order."""

    def __init__(self, as_json: bool, dry_run: bool, result: ingest.Ingested) -> None:
        self._json = as_json
        self._dry_run = dry_run
        self._result = result
        self._first = True

    def head(self, bad: TextIO, duplicates: TextIO) -> None:
        out = sys.stdout
        if self._json:
            out.write(f'{{"added": {self._result.added}, "bad": [')
            out.write(", ".join(line.rstrip("\n") for line in bad))
            out.write('], "decisions": [')
            return
        for line in bad:
            item = json.loads(line)
            print(f"line {item['line']}: {item['reason']}", file=sys.stderr)
        for line in duplicates:
            out.write(f"line {line.rstrip()}: duplicate (already in the journal)\n")

    def decision(self, text: str) -> None:
        if self._json:
            sys.stdout.write(("" if self._first else ", ") + json.dumps(text))
            self._first = False
        else:
            sys.stdout.write(f"  {text}\n")

    def tail(self, duplicates: TextIO) -> None:
        r, out = self._result, sys.stdout
        if self._json:
            duplicates.seek(0)
            dups = ", ".join(line.rstrip() for line in duplicates)
            out.write(f'], "dry_run": {json.dumps(self._dry_run)}, "duplicates": [{dups}], ')
            out.write(f'"refused_all": {json.dumps(r.refused_all)}}}\n')
            return
        if r.refused_all:
            print(f"nothing added: {r.bad} bad line(s) and --strict", file=sys.stderr)
            return
        verb = "would add" if self._dry_run else "added"
        out.write(f"{verb} {r.added} entries; {r.duplicates} duplicates; {r.bad} bad lines\n")


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
