"""Log lines: libraries' records become omsd's lines, without tracebacks, rate-limited."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path

import aiohttp

from omsd.daemon.ops import logs
from omsd.state.store import Store
from tests.api_helpers import start


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
