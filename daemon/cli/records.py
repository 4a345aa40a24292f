"""`omsd init`, `omsd approve`: the commands that create the database or record an intent."""

from __future__ import annotations

import argparse
import sys

from omsd.state.store import Store

from ..intake import intents
from ..ops import lock
from .common import EXIT_CONFIG, EXIT_FAIL, EXIT_OK, Subparsers, command, offline


def add(sub: Subparsers[argparse.ArgumentParser]) -> None:
    command(
        sub,
        "init",
        offline(_init, create=True),
        help="create an empty database at OMSD_DB",
        description="Create the database at OMSD_DB with the current schema (or migrate an existing one). "
        "The other offline commands refuse a database that does not exist, so a wrong OMSD_DB is an error, "
        "not a new empty database.",
    )
    a = command(
        sub,
        "approve",
        offline(_approve),
        help="record an approval intent for a marketplace order",
        description="Record an approval intent in the journal. The running daemon sends the approval as soon "
        "as VTEX shows the order is not held (and never if it is canceled). Idempotent. The ids are checked as "
        "POST /v1/approvals checks them: VTEX's shapes (letters, digits, . _ -, starting with a letter or digit; "
        "at most 100 characters for the marketplace id, 128 for the order id), and an order omsd knows under "
        "another marketplace id is refused.",
    )
    a.add_argument("marketplace_order_id", metavar="MARKETPLACE_ORDER_ID")
    a.add_argument("--order-id", help="the VTEX order id, when known (links the two at once)")
    a.epilog = (
        "exit codes: 0 recorded; 1 refused: the order is known under another marketplace id; "
        "2 an id of the wrong shape, or no database at OMSD_DB"
    )


async def _init(store: Store, args: argparse.Namespace) -> int:
    print(f"database ready at {store.path} (schema version {await store.db.schema_version()})")
    return EXIT_OK


async def _approve(store: Store, args: argparse.Namespace) -> int:
    try:  # the ids as POST /v1/approvals takes them, and refused the same way
        req = intents.parse(args.marketplace_order_id, args.order_id)
    except intents.IntentRefused as exc:
        print(f"omsd: {exc.reason}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        await intents.check(store, req)
    except intents.IntentRefused as exc:
        print(f"omsd: intent refused: {exc.reason}", file=sys.stderr)
        return EXIT_FAIL
    appended = await intents.record(store, req, "cli", args.clock())
    pid = lock.owner(store.path)
    then = (
        f"the running daemon (pid {pid}) acts on it"
        if pid
        else "no daemon runs on this database: `omsd run` acts on it"
    )
    print(f"intent recorded at journal offset {appended.offset}; {then}")
    return EXIT_OK
