"""The `omsd` command line: run the daemon, the demo, and the operator's tools.

One module per group of commands, each declaring its parsers beside its handlers
(`add(sub)`); `render` shows things, `common` holds exit codes and the offline commands'
database handling. Exit codes: 0 success; 1 runtime failure (including a demo that did
not end as it should, an unknown order, input lines refused by `ingest`); 2 bad
configuration or usage (one line naming the variable), or no database at OMSD_DB for a
command that needs one; 3 another process owns the database (`run`, `replay`, `ingest`,
`prune` refuse to work beside a running daemon; the message names its pid).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime

from omsd.state.store import StoreError

from ..config.accounts import account_environment, accounts_dir
from ..config.instance import instance_environment
from ..config.settings import ConfigError, warn_unknown_variables
from ..ops.metrics import omsd_version
from . import accounts, looking, outcomes, records, repair, run, transfer, vtex
from .common import EXIT_CONFIG, EXIT_FAIL, EXIT_OK, Handler

DESCRIPTION = """\
omsd approves VTEX marketplace orders exactly when they leave
waiting-for-manual-authorization. It reads the VTEX order feed, journals every
event in SQLite before acknowledging it, runs a state machine per order, and
sends the Channel Order API approval only after Get order confirms the order is
neither held nor canceled.

Configuration comes from OMSD_* environment variables (see README.md). Without
OMSD_ACCOUNT and with an accounts directory (OMSD_ACCOUNTS_DIR, default
/etc/omsd/accounts.d: one NAME.env per seller account) `omsd run` serves every
account in one process, `omsd accounts` lists them, and the other commands take
`--account NAME`.
The offline commands (init, approve, orders, show, journal, intents, dead, stuck,
replay, ingest, export, retry, status, prune) need only OMSD_DB; `restore` needs
OMSD_REPLICA too. Only `run`, `init` and `restore` create a database. `replay`,
`ingest`, `prune` and `restore` refuse to work beside a running daemon.

Exit codes: 0 success; 1 failure (unknown order, refused input lines);
2 bad configuration or usage, or no database at OMSD_DB; 3 another process
(a running daemon) owns the database."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="omsd", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--version", action="version", version=f"omsd {omsd_version()}")
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
    p.add_argument(
        "--account",
        metavar="NAME",
        help="with an accounts directory (OMSD_ACCOUNTS_DIR: a fleet), the account the command is for: its "
        "NAME.env and its database; required when the directory holds several (omsd accounts lists them)",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for group in (run, records, looking, outcomes, repair, transfer, vtex, accounts):
        group.add(sub)
    return p


def main(argv: list[str] | None = None, *, clock: Callable[[], datetime] | None = None) -> int:
    """`omsd ARGS`. `clock` is the time the commands take as now (tests pass a fixed one)."""
    args = parser().parse_args(argv)
    args.clock = clock or _utcnow
    handler: Handler = args.handler
    try:
        if args.instance is not None or args.service:
            environment = instance_environment(args.instance, os.environ)
            os.environ.clear()
            os.environ.update(environment)
        _for_account(args)
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


FLEET_COMMANDS = frozenset({"run", "accounts", "demo", "sim", "healthcheck"})  # the process's, not an account's


def _for_account(args: argparse.Namespace) -> None:
    """With an accounts directory, a command that opens a database works on one account's
    (`--account NAME`, or the only one): its settings become the environment it reads."""
    directory = accounts_dir(os.environ)
    if directory is None:
        single = os.environ.get("OMSD_ACCOUNT")
        if args.account is not None and args.account != single:
            raise ConfigError(f"--account {args.account}: omsd serves one account here (OMSD_ACCOUNT={single})")
        return
    if args.command in FLEET_COMMANDS:
        if args.account is not None:
            raise ConfigError(f"--account: `omsd {args.command}` is for every account of {directory}")
        return
    environment = account_environment(args.account, os.environ)
    os.environ.clear()
    os.environ.update(environment)


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _reader_gone() -> int:
    """Whoever read our output went away (`omsd journal --follow | head`): what they wanted
    was printed, so end quietly with 0; stdout goes to /dev/null so the flush at exit
    does not raise again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_OK
