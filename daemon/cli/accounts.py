"""`omsd accounts`: every account of a fleet, from its database and, while omsd runs, its
/readyz. Reads only (it takes no lock): it works beside the running daemon."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from omsd.state.store import Store, StoreError

from ..config.accounts import accounts_dir, load_fleet_settings, read_accounts
from ..config.settings import load_local
from . import render
from .common import EXIT_OK, Subparsers, command

OPEN = ("waiting_release", "checking", "sending", "awaiting_result", "retry_wait")
READYZ_TIMEOUT_S = 5.0


def add(sub: Subparsers[argparse.ArgumentParser]) -> None:
    a = command(
        sub,
        "accounts",
        _accounts,
        help="every account of the fleet: readiness, alarms, orders, lag",
        description="List the accounts of OMSD_ACCOUNTS_DIR (or the one account of OMSD_ACCOUNT): whether each "
        "runs and is ready, its alarms and problems (from the running daemon's /readyz at OMSD_LISTEN), its approvals "
        "open, approved and dead, and its lag (journal events not applied yet), read from its database.",
    )
    a.add_argument("--json", action="store_true", help="print one JSON object per account")
    a.epilog = "exit codes: 0 listed (also when an account is not ready); 2 bad configuration"


def _accounts(args: argparse.Namespace) -> int:
    directory = accounts_dir(os.environ)
    if directory is None:
        local = load_local()
        name = os.environ.get("OMSD_ACCOUNT", "-")
        dbs: dict[str, Path | None] = {name: local.db}
        errors: dict[str, str] = {}
        listen = local.listen
    else:
        shared = load_fleet_settings()
        configs = read_accounts(directory)
        dbs = {n: c.settings.db if c.settings else None for n, c in configs.items()}
        errors = {n: c.error for n, c in configs.items() if c.error}
        listen = shared.listen
    readiness = _readiness(listen)
    rows = asyncio.run(_read_all(dbs))
    views = [_view(name, rows[name], errors.get(name), readiness) for name in dbs]
    if args.json:
        for view in views:
            render.json_line(view)
        return EXIT_OK
    daemon = "running" if readiness is not None else "not answering"
    render.table(
        f"omsd accounts: {len(views)} (daemon at {listen}: {daemon})",
        ("account", "state", "open", "approved", "dead", "lag", "problems"),
        (
            [
                v["account"],
                v["state"],
                *(str(v[k]) if v[k] is not None else "-" for k in ("open", "approved", "dead", "lag")),
                "; ".join(v["problems"]) or "-",
            ]
            for v in views
        ),
    )
    return EXIT_OK


def _readiness(listen: str) -> dict[str, Any] | None:
    """The running daemon's /readyz body (a fleet's, or one account's), or None."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)  # noqa: S104 - mapping, not binding
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=READYZ_TIMEOUT_S) as resp:
            body = resp.read()
    except urllib.error.HTTPError as exc:  # 503: not ready, the body says why
        body = exc.read()
    except (OSError, ValueError):
        return None
    try:
        found = json.loads(body)
    except ValueError:
        return None
    return found if isinstance(found, dict) else None


async def _read_all(dbs: dict[str, Path | None]) -> dict[str, dict[str, Any] | None]:
    there = {name: db for name, db in dbs.items() if db is not None and db.exists()}
    return {name: await _read(there[name]) if name in there else None for name in dbs}


async def _read(db: Path) -> dict[str, Any] | None:
    try:
        async with await Store.open_readonly(db) as store:
            phases = await store.read.phase_counts()
            stats = await store.read.stats()
    except StoreError as exc:
        print(f"omsd: warning: {db}: {exc}", file=sys.stderr)
        return None
    return {"phases": phases, "lag": max(0, int(stats["last_offset"]) - int(stats["processor_offset"] or 0))}


def _view(
    name: str, data: dict[str, Any] | None, error: str | None, readiness: dict[str, Any] | None
) -> dict[str, Any]:
    problems: list[str] = []
    if error is not None:
        state, problems = "invalid", [error]
    elif readiness is None:
        state = "not running"
    else:
        account = readiness.get("accounts", {}).get(name) if "accounts" in readiness else readiness
        if not isinstance(account, dict):
            state = "not running"
        else:
            problems = [str(p) for p in account.get("problems", [])]
            running = not any(p.startswith("not running") for p in problems)
            state = "ready" if account.get("ready") else ("not ready" if running else "not running")
    phases: dict[str, int] = data["phases"] if data else {}
    return {
        "account": name,
        "state": state,
        "problems": problems,
        "alarms": [p.removeprefix("alarm ").split(":", 1)[0] for p in problems if p.startswith("alarm ")],
        "open": sum(phases.get(p, 0) for p in OPEN) if data else None,
        "approved": phases.get("approved", 0) if data else None,
        "dead": phases.get("dead", 0) if data else None,
        "lag": data["lag"] if data else None,
    }
