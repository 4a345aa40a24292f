"""The reading commands: orders, show, journal, intents, dead, and what retry says."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from omsd.daemon.cli import main
from omsd.daemon.ops import lock
from omsd.daemon.pipeline.processor import Processor
from omsd.state.events import IntentReceived, IntentRecorded, OrderSnapshot, StatusChanged
from omsd.state.models import Policy
from omsd.state.store import NewEntry, Store
from tests.machine_helpers import HELD, order

NOW = datetime(2026, 11, 1, tzinfo=UTC)
LONG = "MKP-1436730500001-01-an-order-id-longer-than-any-table-column-would-allow"
MKT = "1436730500001"
PARKED = "7777777777"


def _entry(event: object, **kw: object) -> NewEntry:
    return NewEntry.of(event, source="test", received_at=NOW, **kw)  # type: ignore[arg-type]


async def _build(db: Path) -> None:
    async with await Store.open(db) as store:
        held = StatusChanged(order_id=LONG, source="feed", state=HELD, current_change=NOW)
        free = StatusChanged(order_id="T-1", source="feed", state="invoiced", current_change=NOW)
        dead = order("dead").model_copy(
            update={"order_id": "D-1", "marketplace_order_id": "4", "attempts": 8, "last_code": "EOI009"}
        )
        await store.journal.append(
            [
                _entry(IntentReceived(marketplace_order_id=MKT, source="api")),
                _entry(held, dedup_key="s1"),
                _entry(IntentRecorded(order_id=LONG, marketplace_order_id=MKT, source="cli")),
                _entry(free, dedup_key="s2"),
                _entry(IntentReceived(marketplace_order_id=PARKED, source="cli")),
                _entry(OrderSnapshot(order_id="D-1", order=dead.model_copy(update={"last_error": "VTEX said no"}))),
                NewEntry(kind="rejected", source="hook", payload="{bad body", reason="not JSON", received_at=NOW),
            ],
            now=NOW,
        )
        await Processor(store, Policy()).drain()


@pytest.fixture
def db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "o.db"
    monkeypatch.setenv("OMSD_DB", str(path))
    asyncio.run(_build(path))
    return path


def _out(capsys: pytest.CaptureFixture[str], *args: str, code: int = 0) -> tuple[str, str]:
    capsys.readouterr()
    assert main(list(args)) == code, args
    captured = capsys.readouterr()
    return captured.out, captured.err


def test_orders_in_a_pipe_prints_whole_ids_and_counts_every_match(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """In a pipe: tab-separated whole values; the title counts all matching orders, not the page."""
    out, err = _out(capsys, "orders", "--limit", "1")
    header, *rows = out.splitlines()
    assert header.split("\t")[:3] == ["order", "marketplace id", "phase"]
    assert len(rows) == 1
    assert "3 orders, the newest 1 shown" in err
    out, _ = _out(capsys, "orders")
    assert LONG in [line.split("\t")[0] for line in out.splitlines()]


def test_orders_title_on_a_terminal(
    db: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """On a terminal the table's title counts every matching order."""
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich: a terminal, whatever stdout is
    monkeypatch.setenv("COLUMNS", "100")
    out, _ = _out(capsys, "orders", "--phase", "dead")
    assert "1 orders in dead" in out


def test_show_json(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """show --json: the order, its transitions, and its journal with what came under its marketplace id."""
    out, _ = _out(capsys, "show", MKT, "--json")
    view = json.loads(out)
    assert view["order"]["order_id"] == LONG and view["order"]["phase"] == "waiting_release"
    assert [h["to"] for h in view["history"]][-1] == "waiting_release"
    kinds = [r["kind"] for r in view["journal"]]
    assert kinds == ["intent_received", "status_changed", "intent_recorded"]
    out, _ = _out(capsys, "show", PARKED, "--json")
    assert json.loads(out)["parked_intent"]["source"] == "cli"


def test_journal_of_one_order_with_full_payloads(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """journal --order (either id) --json: the order's rows and the intents under its marketplace id, payloads whole."""
    by_mkt, _ = _out(capsys, "journal", "--order", MKT, "--json")
    by_id, _ = _out(capsys, "journal", "--order", LONG, "--json")
    assert by_mkt == by_id
    rows = [json.loads(line) for line in by_id.splitlines()]
    assert rows[0]["order_id"] is None and rows[0]["payload"] == {
        "kind": "intent_received",
        "marketplace_order_id": MKT,
        "source": "api",
    }
    out, _ = _out(capsys, "journal", "--from-offset", "6", "--json")
    assert [json.loads(line)["offset"] for line in out.splitlines()] == [6, 7]


def test_export_of_one_order_beside_rejected_input(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """export --order reads past rejected rows whose body is not JSON (it once failed: malformed JSON)."""
    out, _ = _out(capsys, "export", "--order", MKT)
    assert [json.loads(line)["offset"] for line in out.splitlines()] == [1, 2, 3]


def test_rejected_input_shows_its_raw_body(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A rejected row shows the body as received, with the reason."""
    out, _ = _out(capsys, "journal", "--rejected", "--json")
    [row] = [json.loads(line) for line in out.splitlines()]
    assert row["payload"] == "{bad body" and row["reason"] == "not JSON"
    out, _ = _out(capsys, "journal", "--rejected")
    assert "not JSON | body: {bad body" in out


def test_journal_follows_beside_a_running_daemon(db: Path) -> None:
    """--follow prints rows written after it started, while the daemon owns the database; SIGINT exits 0."""
    env = {**os.environ, "OMSD_DB": str(db)}
    with lock.hold(db):
        proc = subprocess.Popen(
            [sys.executable, "-m", "omsd.daemon", "journal", "--follow", "--json", "--limit", "1"],
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        try:
            assert proc.stdout is not None
            assert json.loads(proc.stdout.readline())["offset"] == 7
            with contextlib.closing(sqlite3.connect(db)) as conn, conn:
                conn.execute(
                    "INSERT INTO journal (kind, source, payload, reason, received_at) "
                    "VALUES ('rejected', 'hook', 'later', 'r', '2026-11-01T00:00:00+00:00')"
                )
            assert json.loads(proc.stdout.readline())["payload"] == "later"
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


def test_intents_lists_parked_ones(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """intents: each parked intent with its marketplace id, source, since when and why."""
    out, _ = _out(capsys, "intents", "--json")
    [parked] = [json.loads(line) for line in out.splitlines()]
    assert parked["marketplace_order_id"] == PARKED and parked["source"] == "cli"
    assert parked["since"] == NOW.isoformat() and "no VTEX order linked" in parked["why"]
    out, err = _out(capsys, "intents")
    assert PARKED in out and "1 parked intents" in err


def test_dead_lists_attempts_code_and_error(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """dead: each dead order with attempts, last code, last error and the cause of its move to dead."""
    out, _ = _out(capsys, "dead", "--json")
    [dead] = [json.loads(line) for line in out.splitlines()]
    assert (dead["order_id"], dead["attempts"], dead["last_code"]) == ("D-1", 8, "EOI009")
    assert dead["last_error"] == "VTEX said no" and dead["why"]
    out, _ = _out(capsys, "dead")
    assert "D-1\t4\t" in out


def test_status_on_a_terminal_in_a_pipe_and_as_json(
    db: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """status renders like the other commands: a table on a terminal, tab-separated lines with
    a header in a pipe (the title on stderr), one JSON object with --json."""
    out, err = _out(capsys, "status")
    header, *rows = out.splitlines()
    assert header == "what\tvalue\tmeaning" and "omsd status" in err
    values = {row.split("\t")[0]: row.split("\t")[1] for row in rows}
    assert values["processor_offset"] == values["last_offset"] == "7"
    assert values["phase.dead"] == "1" and values["pending_intents"] == "1"
    status = json.loads(_out(capsys, "status", "--json")[0])
    assert status["phases"]["dead"] == 1 and status["last_offset"] == 7
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    monkeypatch.setenv("COLUMNS", "120")
    out, _ = _out(capsys, "status")
    assert "omsd status" in out and "┃" in out and "processor_offset" in out


def test_unreadable_rows_in_a_pipe_and_as_json(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """journal --unreadable: tab-separated lines in a pipe (title on stderr), JSON lines with --json."""
    asyncio.run(_unreadable(db))
    out, err = _out(capsys, "journal", "--unreadable")
    header, row = out.splitlines()
    assert header.split("\t") == ["offset", "received", "kind", "order", "error"]
    assert row.startswith("8\t") and "1 unreadable journal rows" in err
    [line] = _out(capsys, "journal", "--unreadable", "--json")[0].splitlines()
    assert json.loads(line)["offset"] == 8 and json.loads(line)["kind"] == "status_changed"


async def _unreadable(db: Path) -> None:
    async with await Store.open(db) as store:
        bad = NewEntry(kind="status_changed", source="feed", payload="{not json", received_at=NOW)
        await store.journal.append([bad], now=NOW)
        await Processor(store, Policy()).drain()


def test_retry_says_when_it_does_nothing(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """retry of an order without intent or a closed one does nothing and says so (exit 1); of a dead one, resyncs."""
    _, err = _out(capsys, "retry", "T-1", code=1)
    assert "no approval intent: nothing to retry" in err
    out, _ = _out(capsys, "retry", "--all-dead")
    assert "resync recorded for 1 order(s)" in out
    asyncio.run(_close(db))
    _, err = _out(capsys, "retry", "D-1", code=1)
    assert "approved: closed, nothing to retry" in err
    out, _ = _out(capsys, "retry", "--all-dead")
    assert "no dead orders: nothing to retry" in out


async def _close(db: Path) -> None:
    async with await Store.open(db) as store:
        await Processor(store, Policy()).drain()  # the resync: D-1 checking
        await store.journal.append([_entry(StatusChanged(order_id="D-1", source="feed", state="invoiced"))], now=NOW)
        await Processor(store, Policy()).drain()
        assert (await store.read.load_order("D-1")).phase == "approved"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "args", [["show", "nope"], ["journal", "--order", "nope"], ["retry", "nope"], ["replay", "--order", "nope"]]
)
def test_an_unknown_id_is_exit_1_with_a_message(db: Path, capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    """Every command that takes an order id says so and exits 1 for an unknown one."""
    _, err = _out(capsys, *args, code=1)
    assert "no order nope" in err


@pytest.mark.parametrize(
    "command", ["orders", "show", "journal", "intents", "dead", "retry", "prune", "status", "approve"]
)
def test_each_command_documents_its_exit_codes(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    """--help of each command states its exit codes."""
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "exit codes: 0" in capsys.readouterr().out


def test_journal_follow_into_a_closed_pipe_ends_quietly(db: Path) -> None:
    """`omsd journal --follow | head -1`: once the reader goes away the command ends, exit 0, no traceback."""
    env = {**os.environ, "OMSD_DB": str(db)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "omsd.daemon", "journal", "--follow", "--json", "--limit", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        assert json.loads(proc.stdout.readline())["offset"] == 7
        proc.stdout.close()  # the reader goes away, like `head -1`
        with contextlib.closing(sqlite3.connect(db)) as conn, conn:
            for n in range(3):
                conn.execute(
                    "INSERT INTO journal (kind, source, payload, reason, received_at) "
                    f"VALUES ('rejected', 'hook', 'later {n}', 'r', '2026-11-01T00:00:00+00:00')"
                )
        assert proc.wait(timeout=30) == 0
        err = proc.stderr.read()
        assert "Traceback" not in err and "BrokenPipe" not in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
