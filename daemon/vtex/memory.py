"""What omsd learned of VTEX, kept across restarts: the VTEX client's adapted rate (the rate
where the last limit showed, the recent answers that count as evidence of one, and since when
the rate held and how much of it the calls used: the evidence a climb needs), the Retry-After
windows still open, and when VTEX last confirmed the feed and hook configurations.

Without it every start began at `OMSD_RATE_LIMIT_PER_S` again: on an account whose limit is
lower, each restart bought a burst of 429s and their pauses, and a restart that came while
a Retry-After window was open sent into it; every start read both configurations again.
Without the evidence of use, every start began a quiet period of its own: restarts seconds
apart (20 SIGKILLs in 64 s, the restarts benchmark) kept a rate cut to 12/s on an account that
admits 15/s for the whole minute. The records are written (`vtex_learned`, one transaction) at
most once per `SAVE_EVERY_S` while something changes (every answer is evidence: about once a
second while calls go out), and once more at a clean stop; a SIGKILL loses at most that
second. A record that cannot be read is ignored (and said so): it only costs re-learning.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from omsd.state.store import Store, StoreError, from_iso, iso

from ..ops.logs import get_logger
from ..ops.waiting import wait_any
from .client import Learned, VtexClient
from .configuration import VtexSetup

log = get_logger("omsd.vtexmemory")

SAVE_EVERY_S = 1.0
RATE = "rate"
CONFIGURATION = "configuration"


def _utcnow() -> datetime:
    return datetime.now(UTC)


class VtexMemory:
    def __init__(
        self, store: Store, client: VtexClient, setup: VtexSetup, *, clock: Callable[[], datetime] = _utcnow
    ) -> None:
        self._store = store
        self._client = client
        self._setup = setup
        self._clock = clock
        self._changed = asyncio.Event()
        client.on_learned = self._changed.set
        setup.on_checked = self._changed.set

    async def restore(self) -> None:
        """Hand the client and the set-up what the last run kept."""
        now = self._clock()
        rate = _record(await self._store.learned.get(RATE), RATE)
        if rate is not None and (learned := _learned(rate, now)) is not None:
            self._client.restore(learned)
            log.debug("vtex_rate_restored", rate_per_s=learned.rate, limit_rate_per_s=learned.limit_rate)
        checked = _record(await self._store.learned.get(CONFIGURATION), CONFIGURATION)
        if checked is not None:
            self._setup.restore_checked(
                {k: at for k, v in checked.items() if isinstance(v, str) and (at := _time(v)) is not None}
            )
        self._changed.clear()

    async def save(self) -> None:
        now = self._clock()
        learned = self._client.learned()
        rate: dict[str, Any] = {
            "rate": learned.rate,
            "limit_rate": learned.limit_rate,
            "pauses": {scope: iso(now + timedelta(seconds=left)) for scope, left in learned.pauses_s.items()},
            "recent": learned.recent,
        }
        if learned.evidence is not None:
            quiet_for, ages = learned.evidence
            rate["evidence"] = {"saved": iso(now), "changed": iso(now - timedelta(seconds=quiet_for))}
            rate["evidence"]["answers"] = sorted(Counter(round(age, 1) for age in ages).items())
        checked = {kind: iso(at) for kind, at in self._setup.checked().items()}
        await self._store.learned.put({RATE: json.dumps(rate), CONFIGURATION: json.dumps(checked)}, now=now)

    async def run(self, stop: asyncio.Event) -> None:
        """Save what changed, at most once per `SAVE_EVERY_S`, and once more when stopped."""
        try:
            while not stop.is_set():
                await wait_any(self._changed, stop, within_s=3600.0)
                if self._changed.is_set():
                    self._changed.clear()
                    await self.save()
                await wait_any(stop, within_s=SAVE_EVERY_S)
        finally:
            if self._changed.is_set():
                try:
                    await asyncio.shield(self.save())
                except StoreError as exc:
                    log.warning("vtex_memory_not_saved", error=str(exc))


def _record(text: str | None, name: str) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        log.warning("vtex_memory_unreadable", record=name)
        return None
    return value


def _time(text: str) -> datetime | None:
    try:
        at = from_iso(text)
    except (TypeError, ValueError):
        return None
    return at if at.tzinfo is not None else None


def _positive(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
        return float(value)
    return None


def _learned(record: dict[str, Any], now: datetime) -> Learned | None:
    rate = _positive(record.get("rate"))
    if rate is None:
        log.warning("vtex_memory_unreadable", record=RATE)
        return None
    pauses: dict[str, float] = {}
    raw = record.get("pauses")
    for scope, until in raw.items() if isinstance(raw, dict) else ():
        if isinstance(scope, str) and isinstance(until, str) and (end := _time(until)) is not None and end > now:
            pauses[scope] = (end - now).total_seconds()
    recent = record.get("recent")
    recent = recent if isinstance(recent, str) else ""
    return Learned(rate, _positive(record.get("limit_rate")), pauses, recent, _evidence(record.get("evidence"), now))


def _evidence(raw: object, now: datetime) -> tuple[float, tuple[float, ...]] | None:
    """Seconds since the rate last changed and since each answer counted as use, from `now`: the
    ages saved plus the time since they were (the process was down meanwhile). None when there
    is nothing readable (an older omsd wrote the record): the quiet period starts at the restart."""
    if not isinstance(raw, dict):
        return None
    saved, changed, answers = raw.get("saved"), raw.get("changed"), raw.get("answers")
    saved_at = _time(saved) if isinstance(saved, str) else None
    changed_at = _time(changed) if isinstance(changed, str) else None
    if saved_at is None or changed_at is None or not isinstance(answers, list):
        return None
    down = max(0.0, (now - saved_at).total_seconds())
    ages: list[float] = []
    for pair in answers:
        if isinstance(pair, list) and len(pair) == 2 and isinstance(pair[1], int):
            age = pair[0]
            if isinstance(age, int | float) and not isinstance(age, bool) and math.isfinite(age):
                ages += [age + down] * min(pair[1], 10_000)
    return max(0.0, (now - changed_at).total_seconds()), tuple(ages)
