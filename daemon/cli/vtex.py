"""`omsd feed|hook config`, `omsd check`, `omsd healthcheck`: VTEX's side and the daemon's, looked at."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from ..config.settings import Settings, load_local, load_settings
from ..ops import logs
from ..vtex.errors import VtexError
from . import render
from .common import EXIT_CONFIG, EXIT_FAIL, EXIT_OK, Subparsers, command


def add(sub: Subparsers[argparse.ArgumentParser]) -> None:
    for name, what in (("feed", "the feed configuration"), ("hook", "the order hook configuration")):
        c = command(
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
    command(
        sub,
        "check",
        _check_command,
        help="diagnose the set-up in one screen",
        description="Check that the settings are valid, VTEX accepts the credentials, the feed/hook configuration "
        "exists and its filter has the statuses omsd needs, the feed queue is not near expiry, the database is "
        "writable with a current schema, and the listen address is free. Exit 0 when every check passes; a "
        "warning (no feed or hook configuration yet, which omsd run creates; OMSD_API_TOKEN unset) passes too.",
    )
    command(
        sub,
        "healthcheck",
        _healthcheck_command,
        help="exit 0 when the local daemon answers /healthz",
        description="GET /healthz of the daemon at OMSD_LISTEN (0.0.0.0 and :: are reached via loopback); "
        "exit 0 on 200, 1 otherwise. For container HEALTHCHECKs; needs only OMSD_LISTEN.",
    )


def _vtex_config_command(args: argparse.Namespace) -> int:
    settings = load_settings()
    logs.configure("warning", "console", stream=sys.stderr)
    return asyncio.run(_vtex_config(settings, args.command, args.action, args.yes))


def _check_command(args: argparse.Namespace) -> int:
    settings = load_settings()
    logs.configure("error", "console", stream=sys.stderr)
    unit = f"omsd@{args.instance}" if args.instance is not None else "omsd" if args.service else None
    return asyncio.run(_check(settings, unit))


def _healthcheck_command(args: argparse.Namespace) -> int:
    return _healthcheck(load_local().listen)


async def _vtex_config(settings: Settings, kind: str, action: str, yes: bool) -> int:
    import aiohttp

    from ..vtex.client import VtexClient
    from ..vtex.configuration import feed_plan, hook_plan
    from ..vtex.models import feed_config_body, hook_config_body

    used = settings.uses_feed if kind == "feed" else settings.uses_hook
    if not used and action == "apply":
        print(f"omsd: OMSD_SOURCE={settings.source}: omsd does not use the {kind}; nothing to apply", file=sys.stderr)
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
        if not used:  # nothing to propose: omsd neither reads nor keeps this configuration
            print(f"OMSD_SOURCE={settings.source}: omsd does not use the {kind}; nothing to change")
            return EXIT_OK
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


async def _check(settings: Settings, unit: str | None = None) -> int:
    from ..tools.check import run_checks

    results = await run_checks(settings, unit=unit)
    rows = ([r.name, r.verdict, r.detail] for r in results)
    render.table("omsd check", ("check", "result", "detail"), rows)
    return EXIT_OK if all(r.ok for r in results) else EXIT_FAIL
