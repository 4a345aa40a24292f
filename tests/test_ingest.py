"""`omsd ingest` and `omsd export`: captured events into the journal, and the journal back out."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import sqlite3
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from omsd.daemon.cli import main
from omsd.daemon.tools import ingest
from omsd.sim.server import Simulator
from omsd.state.statuses import Phase
from tests.helpers import approve, reached, until

FEED = {
    "orderId": "A-1",
    "state": "waiting-for-manual-authorization",
    "currentChange": "2026-11-01T10:00:00.1234567Z",
    "handle": "h-1",
    "eventId": "e-1",
    "domain": "Marketplace",
}
HOOK = {
    "OrderId": "B-1",
    "State": "ready-for-handling",
    "LastState": "window-to-cancel",
    "CurrentChange": "2026-11-01T10:01:00Z",
    "Origin": {"Account": "shop", "Key": "vtexappkey-shop"},
}
NOTE = {"marketplaceOrderId": "M-1", "code": "EOI011", "flow": "ApproveOrder", "operationId": "op-1", "success": False}


@pytest.fixture
def db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "o.db"
    monkeypatch.setenv("OMSD_DB", str(path))
    assert main(["init"]) == 0
    return path


def _write(tmp_path: Path, lines: list[object] | str, name: str = "in.jsonl") -> str:
    path = tmp_path / name
    path.write_text(lines if isinstance(lines, str) else "\n".join(json.dumps(x) for x in lines) + "\n")
    return str(path)


def _journal(db: Path) -> list[tuple[str, str]]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return list(conn.execute('SELECT kind, source FROM journal ORDER BY "offset"'))


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, object]]:
    code = main(["ingest", *args, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_each_kind_is_detected_and_journaled_as_live_intake_would(
    db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Feed items, PascalCase hook pushes and notifications in JSON lines become the live intake's entries."""
    code, report = _run(capsys, _write(tmp_path, [FEED, HOOK, NOTE]))
    assert code == 0 and report["added"] == 3 and report["bad"] == []
    assert _journal(db) == [
        ("status_changed", "feed"),
        ("status_changed", "hook"),
        ("notification_received", "notification"),
    ]
    assert main(["orders", "--json"]) == 0
    assert {json.loads(line)["order_id"] for line in capsys.readouterr().out.splitlines()} == {"A-1", "B-1"}


def test_a_json_array_and_stdin(db: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A JSON array read from `-` (standard input) is ingested item by item."""
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps([FEED, NOTE])))
    code, report = _run(capsys, "-")
    assert code == 0 and report["added"] == 2


def test_duplicates_are_reported_not_added(db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An event already in the journal (same dedup key as live intake) is reported as a duplicate."""
    redelivered = {**FEED, "handle": "h-2"}
    code, report = _run(capsys, _write(tmp_path, [FEED, redelivered, NOTE]))
    assert code == 0 and report["added"] == 2 and report["duplicates"] == [2]
    code, report = _run(capsys, _write(tmp_path, [NOTE, FEED]))
    assert report["added"] == 0 and report["duplicates"] == [1, 2]
    assert len(_journal(db)) == 2


def test_kind_can_be_forced(db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--kind overrides detection: a hook push read as a feed item lacks the feed's handle."""
    code, report = _run(capsys, _write(tmp_path, [HOOK]), "--kind", "feed")
    assert code == 1 and report["bad"] == [{"line": 1, "reason": "missing field handle"}]
    code, report = _run(capsys, _write(tmp_path, [HOOK]), "--kind", "hook")
    assert code == 0 and report["added"] == 1


BAD = [
    FEED,
    "not json",
    {"orderId": "C-1", "state": "no-such-status", "currentChange": "2026-11-01T10:00:00Z", "handle": "h"},
    {"hello": 1},
    NOTE,
]


def test_bad_lines_are_reported_with_their_line_number(
    db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each bad line is reported with its number and reason; the good ones are appended, exit 1."""
    text = "\n".join(x if isinstance(x, str) else json.dumps(x) for x in BAD) + "\n"
    code, report = _run(capsys, _write(tmp_path, text))
    assert code == 1 and report["added"] == 2
    bad = {b["line"]: b["reason"] for b in report["bad"]}  # type: ignore[attr-defined]
    assert sorted(bad) == [2, 3, 4]
    assert bad[2].startswith("not JSON") and "unknown status" in bad[3] and "kind not recognised" in bad[4]


def test_strict_refuses_the_whole_file(db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """With --strict one bad line means nothing is appended."""
    text = "\n".join(x if isinstance(x, str) else json.dumps(x) for x in BAD) + "\n"
    code, report = _run(capsys, _write(tmp_path, text), "--strict")
    assert code == 1 and report["refused_all"] is True and report["added"] == 0
    assert _journal(db) == []


def test_dry_run_adds_nothing_and_shows_decisions(db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--dry-run reports what would be added and what the machine would decide, and changes nothing."""
    code, report = _run(capsys, _write(tmp_path, [FEED]), "--dry-run")
    assert code == 0 and report["dry_run"] is True and report["added"] == 1
    decisions = report["decisions"]
    assert any(d.startswith("A-1: new -> tracking") for d in decisions)  # type: ignore[attr-defined]
    # An order nobody asked to approve costs no VTEX call (ids are linked lazily).
    assert not any("queues effect" in d for d in decisions)  # type: ignore[attr-defined]
    assert _journal(db) == []


def test_export_reads_back_through_ingest(
    db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """export → init → ingest → replay gives the same orders; ingesting the export again adds nothing."""
    _run(capsys, _write(tmp_path, [FEED, HOOK, NOTE]))
    assert main(["approve", "M-9", "--order-id", "A-1"]) == 0
    assert main(["orders", "--json"]) == 0
    capsys.readouterr()
    assert main(["replay"]) == 0
    capsys.readouterr()
    assert main(["orders", "--json"]) == 0
    orders = sorted(capsys.readouterr().out.splitlines())
    assert main(["export"]) == 0
    exported = capsys.readouterr().out
    assert main(["export", "--order", "A-1", "--kind", "intent_recorded"]) == 0
    [only] = capsys.readouterr().out.splitlines()
    assert json.loads(only)["kind"] == "intent_recorded"
    fresh = tmp_path / "fresh.db"
    monkeypatch.setenv("OMSD_DB", str(fresh))
    assert main(["init"]) == 0
    capsys.readouterr()
    code, report = _run(capsys, _write(tmp_path, exported, "export.jsonl"))
    assert code == 0 and report["added"] == len(exported.splitlines())
    code, report = _run(capsys, _write(tmp_path, exported, "export.jsonl"))
    assert report["added"] == 0
    assert main(["replay"]) == 0
    capsys.readouterr()
    assert main(["orders", "--json"]) == 0
    assert sorted(capsys.readouterr().out.splitlines()) == orders


async def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    capsys.readouterr()
    assert await asyncio.to_thread(main, list(args)) == 0, args
    return capsys.readouterr().out


@pytest.mark.e2e
async def test_round_trip_of_a_real_run(
    sim: Simulator, run_daemon: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A real journal (duplicates, a stale event, a restart) → export → init + ingest → replay → same orders."""
    sim.faults.duplicate_rate = 1.0
    sim.visibility_override_s = 0.2
    db = tmp_path / "omsd.db"
    async with run_daemon(sim, db=db) as daemon:
        a = sim.create("RT1", held=True, decision="authorize", decide_after_s=0.3)
        r = sim.create("RT2", held=True, decision="reject", decide_after_s=0.3)
        await approve(daemon, "RT1", a.order_id)
        await approve(daemon, "RT2", r.order_id)
        await until(reached(daemon, a.order_id, Phase.APPROVED), what="approved")
        await until(reached(daemon, r.order_id, Phase.REJECTED), what="rejected")
        held_at = next(t for s, t in a.history if s == "waiting-for-manual-authorization")
        stale = {"eventId": "STALE", "state": "waiting-for-manual-authorization", "orderId": a.order_id}
        sim.queue.put({**stale, "domain": "Fulfillment", "lastChange": held_at, "currentChange": held_at})
        await until(lambda: not sim.queue.messages, what="feed drained")
    async with run_daemon(sim, db=db) as daemon:  # a restart
        await approve(daemon, "RT3")  # parked until Get order links it
        c = sim.create("RT3", held=True, decision="authorize", decide_after_s=0.3)
        await until(reached(daemon, c.order_id, Phase.APPROVED), what="approved after a restart")
        await until(lambda: not sim.queue.messages, what="feed drained")
    monkeypatch.setenv("OMSD_DB", str(db))
    orders = sorted((await _cli(capsys, "orders", "--json")).splitlines())
    assert len(orders) == 3
    export = tmp_path / "export.jsonl"
    export.write_text(await _cli(capsys, "export"))
    monkeypatch.setenv("OMSD_DB", str(tmp_path / "fresh.db"))
    await _cli(capsys, "init")
    await _cli(capsys, "ingest", str(export))
    await _cli(capsys, "replay")
    assert sorted((await _cli(capsys, "orders", "--json")).splitlines()) == orders


# ---- streaming: any size in bounded memory, still all or nothing --------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=6,
)


@settings(max_examples=300, deadline=None)
@given(st.lists(JSON_VALUES, max_size=6), st.integers(1, 9), st.data())
def test_a_json_array_is_read_item_by_item_as_json_reads_it(
    items: list[object], block: int, data: st.DataObject
) -> None:
    """Read in blocks of any size, an array gives json.loads' items; a damaged one raises NotAnArray."""
    text = json.dumps(items, separators=data.draw(st.sampled_from([(",", ":"), (", ", ": ")])))
    if data.draw(st.booleans()):  # damage it: a character changed, dropped or added
        at = data.draw(st.integers(0, len(text) - 1))
        text = text[:at] + data.draw(st.sampled_from(["", ",", "]", "[", "x", " ", "1", '"'])) + text[at + 1 :]
    try:
        expected: object = json.loads(text)
    except ValueError:
        expected = None
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ingest, "_BLOCK", block)
        try:
            got: object = [item for _, item, _ in ingest.read_items(io.StringIO(text))]
        except ingest.NotAnArray:
            got = None
    if not text.lstrip().startswith("["):
        return  # read as JSON lines instead
    assert got == (expected if isinstance(expected, list) else None)


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two input items a chunk: every behaviour crosses chunks."""
    monkeypatch.setattr(ingest, "CHUNK_ITEMS", 2)


def _feed(n: int) -> dict[str, object]:
    return {**FEED, "orderId": f"A-{n}", "eventId": f"e-{n}", "handle": f"h-{n}"}


@pytest.mark.usefixtures("small_chunks")
def test_duplicates_are_found_across_chunks(db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An item repeated chunks later, or an export's keyless row repeated, is a duplicate."""
    payload = {"kind": "intent_received", "marketplace_order_id": "M-9", "source": "api"}
    row = {"kind": "intent_received", "payload": payload, "source": "api", "received_at": "2026-11-01T10:00:00+00:00"}
    code, report = _run(capsys, _write(tmp_path, [_feed(1), _feed(2), row, _feed(3), _feed(1), row, _feed(2)]))
    assert code == 0 and report["added"] == 4 and report["duplicates"] == [5, 6, 7]


@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("damage", ["bad line", "malformed array", "unreadable text"])
def test_nothing_is_appended_when_the_input_fails_late(
    damage: str, db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--strict with a bad line, an array that breaks, text that does not decode: chunks already
    staged never reach the journal, and no scratch file is left beside the database."""
    good = [_feed(n) for n in range(1, 8)]
    if damage == "bad line":
        code, report = _run(capsys, _write(tmp_path, [*good, {"hello": 1}]), "--strict")
        assert code == 1 and report["refused_all"] is True
    elif damage == "malformed array":
        code, report = _run(capsys, _write(tmp_path, json.dumps(good)[:-20]))
        assert code == 1 and report["added"] == 0
        assert report["bad"] == [{"line": 1, "reason": ANY}]
        assert report["bad"][0]["reason"].startswith("not a JSON array: ")
    else:
        path = tmp_path / "in.jsonl"
        path.write_bytes(("\n".join(json.dumps(x) for x in good) + "\n").encode() + b"\xff\xfe\n")
        assert main(["ingest", str(path)]) == 2
        assert "cannot read" in capsys.readouterr().err
    assert _journal(db) == []
    assert [p.name for p in db.parent.iterdir() if p.name.endswith(".scratch")] == []


@pytest.mark.usefixtures("small_chunks")
def test_a_dry_run_in_chunks_changes_nothing(db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--dry-run works on a scratch copy (not in memory): the database is untouched, no file is left."""
    code, report = _run(capsys, _write(tmp_path, [_feed(n) for n in range(1, 6)]), "--dry-run")
    assert code == 0 and report["added"] == 5 and len(report["decisions"]) == 5  # type: ignore[arg-type]
    assert _journal(db) == []
    assert [p.name for p in db.parent.iterdir() if p.name.endswith(".scratch")] == []
