"""`omsd restore [--to TIME] [--dry-run]`: the replica's database, as it is now or as it
was at TIME, brought back to OMSD_DB (or --output), checked before it replaces anything.

The replica is restored into a temporary file beside the target. Then two checks:
SQLite's `PRAGMA integrity_check`, and a replay check: the orders rebuilt from the
restored journal (up to the processor's offset) must be the orders the file holds, as
`omsd replay --dry-run` would show. Only a copy that passes both replaces the target; the
database it replaces is kept beside it (`NAME.before-restore-TIME`, with its -wal and
-shm), and Litestream's state of it is removed (it described the old file). With
--dry-run the copy is checked and removed: nothing else changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from omsd.state.models import Policy
from omsd.state.store import Store, StoreError

from ..config.settings import ReplicaSettings
from ..ops.litestream import Layout, ReplicaError, find_binary, restore
from ..ops.replica import journal_position
from . import replay

SHOWN_DIFFERENCES = 5


class RestoreRefused(Exception):
    """Nothing was restored or replaced; the message says why (a usage problem)."""


class RestoreFailed(Exception):
    """The replica could not be restored, or the restored copy failed a check."""


@dataclass
class RestoreReport:
    replica: str
    target: str
    to: str | None
    dry_run: bool
    txid: int = 0
    bytes: int = 0
    seconds: float = 0.0
    integrity: str = ""
    last_offset: int | None = None
    last_event_at: str | None = None
    replay: dict[str, Any] = field(default_factory=dict)
    replaced: str | None = None  # where the database it replaced went

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def ok(self) -> bool:
        return self.integrity == "ok" and not self.replay.get("differences")


async def restore_replica(
    settings: ReplicaSettings,
    policy: Policy,
    *,
    to: datetime | None = None,
    dry_run: bool = False,
    output: Path | None = None,
    force: bool = False,
) -> RestoreReport:
    """Restore, check, and (unless `dry_run`) put the copy in place of the target."""
    if settings.replica is None:
        raise RestoreRefused("OMSD_REPLICA is not set: there is no replica to restore from")
    target = (output or settings.db).absolute()
    if not dry_run and target.exists() and not force:
        raise RestoreRefused(f"{target} exists: pass --force to replace it (it is kept beside, renamed)")
    if not target.parent.is_dir():
        raise RestoreRefused(f"the folder {target.parent} does not exist")
    try:
        binary = find_binary(settings.litestream_bin)
    except ReplicaError as exc:
        raise RestoreRefused(str(exc)) from None
    layout = Layout.of(settings.db)
    await asyncio.to_thread(layout.write_config, settings.replica)
    report = RestoreReport(settings.replica_display, str(target), to.isoformat() if to else None, dry_run)
    tmp = target.with_name(f".{target.name}.restoring-{os.getpid()}")
    began = asyncio.get_running_loop().time()
    try:
        try:
            restored = await restore(binary, layout, tmp, timestamp=to)
        except ReplicaError as exc:
            raise RestoreFailed(str(exc)) from None
        assert restored is not None  # without -if-replica-exists an empty replica is an error
        os.chmod(tmp, 0o600)
        report.txid, report.bytes = restored.txid, tmp.stat().st_size
        report.seconds = round(asyncio.get_running_loop().time() - began, 3)
        await _check(tmp, policy, report)
        if not report.ok or dry_run:
            return report
        report.replaced = _replace(tmp, target, layout if target == settings.db.absolute() else None)
        return report
    finally:
        for leftover in (tmp, tmp.with_name(tmp.name + "-wal"), tmp.with_name(tmp.name + "-shm")):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()


async def _check(path: Path, policy: Policy, report: RestoreReport) -> None:
    """The integrity check and the replay check, written into `report`."""
    try:
        async with await Store.open(path) as store:  # a copy from an older omsd is migrated, as a start would
            problems = await store.db.integrity()
            report.integrity = "ok" if problems == ["ok"] else "; ".join(problems[:5])
            if report.integrity != "ok":
                return
            cursor = await store.read.processor_offset()
            result = await replay.plan(store, policy, to_offset=cursor)
            try:
                shown: list[dict[str, object]] = []
                async for page in result.shown():
                    shown += [o.view() for o in page if o.differences()][: SHOWN_DIFFERENCES - len(shown)]
            finally:
                await result.close()
    except StoreError as exc:
        report.integrity = f"cannot read the restored database: {exc}"
        return
    report.replay = {
        "orders": result.orders,
        "to_offset": cursor,
        "differences": shown,
        "differing_orders": result.changed,
    }
    position = await journal_position(path)
    last, at = position.get("last_offset"), position.get("last_event_at")
    report.last_offset = int(last) if isinstance(last, int) else None
    report.last_event_at = str(at) if at else None


def _replace(tmp: Path, target: Path, layout: Layout | None) -> str | None:
    """The restored copy in place of `target`; the old file and its -wal/-shm kept beside,
    renamed; Litestream's state of the old file removed."""
    kept: str | None = None
    if target.exists():
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        kept = str(target.with_name(f"{target.name}.before-restore-{stamp}"))
        for suffix in ("", "-wal", "-shm"):
            old = target.with_name(target.name + suffix)
            if old.exists():
                old.replace(kept + suffix)
    if layout is not None:
        shutil.rmtree(layout.meta, ignore_errors=True)
    os.replace(tmp, target)
    return kept


def parse_time(value: str) -> datetime:
    """--to: ISO 8601, e.g. 2026-12-06T08:30:00Z; without a zone, UTC."""
    try:
        when = datetime.fromisoformat(value.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise RestoreRefused(f"--to {value!r}: not a time (ISO 8601, e.g. 2026-12-06T08:30:00Z)") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)
