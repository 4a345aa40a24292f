"""The mark of a process reading the feed: left behind by one that died reading, not by one that
stopped cleanly (daemon/intake/reads.py)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from omsd.daemon.intake.reads import MARK, FeedReads
from omsd.state.store import Store

NOW = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


async def test_a_first_start_and_a_start_after_a_clean_stop_find_no_mark(tmp_path: Path) -> None:
    """Nothing marked yet, or a process that cleared its mark when it stopped: nothing to re-check."""
    async with await Store.open(tmp_path / "db") as store:
        first = FeedReads(store, clock=lambda: NOW)
        assert await first.begin() is None
        await first.end()
        assert await FeedReads(store, clock=lambda: NOW).begin() is None


async def test_a_start_after_a_process_died_reading_finds_its_mark(tmp_path: Path) -> None:
    """A process that began reading and never cleared its mark (SIGKILL): the next start is told
    when those reads began; it marks the feed as its own and a start after it finds the new mark."""
    async with await Store.open(tmp_path / "db") as store:
        await FeedReads(store, clock=lambda: NOW).begin()  # and then the process died
        later = NOW.replace(minute=5)
        assert await FeedReads(store, clock=lambda: later).begin() == NOW
        assert await FeedReads(store, clock=lambda: later).begin() == later


async def test_a_loop_started_again_in_the_same_process_does_not_find_its_own_mark(tmp_path: Path) -> None:
    """The poller started again after the database refused a write (same process): its own mark
    is no sign of lost reads."""
    async with await Store.open(tmp_path / "db") as store:
        reads = FeedReads(store, clock=lambda: NOW)
        assert await reads.begin() is None
        assert await reads.begin() is None


async def test_an_unreadable_mark_counts_as_reads_lost(tmp_path: Path) -> None:
    """A record that cannot be read is taken as a mark: a re-check costs a few Get orders, a
    release left hidden costs minutes."""
    async with await Store.open(tmp_path / "db") as store:
        await store.learned.put({MARK: "{not json"}, now=NOW)
        assert await FeedReads(store, clock=lambda: NOW).begin() is not None
