"""How the command line shows things: one renderer for every command.

On a terminal a table (long values fold, never cut); in a pipe tab-separated lines with
a header and whole values (the title on stderr); `--json` is JSON lines. Rich decides
what a terminal is (TTY_COMPATIBLE=1 forces it, COLUMNS sets the width).
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any, TextIO

from rich.console import Console
from rich.table import Table

from omsd.state.batch import HistoryRow, JournalRow
from omsd.state.models import Order
from omsd.state.statuses import STUCK


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
    """A table on a terminal (long values fold, never cut); in a pipe, tab-separated lines
    with a header and whole values, and the title on stderr."""
    console = Console()
    if console.is_terminal:
        t = Table(title=title)
        for col in columns:
            t.add_column(col, overflow="fold")
        for row in rows:
            t.add_row(*row)
        console.print(t)
        return
    print(title, file=sys.stderr)
    print("\t".join(columns))
    for row in rows:
        print("\t".join(" ".join(value.split()) for value in row))


def json_line(value: Any) -> None:
    print(json.dumps(value, sort_keys=True))


def when(at: datetime | None) -> str:
    return at.isoformat(timespec="seconds") if at is not None else "-"


def order_row(o: Order) -> list[str]:
    return [
        o.order_id,
        o.marketplace_order_id or "-",
        f"{STUCK} ({o.phase.value})" if o.stuck is not None else o.phase.value,
        o.status or "-",
        "yes" if o.held_now else ("was" if o.held else ""),
        str(o.sent),
        o.last_code or "",
        o.last_error or "",
    ]


def history_view(h: HistoryRow) -> dict[str, Any]:
    return {
        "offset": h.journal_offset,
        "at": h.at.isoformat(),
        "from": h.from_phase,
        "to": h.to_phase,
        "status": h.status,
        "cause": h.cause,
    }


def journal_view(r: JournalRow) -> dict[str, Any]:
    """A journal row for --json: the payload parsed, a rejected body exactly as received."""
    payload: Any = r.payload
    if r.kind != "rejected":
        with contextlib.suppress(ValueError):
            payload = json.loads(r.payload)
    return {
        "offset": r.offset,
        "kind": r.kind,
        "version": r.version,
        "source": r.source,
        "order_id": r.order_id,
        "received_at": r.received_at.isoformat(),
        "reason": r.reason,
        "payload": payload,
    }


def journal_line(r: JournalRow) -> str:
    detail = f"{r.reason} | body: {r.payload}" if r.kind == "rejected" else r.reason or r.payload
    return f"{r.offset}\t{when(r.received_at)}\t{r.kind}\t{r.source}\t{r.order_id or '-'}\t{' '.join(detail.split())}"


def print_rows(rows: Iterable[JournalRow], as_json: bool) -> None:
    for r in rows:
        print(json.dumps(journal_view(r), sort_keys=True) if as_json else journal_line(r))
    sys.stdout.flush()


def short(value: Any) -> str:
    if value is None:
        return "-"
    if hasattr(value, "reason") and hasattr(value, "due_at"):
        return f"{value.reason}@{value.due_at.isoformat(timespec='seconds')}"
    return str(value)


class Meter:
    """Progress of long work on a terminal (count, rate, ETA) on stderr; silent in a pipe."""

    def __init__(self, what: str, total: int, stream: TextIO | None = None, every_s: float = 0.25) -> None:
        self.what, self.total, self.done, self.every_s = what, total, 0, every_s
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.start = self.shown = time.monotonic()

    def __call__(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if not self.tty or now - self.shown < self.every_s:
            return
        self.shown = now
        rate = self.done / max(now - self.start, 1e-6)
        eta = max(self.total - self.done, 0) / rate if rate else 0.0
        self.stream.write(f"\r{self.what} {self.done:,}/{self.total:,} events  {rate:,.0f}/s  ETA {eta:,.0f} s  ")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self.shown > self.start:
            self.stream.write("\n")
