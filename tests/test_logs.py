"""Log lines: libraries' records become omsd's lines, without tracebacks, rate-limited; what is
info and what is debug; the priority journald reads."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest
from structlog.testing import capture_logs

from omsd.daemon.ops import logs
from omsd.daemon.ops.notify import Summary
from omsd.daemon.pipeline.processor import is_milestone
from omsd.sim.server import Simulator
from omsd.state.batch import Transition
from omsd.state.statuses import Phase
from omsd.state.store import Store
from tests.api_helpers import start
from tests.helpers import FakeClock, RunDaemon, approve, phase_of, reached, until


def _lines(buf: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in buf.getvalue().splitlines() if line.strip()]


def test_a_library_exception_is_one_line_without_traceback_and_repeats_are_held_back() -> None:
    """aiohttp's "Unhandled exception" with a traceback, 50 times: one JSON line with the
    error's type, no traceback; the held-back count rides on the next line after the interval."""
    buf = io.StringIO()
    logs.configure("info", "json", stream=buf)
    clock = [0.0]
    bridge = next(h for h in logging.getLogger().handlers if isinstance(h, logs._LibraryLogBridge))
    bridge._clock = lambda: clock[0]
    server = logging.getLogger("aiohttp.server")
    for _ in range(50):
        try:
            raise ValueError("Can not decode content-encoding: gzip")
        except ValueError:
            server.exception("Unhandled exception")
    lines = _lines(buf)
    assert "Traceback" not in buf.getvalue()
    [line] = [x for x in _lines(buf) if x.get("logger") == "aiohttp.server"]
    assert line["event"] == "library_log" and "content-encoding" in str(line["error"])
    assert len(lines) == 1
    assert lines[0]["event"] == "library_log" and lines[0]["logger"] == "aiohttp.server"
    assert lines[0]["error"] == "ValueError: Can not decode content-encoding: gzip"
    clock[0] += 61
    server.error("Unhandled exception")
    assert _lines(buf)[-1]["repeated"] == 49


async def test_a_body_that_is_not_gzip_leaves_no_traceback(tmp_path: Path) -> None:
    """A request to the hook without its secret whose body claims gzip and is not: aiohttp
    fails on the unread body after the handler answered, and logs it as one line with the
    error, no traceback (the default handler would print the whole traceback)."""
    buf = io.StringIO()
    logs.configure("info", "json", stream=buf)
    async with await Store.open(tmp_path / "l.db") as store:
        client = (await start(store)).client
        try:
            with contextlib.suppress(aiohttp.ServerDisconnectedError):  # the server may close it
                resp = await client.post(
                    "/vtex/hook",
                    data=b"z" * 300,
                    headers={"Content-Encoding": "gzip", "Content-Type": "application/json", "Connection": "close"},
                )
                assert resp.status in (400, 401)
            assert (await client.get("/healthz")).status == 200
        finally:
            await client.close()
    assert "Traceback" not in buf.getvalue()
    [line] = [x for x in _lines(buf) if x.get("logger") == "aiohttp.server"]
    assert line["event"] == "library_log" and "content-encoding" in str(line["error"])


def test_libraries_log_at_warning_unless_debug_is_asked() -> None:
    """APScheduler's per-run info lines ("Running job ...") are not written at info; its
    warnings are; OMSD_LOG_LEVEL=debug asks for the library's info lines too."""
    buf = io.StringIO()
    executor = logging.getLogger("apscheduler.executors.default")
    logs.configure("info", "json", stream=buf)
    executor.info('Running job "ParkedIntents.run_once (trigger: interval[0:00:02], next run at: ...)"')
    executor.warning("Run time of job was missed by 0:00:03")
    assert [(x["level"], x["logger"]) for x in _lines(buf)] == [("warning", "apscheduler.executors.default")]
    logs.configure("debug", "json", stream=buf)
    executor.info('Running job "status"')
    assert _lines(buf)[-1]["message"] == 'Running job "status"'


def _journal_lines(path: Path) -> list[tuple[str, dict[str, object]]]:
    out = []
    for line in path.read_text().splitlines():
        prefix, _, rest = line.partition(">")
        out.append((prefix + ">", json.loads(rest)))
    return out


def test_on_the_journal_stream_each_line_carries_its_priority(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When stdout is the journal stream systemd names in $JOURNAL_STREAM, each JSON line
    starts with its syslog priority `<N>` (journald files the line at that priority)."""
    path = tmp_path / "stdout"
    with path.open("w") as stream:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        logs.configure("debug", "json", stream=stream)
        log = logs.get_logger("omsd.test")
        log.debug("a")
        log.info("b")
        log.warning("c")
        log.error("d")
        log.critical("e")
        logging.getLogger("aiohttp.server").error("f")
    lines = _journal_lines(path)
    assert [(prefix, line["event"]) for prefix, line in lines] == [
        ("<7>", "a"),
        ("<6>", "b"),
        ("<4>", "c"),
        ("<3>", "d"),
        ("<2>", "e"),
        ("<3>", "library_log"),
    ]


@pytest.mark.parametrize("journal", ["other", "malformed", "unset"])
def test_elsewhere_lines_are_plain_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, journal: str) -> None:
    """A container's stdout, a file, or a stream that is not the journal's: no prefix, every
    line is JSON with its level."""
    path = tmp_path / "stdout"
    with path.open("w") as stream:
        st = os.fstat(stream.fileno())
        value = {"other": f"{st.st_dev}:{st.st_ino + 1}", "malformed": "x:y", "unset": None}[journal]
        if value is None:
            monkeypatch.delenv("JOURNAL_STREAM", raising=False)
        else:
            monkeypatch.setenv("JOURNAL_STREAM", value)
        logs.configure("info", "json", stream=stream)
        logs.get_logger("omsd.test").warning("c")
    [line] = path.read_text().splitlines()
    assert json.loads(line)["level"] == "warning"


def _transition(from_phase: str | None, to_phase: str, intent: bool = True) -> Transition:
    at = datetime(2026, 1, 1, tzinfo=UTC) if intent else None
    return Transition("V-1-01", 7, from_phase, to_phase, "handling", "cause", intent_at=at)


@pytest.mark.parametrize(
    ("transition", "milestone"),
    [
        (_transition(None, "tracking", intent=False), False),
        (_transition("tracking", "tracking", intent=False), False),
        (_transition(None, "waiting_release"), True),
        (_transition("tracking", "checking"), True),
        (_transition("waiting_release", "checking"), False),
        (_transition("checking", "sending"), False),
        (_transition("sending", "awaiting_result"), False),
        (_transition("awaiting_result", "approved"), True),
        (_transition("waiting_release", "rejected"), True),
        (_transition("dead", "checking"), True),
        (_transition("waiting_release", "waiting_release"), False),
    ],
    ids=lambda v: f"{v.from_phase}->{v.to_phase}" if isinstance(v, Transition) else str(v),
)
def test_which_transitions_are_an_operators_news(transition: Transition, milestone: bool) -> None:
    """At info: an intent (leaving tracking), the outcome of an order with an intent, a retry
    out of dead; every other phase or status change is debug."""
    assert is_milestone(transition) is milestone


async def test_an_orders_life_at_info_is_its_intent_approval_and_outcome(sim: Simulator, run_daemon: RunDaemon) -> None:
    """Orders nobody asked to approve write nothing at info; an approved one writes its
    intent, the approval's answer and the outcome; a rejected one its intent and outcome;
    the scheduler's runs write nothing."""
    logs.configure("info", "json")
    with capture_logs() as logged:
        async with run_daemon(sim, link_interval_s=0.05) as daemon:
            quiet = [sim.create(f"Q{i}") for i in range(3)]
            free = sim.create("A1")
            held = sim.create("R1", held=True, decision="reject", decide_after_s=0.3)
            await until(lambda: all(o.status for o in [*quiet, free, held]))
            await approve(daemon, "A1", free.order_id)
            await approve(daemon, "R1", held.order_id)
            await until(reached(daemon, free.order_id, Phase.APPROVED))
            await until(reached(daemon, held.order_id, Phase.REJECTED))

            async def all_seen() -> bool:
                return all([await phase_of(daemon, o.order_id) for o in quiet])

            await until(all_seen, what="the quiet orders applied")
    info = [e for e in logged if e["log_level"] == "info"]
    assert not [e for e in info if e.get("order_id") in {o.order_id for o in quiet}]
    assert not [e for e in info if e["event"] == "library_log"]

    def life(order_id: str) -> list[tuple[str, str | None]]:
        return [(e["event"], e.get("to_phase")) for e in info if e.get("order_id") == order_id]

    approved = life(free.order_id)
    assert approved[0][0] == "order_transition" and approved[0][1] != "tracking"
    assert approved[-1] == ("order_transition", "approved")
    assert ("approval_answered", None) in approved and len(approved) == 3
    rejected = life(held.order_id)
    assert rejected[0][0] == "order_transition" and rejected[-1] == ("order_transition", "rejected")
    assert len(rejected) == 2


def test_the_summary_is_logged_at_most_once_per_interval() -> None:
    """The status job asks every 10 s; `omsd_summary` reaches the log once per interval,
    with the open approvals, the phases, the offset and the alarms."""
    clock = FakeClock()
    summary = Summary(every_s=300, clock=clock)
    counts = {"tracking": 4, "waiting_release": 2, "dead": 0}
    logs.configure("info", "json")
    with capture_logs() as logged:
        for _ in range(30):
            clock.now += 10
            summary.report(counts, 17, {"feed_queue_age": "old"})
        clock.now += 10
        summary.report(counts, 18, {})
    assert [(e["event"], e["log_level"]) for e in logged] == [("omsd_summary", "info")]
    [line] = logged
    assert line["approvals_open"] == 2 and line["phases"] == {"tracking": 4, "waiting_release": 2}
    assert line["offset"] == 17 and line["alarms"] == ["feed_queue_age"]
