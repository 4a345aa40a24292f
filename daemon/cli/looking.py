"""`omsd orders`, `show`, `journal`, `intents`, `dead`, `status`: the reading commands. They work
beside a running daemon (they take no lock)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from rich.console import Console

from omsd.state.statuses import STUCK, Phase
from omsd.state.store import Store

from . import render
from .common import EXIT_FAIL, EXIT_OK, LIMIT, OFFSET, UNKNOWN, Subparsers, command, follow, offline


def add(sub: Subparsers[argparse.ArgumentParser]) -> None:
    o = command(
        sub,
        "orders",
        offline(_orders),
        help="list orders and their phase",
        description="List orders, newest first. The title counts every matching order. In a pipe: tab-separated "
        "lines with a header, whole values (the title goes to stderr).",
    )
    o.add_argument("--phase", choices=[*(ph.value for ph in Phase), STUCK], help="only orders in this phase (or stuck)")
    o.add_argument("--limit", type=LIMIT, default=50, help="at most this many (default 50)")
    o.add_argument("--json", action="store_true", help="print each order's whole record as JSON lines")
    o.epilog = "exit codes: 0 listed (also when none match); 2 no database at OMSD_DB"

    s = command(
        sub,
        "show",
        offline(_show),
        help="one order: state, history, journal",
        description="Show one order (by VTEX order id or marketplace order id): its state, transitions and journal "
        "entries (with the intents and notifications that came under its marketplace id). A marketplace id with only "
        "a parked intent shows that intent.",
    )
    s.add_argument("key", metavar="ORDER")
    s.add_argument("--json", action="store_true", help="print one JSON object: order, history, journal")
    s.epilog = f"exit codes: 0 shown; 1 {UNKNOWN}; 2 no database at OMSD_DB"

    j = command(
        sub,
        "journal",
        offline(_journal),
        help="tail (or follow) the journal",
        description="Print the last journal entries, or those from an offset on; --follow goes on printing new "
        "ones until interrupted (Ctrl-C exits 0). Works beside the running daemon (read only).",
    )
    j.add_argument("--limit", type=LIMIT, default=30, help="the last this many entries (default 30)")
    j.add_argument("--from-offset", type=OFFSET, metavar="N", help="every entry from offset N on (not only the last)")
    j.add_argument("--order", metavar="ID", help="only this order (either id), with what came under its marketplace id")
    j.add_argument("--rejected", action="store_true", help="only rejected input, with its reason and raw body")
    j.add_argument("--unreadable", action="store_true", help="only rows the processor could not read, with why")
    j.add_argument("-f", "--follow", action="store_true", help="keep printing new entries until interrupted")
    j.add_argument(
        "--json", action="store_true", help="JSON lines with the whole payload (a rejected body as received)"
    )
    j.epilog = f"exit codes: 0 printed (a follow ended by SIGINT/SIGTERM too); 1 {UNKNOWN}; 2 no database at OMSD_DB"

    i = command(
        sub,
        "intents",
        offline(_intents),
        help="list parked intents",
        description="Approval intents that name a marketplace order id no VTEX order is linked to yet: the "
        "marketplace id, where the intent came from, since when, and why it waits.",
    )
    i.add_argument("--json", action="store_true", help="print JSON lines")
    i.epilog = "exit codes: 0 listed (also when none are parked); 2 no database at OMSD_DB"

    d = command(
        sub,
        "dead",
        offline(_dead),
        help="list dead orders and why",
        description="Orders whose approval spent its retry budget: attempts, the last result code and error, "
        "and the cause of the move to dead. `omsd retry ORDER` (or --all-dead) gives them another go.",
    )
    d.add_argument("--limit", type=LIMIT, default=50, help="at most this many (default 50)")
    d.add_argument("--json", action="store_true", help="print JSON lines")
    d.epilog = "exit codes: 0 listed (also when none are dead); 2 no database at OMSD_DB"

    st = command(
        sub,
        "stuck",
        offline(_stuck),
        help="list orders stuck on an event omsd could not apply",
        description="Orders whose event omsd could not apply (a bug, a setting out of range): the journal row it "
        "is stuck on, its kind and error, and how many of the order's later events wait behind it. Nothing is "
        "skipped and none of its effects is performed meanwhile. Fix the cause (a setting, a new version), then "
        "`omsd retry ORDER` (or --all-stuck), or restart the daemon: the held events are applied again, in order.",
    )
    st.add_argument("--json", action="store_true", help="print JSON lines")
    st.epilog = "exit codes: 0 listed (also when none are stuck); 2 no database at OMSD_DB"

    status = command(
        sub,
        "status",
        offline(_status),
        help="counts by phase, offsets, backlog",
        description="Counts by phase, journal and processor offsets, pending feed commits, timers and parked intents. "
        "A table on a terminal; in a pipe, tab-separated lines (what, value) with a header.",
    )
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.epilog = "exit codes: 0 shown; 2 no database at OMSD_DB"


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
    render.table(title, columns, map(render.order_row, orders))
    return EXIT_OK


async def _show(store: Store, args: argparse.Namespace) -> int:
    order = await store.read.find_order(args.key)
    if order is None:
        return await _show_parked(store, args)
    history = await store.read.history(order.order_id)
    rows = await store.journal.tail(50, order_id=order.order_id, marketplace_order_id=order.marketplace_order_id)
    if args.json:
        view = {
            "order": order.model_dump(mode="json"),
            "history": [render.history_view(h) for h in history],
            "journal": [render.journal_view(r) for r in rows],
        }
        print(json.dumps(view, sort_keys=True))
        return EXIT_OK
    Console().print_json(order.model_dump_json())
    columns = ("offset", "at", "from", "to", "VTEX status", "cause")
    render.table(
        f"{len(history)} transitions",
        columns,
        (
            [str(h.journal_offset), render.when(h.at), h.from_phase or "-", h.to_phase, h.status or "-", h.cause]
            for h in history
        ),
    )
    print(f"journal (the last {len(rows)} entries: offset, received, kind, source, order, reason / payload):")
    render.print_rows(rows, as_json=False)
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
        return await _unreadable(store, args.json)
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
        render.print_rows(rows, args.json)
    else:
        after = args.from_offset - 1
        while rows := await store.journal.since(after, 1000, **where):
            render.print_rows(rows, args.json)
            after = rows[-1].offset
    if args.follow:
        await _follow(store, max(after, rows[-1].offset if rows else after), where, args.json)
    return EXIT_OK


async def _follow(store: Store, after: int, where: dict[str, Any], as_json: bool) -> None:
    """Print new journal rows as the daemon writes them, until SIGINT or SIGTERM."""

    async def step() -> bool:
        nonlocal after
        rows = await store.journal.since(after, 1000, **where)
        if rows:
            render.print_rows(rows, as_json)
            after = rows[-1].offset
        return bool(rows)

    await follow(step)


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
    rows = ([p.marketplace_order_id, p.source, str(p.journal_offset), render.when(p.since), PARKED_WHY] for p in parked)
    render.table(f"{len(parked)} parked intents", ("marketplace id", "source", "offset", "since", "why"), rows)
    return EXIT_OK


async def _dead(store: Store, args: argparse.Namespace) -> int:
    orders = await store.read.list_orders(Phase.DEAD.value, args.limit)
    causes = await store.read.last_causes([o.order_id for o in orders], Phase.DEAD.value)
    views = []
    for o in orders:
        why = causes.get(o.order_id)
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
    render.table(title, columns, ([str(v[k]) if v[k] is not None else "-" for k in keys] for v in views))
    return EXIT_OK


async def _stuck(store: Store, args: argparse.Namespace) -> int:
    orders = [o for o in await store.read.list_orders(STUCK, 1_000_000) if o.stuck is not None]
    views = [
        {
            "order_id": o.order_id,
            "marketplace_order_id": o.marketplace_order_id,
            "phase": o.phase.value,
            "offset": o.stuck.offset,
            "kind": o.stuck.kind,
            "at": o.stuck.at.isoformat(),
            "held": o.stuck.held,
            "error": o.stuck.error,
        }
        for o in orders
        if o.stuck is not None
    ]
    if args.json:
        for v in views:
            render.json_line(v)
        return EXIT_OK
    columns = ("order", "marketplace id", "phase", "stuck on offset", "kind", "at", "held", "error")
    keys = ("order_id", "marketplace_order_id", "phase", "offset", "kind", "at", "held", "error")
    render.table(f"{len(views)} stuck orders", columns, ([str(v[k] or "-") for k in keys] for v in views))
    return EXIT_OK


STATUS_ROWS = (
    ("last_offset", "the journal's last offset"),
    ("processor_offset", "applied up to here (should equal last_offset within a second)"),
    ("acks_pending", "feed handles journaled, not yet committed to VTEX"),
    ("timers", "re-checks and retries set"),
    ("pending_intents", "intents parked until their order is linked"),
    ("rejected", "bad input kept (omsd journal --rejected)"),
    ("unreadable", "journal rows omsd could not read (should be 0)"),
    ("journal", "journal rows"),
)


async def _status(store: Store, args: argparse.Namespace) -> int:
    phases, outbox, stats = await store.read.phase_counts(), await store.outbox.counts(), await store.read.stats()
    if args.json:
        print(json.dumps({"phases": phases, "outbox": outbox, **stats}, indent=2, sort_keys=True))
        return EXIT_OK
    rows = [[key, str(stats[key] or 0), meaning] for key, meaning in STATUS_ROWS]
    rows += [[f"phase.{phase}", str(n), "orders in this phase"] for phase, n in sorted(phases.items())]
    rows += [[f"outbox.{state}", str(n), "VTEX calls in this state"] for state, n in sorted(outbox.items())]
    render.table("omsd status", ("what", "value", "meaning"), rows)
    return EXIT_OK


async def _unreadable(store: Store, as_json: bool) -> int:
    found = await store.read.unreadable_rows()
    if as_json:
        for u in found:
            view = {
                "offset": u.journal_offset,
                "received_at": u.received_at.isoformat(),
                "kind": u.kind,
                "order_id": u.order_id,
                "error": u.error,
            }
            render.json_line(view)
        return EXIT_OK
    rows = ([str(u.journal_offset), render.when(u.received_at), u.kind, u.order_id or "-", u.error] for u in found)
    render.table(f"{len(found)} unreadable journal rows", ("offset", "received", "kind", "order", "error"), rows)
    return EXIT_OK
