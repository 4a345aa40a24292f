"""Bad command-line input gets one line naming the problem and exit 1 or 2, never a traceback,
and reading it is bounded."""

from __future__ import annotations

from pathlib import Path

import pytest

from omsd.daemon.cli import main
from omsd.daemon.tools import ingest


@pytest.fixture
def db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "omsd.db"
    monkeypatch.setenv("OMSD_DB", str(path))
    assert main(["init"]) == 0
    return path


def usage_error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """`omsd ARGS` is refused as a usage error (exit 2); its stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(args)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize(
    "args",
    [
        ["journal", "--from-offset", "9" * 30],
        ["journal", "--from-offset", "-1"],
        ["journal", "--limit", "9" * 30],
        ["orders", "--limit", "0"],
        ["export", "--from-offset", "9" * 30],
        ["replay", "--to-offset", "9" * 30, "--dry-run"],
        ["prune", "--older-than", "99999999999"],
        ["prune", "--older-than", "x"],
        ["export", "--kind", "bogus"],
        ["events", "--after", "9" * 20],
        ["events", "--after", "-1"],
        ["events", "--limit", "0"],
        ["relay", "replay", "--from", "9" * 20],
        ["relay", "replay", "--from", "0"],
    ],
)
def test_numbers_and_kinds_out_of_range_are_usage_errors(
    db: Path, capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    """Offsets past SQLite's integers, ages past the calendar, unknown kinds: refused by the
    parser with the argument named (no OverflowError, no silent empty export)."""
    err = usage_error(args, capsys)
    assert f"argument {next(a for a in args if a.startswith('--'))}" in err


def test_ingest_stops_reading_at_its_limit(
    db: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`omsd ingest /dev/zero` (an input that never ends, and no line ends in it) stops at the
    limit of one line: exit 2, one line, nothing appended. (Ingest streams: a long input of
    short lines has no limit.)"""
    monkeypatch.setattr(ingest, "MAX_ITEM", 2**20)
    assert main(["ingest", "/dev/zero"]) == 2
    err = capsys.readouterr().err
    assert "larger than 1 MiB" in err and err.count("\n") == 1


@pytest.mark.parametrize("text", ["[" * 100_000, '{"a":' * 100_000, "[" + "[" * 70 + "]" * 70 + "]"])
def test_ingest_of_deep_nesting_is_a_bad_line(
    db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str
) -> None:
    """100,000 nested `[` (or objects) is a refused line with the reason, not a RecursionError."""
    path = tmp_path / "deep.json"
    path.write_text(text)
    assert main(["ingest", str(path)]) == 1
    err = capsys.readouterr().err
    assert "nests deeper than" in err and "Traceback" not in err
