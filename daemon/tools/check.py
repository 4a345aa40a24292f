"""`omsd check`: diagnose a set-up in one screen. Each check passes or says why not."""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import aiohttp

from omsd.state.store import Store, StoreError
from omsd.state.store.schema import SCHEMA_VERSION

from ..config.settings import Settings, db_folder_problem
from ..ops.litestream import Layout, ReplicaError, find_binary, list_files
from ..ops.litestream import version as litestream_version
from ..vtex.client import VtexClient
from ..vtex.configuration import hook_plan, missing_statuses
from ..vtex.errors import AuthFailed, VtexError


@dataclass(frozen=True)
class Result:
    """One check: `ok` false fails `omsd check` (exit 1); a `warning` passes but says what
    to look at (the state before the first `omsd run`, an optional setting left out)."""

    name: str
    ok: bool
    detail: str
    warning: bool = False

    @property
    def verdict(self) -> str:
        return "FAIL" if not self.ok else "warn" if self.warning else "ok"


async def run_checks(settings: Settings, *, bind_test: bool = True, unit: str | None = None) -> list[Result]:
    """`unit`: the systemd unit whose view the settings are (`--service`, `--instance`): its
    state directory is systemd's to create at the first start."""
    results = [Result("settings", True, f"account {settings.account}, source {settings.source}")]
    results.append(_api_token(settings))
    results.append(await _database(settings.db, unit))
    if settings.replica is not None:
        results.append(await _replica(settings))
    if bind_test:
        results.append(await _listen(settings))
    async with aiohttp.ClientSession() as session:
        client = VtexClient(settings, session, max_rate_limited=1)
        results.extend(await _vtex(settings, client))
    return results


def _api_token(settings: Settings) -> Result:
    if settings.api_token is not None:
        return Result("API token", True, "OMSD_API_TOKEN is set: /v1 needs it as a bearer token")
    detail = (
        "OMSD_API_TOKEN is not set: every /v1 write (POST /v1/approvals) is refused with 403, and the /v1 reads "
        "(the outcome events, orders) are open to anyone who reaches OMSD_LISTEN"
    )
    return Result("API token", True, detail, warning=True)


async def _database(db: Path, unit: str | None = None) -> Result:
    if not await asyncio.to_thread(db.exists):
        if (problem := db_folder_problem(db)) is not None:
            if unit is not None:  # StateDirectory=: systemd creates it as the unit starts
                return Result(
                    "database", True, f"{db.parent}: systemd creates it at {unit}'s first start", warning=True
                )
            return Result("database", False, f"{db}: {problem} (omsd run refuses it, exit 2)")
        parent = db.parent if str(db.parent) else Path()
        if os.access(parent, os.W_OK):
            return Result("database", True, f"{db} does not exist yet; {parent} is writable")
        return Result("database", False, f"{db} does not exist and {parent} is not writable")
    try:
        store = await Store.open(db, migrate=False)
    except StoreError as exc:
        return Result("database", False, str(exc))
    try:
        version = await store.db.schema_version()
        writable = await store.db.writable()
    finally:
        await store.close()
    if not writable:
        return Result("database", False, f"{db} is not writable")
    if version != SCHEMA_VERSION:
        return Result("database", True, f"schema {version}, omsd migrates it to {SCHEMA_VERSION} at start")
    return Result("database", True, f"{db} writable, schema {version} current")


async def _replica(settings: Settings) -> Result:
    """Litestream is there, and the replica can be read: what it holds, up to when."""
    where = f"{settings.replica_display} ({settings.durability} durability)"
    try:
        binary = find_binary(settings.litestream_bin)
        release = await litestream_version(binary)
        with tempfile.TemporaryDirectory(prefix="omsd-check-") as folder:
            layout = replace(Layout.of(settings.db), config=Path(folder) / "litestream.json")
            await asyncio.to_thread(layout.write_config, settings.replica or "")
            files = await list_files(binary, layout)
    except ReplicaError as exc:
        return Result("replica", False, f"{where}: {exc}")
    if not files:
        return Result("replica", True, f"{where}: empty, nothing replicated yet (litestream {release})")
    latest = max(files, key=lambda f: (f.max_txid, f.timestamp))
    newest = max(f.timestamp for f in files)
    return Result(
        "replica",
        True,
        f"{where}: txid {latest.max_txid}, last written {newest}, {len(files)} files (litestream {release})",
    )


async def _listen(settings: Settings) -> Result:
    family = socket.AF_INET6 if ":" in settings.listen_host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((settings.listen_host, settings.listen_port))
        except OSError as exc:
            if await _omsd_answers(settings):
                return Result("listen address", True, f"{settings.listen}: served by the running omsd")
            return Result("listen address", False, f"{settings.listen}: {exc.strerror} (and not by omsd)")
    return Result("listen address", True, f"{settings.listen} is free")


async def _omsd_answers(settings: Settings) -> bool:
    """The address is taken by a running omsd: its /healthz answers 200 and its
    /metrics carry omsd_build_info (another program's /healthz would not)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(settings.listen_host, settings.listen_host)  # noqa: S104
    base = f"http://{f'[{host}]' if ':' in host else host}:{settings.listen_port}"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            async with session.get(f"{base}/healthz") as health:
                if health.status != 200:
                    return False
            async with session.get(f"{base}/metrics") as metrics:
                return metrics.status == 200 and "omsd_build_info" in await metrics.text()
    except (aiohttp.ClientError, TimeoutError):
        return False


async def _vtex(settings: Settings, client: VtexClient) -> list[Result]:
    out: list[Result] = []
    try:
        feed = await client.get_feed_config()
    except AuthFailed as exc:
        return [Result("credentials", False, f"{exc}: check OMSD_APP_KEY/OMSD_APP_TOKEN and the role's permissions")]
    except VtexError as exc:
        return [Result("VTEX reachable", False, str(exc))]
    out.append(Result("credentials", True, f"accepted by {settings.base_url}"))
    if settings.uses_feed:
        if feed is None:  # the state before the first `omsd run`, which creates it
            detail = "none at VTEX yet: omsd run creates it at start (or omsd feed config apply)"
            out.append(Result("feed configuration", True, detail, warning=True))
        else:
            missing = missing_statuses(feed.filter_type, feed.statuses)
            detail = f"{feed.filter_type}, {len(feed.statuses)} statuses"
            out.append(Result("feed configuration", not missing, f"{detail}; missing {missing}" if missing else detail))
            age = feed.oldest_age_s
            too_old = age is not None and age >= settings.queue_age_alarm
            out.append(
                Result(
                    "feed queue",
                    not too_old,
                    f"{feed.quantity} messages, oldest {0 if age is None else age:.0f}s"
                    + (f" (alarm at {settings.queue_age_alarm:.0f}s)" if too_old else ""),
                )
            )
    if settings.uses_hook:
        try:
            hook = await client.get_hook_config()
        except VtexError as exc:
            out.append(Result("hook configuration", False, str(exc)))
        else:
            if hook is None:
                detail = "none at VTEX yet: omsd run creates it at start (or omsd hook config apply)"
                out.append(Result("hook configuration", True, detail, warning=True))
            else:
                changes = hook_plan(hook, settings)
                missing = missing_statuses(hook.filter_type, hook.statuses)
                ok = not changes and not missing
                detail = f"url {hook.url}" if ok else "; ".join(changes + ([f"missing {missing}"] if missing else []))
                out.append(Result("hook configuration", ok, detail))
    return out
