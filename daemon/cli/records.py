"""`omsd init`, `omsd approve`: the commands that create the database or record an intent."""

from __future__ import annotations

import argparse
import sys

from omsd.state.store import Store

from ..intake import entries
from .common import EXIT_CONFIG, EXIT_OK, Subparsers, command, offline


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
        "as VTEX shows the order is not held (and never if it is canceled). Idempotent.",
    )
    a.add_argument("marketplace_order_id", metavar="MARKETPLACE_ORDER_ID")
    a.add_argument("--order-id", help="the VTEX order id, when known (links the two at once)")


async def _init(store: Store, args: argparse.Namespace) -> int:
    print(f"database ready at {store.path} (schema version {await store.db.schema_version()})")
    return EXIT_OK


async def _approve(store: Store, args: argparse.Namespace) -> int:
    mkt: str = args.marketplace_order_id.strip()
    if not mkt:
        print("omsd: MARKETPLACE_ORDER_ID must not be empty", file=sys.stderr)
        return EXIT_CONFIG
    now = args.clock()
    [appended] = await store.journal.append([entries.intent_entry(mkt, args.order_id, "cli", now)], now=now)
    print(f"intent recorded at journal offset {appended.offset}; the running daemon will act on it")
    return EXIT_OK
