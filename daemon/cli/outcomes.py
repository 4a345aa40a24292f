"""`omsd events` and `omsd relay status|retry|replay`: the outcome stream and its relay, from
the database (they work beside a running daemon, which picks up what `relay` changes)."""

from __future__ import annotations

import argparse
import json
import sys

from omsd.state.outcomes import TYPES
from omsd.state.store import Store
from omsd.state.store.outcomes import OutcomeRow

from . import render
from .common import EXIT_CONFIG, EXIT_FAIL, EXIT_OK, LIMIT, OFFSET, Subparsers, bounded, command, follow, offline

SEQ = bounded("seq", 1, 2**63 - 1)


def add(sub: Subparsers[argparse.ArgumentParser]) -> None:
    e = command(
        sub,
        "events",
        offline(_events),
        help="print the outcome stream (what the connector learns)",
        description="Print outcome events (intent.accepted, approval.sent, approval.confirmed, approval.refused, "
        "intent.canceled, intent.expired, order.dead, vtex.processing_result), oldest first: the last --limit, or "
        "every one after --after N; --follow goes on printing new ones until interrupted. The same events as "
        "GET /v1/events.",
    )
    e.add_argument("--after", type=OFFSET, metavar="N", help="every event after seq N (not only the last)")
    e.add_argument("--limit", type=LIMIT, default=30, help="the last this many events (default 30)")
    e.add_argument("--type", action="append", default=[], choices=TYPES, help="only this type (repeatable)")
    e.add_argument("--order", metavar="ID", help="only this order (VTEX or marketplace order id)")
    e.add_argument("-f", "--follow", action="store_true", help="keep printing new events until interrupted")
    e.add_argument("--json", action="store_true", help="JSON lines, as the API gives them")
    e.epilog = (
        "exit codes: 0 printed (a follow ended by SIGINT/SIGTERM too); 1 --after past the last event; "
        "2 bad usage or no database at OMSD_DB"
    )

    r = command(
        sub,
        "relay",
        offline(_relay),
        help="the relay's endpoints: status, retry what it gave up, replay from a seq",
        description="`omsd relay status` shows each relay endpoint (webhook: OMSD_RELAY_URL; vtex: "
        "OMSD_RELAY_VTEX_URL): how far it is, deliveries pending and given up, the oldest undelivered event, "
        "whether it is disabled (the connector answered 410), why the oldest failing delivery failed. "
        "`omsd relay retry` enables it again and sends at once what it gave up or holds for a retry; "
        "`omsd relay replay --from SEQ` sends every event from SEQ on again (receivers deduplicate by "
        "webhook-id). The running daemon picks the change up within a second.",
    )
    r.add_argument("action", choices=["status", "retry", "replay"])
    r.add_argument("--endpoint", choices=["webhook", "vtex"], help="only this endpoint (default: every one)")
    r.add_argument("--from", dest="from_seq", type=SEQ, metavar="SEQ", help="replay: from this seq on")
    r.add_argument("--json", action="store_true", help="status as JSON lines")
    r.epilog = (
        "exit codes: 0 done; 1 no such endpoint in this database, or --from past the next event; "
        "2 bad usage or no database at OMSD_DB"
    )


def _line(row: OutcomeRow) -> str:
    data = " ".join(f"{k}={v}" for k, v in row.data.items() if k != "body" and v is not None)
    subject = row.order_id or f"mkt:{row.marketplace_order_id}"
    return f"{row.seq}\t{render.when(row.occurred_at)}\t{row.type}\t{subject}\t{data}"


async def _events(store: Store, args: argparse.Namespace) -> int:
    outcomes, kinds = store.outcomes, tuple(args.type)
    _, last = await outcomes.bounds()
    if args.after is not None and args.after > last:
        print(
            f"omsd: --after {args.after} is past the end of the stream (the last event is seq {last})", file=sys.stderr
        )
        return EXIT_FAIL
    after = args.after if args.after is not None else max(0, last - args.limit)

    async def step() -> bool:
        nonlocal after
        rows = await outcomes.after(after, 1000, types=kinds, order=args.order)
        for row in rows:
            print(json.dumps(row.view(), sort_keys=True) if args.json else _line(row))
        sys.stdout.flush()
        if rows:
            after = rows[-1].seq
        return bool(rows)

    while await step() and args.after is not None:
        pass
    if args.follow:
        await follow(step)
    return EXIT_OK


async def _relay(store: Store, args: argparse.Namespace) -> int:
    known = {s.name: s for s in await store.outcomes.endpoints()}
    names = [args.endpoint] if args.endpoint else sorted(known)
    if missing := [n for n in names if n not in known]:
        print(
            f"omsd: no relay endpoint {missing[0]} in this database (set OMSD_RELAY_URL and run omsd)", file=sys.stderr
        )
        return EXIT_FAIL
    now = args.clock()
    if args.action == "retry":
        for name in names:
            gone = await store.outcomes.drop_orphans(name)
            count = await store.outcomes.retry(name, now)
            print(f"{name}: enabled; {count} given-up deliveries due again, and every one waiting for a retry", end="")
            print(f"; {gone} whose events an older retention removed dropped" if gone else "")
        return EXIT_OK
    if args.action == "replay":
        if args.from_seq is None:
            print("omsd: replay needs --from SEQ (1 or more)", file=sys.stderr)
            return EXIT_CONFIG
        _, last = await store.outcomes.bounds()
        if args.from_seq > last + 1:  # the cursor would pass events not written yet, never to send them
            print(
                f"omsd: --from {args.from_seq} is past the end of the stream (the last event is seq {last}; "
                f"--from {last + 1} sends what comes next)",
                file=sys.stderr,
            )
            return EXIT_FAIL
        for name in names:
            await store.outcomes.rewind(name, args.from_seq)
            print(f"{name}: every event from seq {args.from_seq} on goes out again")
        return EXIT_OK
    views = []
    for name in names:
        s = known[name]
        age = (now - s.oldest_undelivered).total_seconds() if s.oldest_undelivered else 0.0
        views.append(
            {
                "endpoint": name,
                "taken_to_seq": s.cursor,
                "pending": s.pending,
                "given_up": s.failed,
                "oldest_undelivered_s": round(max(0.0, age), 1),
                "disabled": s.disabled_reason if s.disabled_at else None,
                "events_gone": s.orphaned,
                "last_error": s.last_error,
            }
        )
    if args.json:
        for view in views:
            print(json.dumps(view, sort_keys=True))
        return EXIT_OK
    columns = (
        *("endpoint", "taken to seq", "pending", "given up", "oldest undelivered (s)", "disabled", "events gone"),
        "last error",
    )
    keys = (
        *("endpoint", "taken_to_seq", "pending", "given_up", "oldest_undelivered_s", "disabled", "events_gone"),
        "last_error",
    )
    rows = (["-" if v[k] is None else str(v[k]) for k in keys] for v in views)
    render.table(f"{len(views)} relay endpoints", columns, rows)
    return EXIT_OK
