"""Logging: one stable snake_case event name plus fields, on stdout.

JSON lines when stdout is not a TTY (journald, containers), readable lines on a
TTY. Secrets registered with `redact()` are scrubbed from every field as a last
line of defence; the code never logs them on purpose.

Each line carries its level: in the JSON (`"level"`), and, when stdout is the journal
stream systemd gave the service (`$JOURNAL_STREAM` names its device and inode), also as
a `<N>` syslog-priority prefix that journald strips and stores as the line's PRIORITY
(`journalctl -p warning`). A container's stdout gets no prefix, so its lines stay JSON.

Libraries (APScheduler, aiohttp) log at warning and above; `OMSD_LOG_LEVEL=debug`
asks for their info lines too.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import time
from collections.abc import Callable, MutableMapping
from typing import Any, TextIO

import structlog

from ..config.settings import journal_stream

LIBRARY_LEVEL = logging.WARNING
_SECRETS: set[str] = set()
_MASK = "***"


_PREFIX = 8  # secrets this long or longer are found by their first characters (see _scrub)
_BY_PREFIX: dict[str, list[str]] = {}
_SHORT: set[str] = set()


def redact(*values: str | None) -> None:
    """Never let these strings reach a log line."""
    for value in values:
        if value and len(value) >= 4 and value not in _SECRETS:
            _SECRETS.add(value)
            if len(value) >= _PREFIX:
                _BY_PREFIX.setdefault(value[:_PREFIX], []).append(value)
            else:
                _SHORT.add(value)


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return _scrub_text(value)
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_scrub(v) for v in value)
    return value


def _scrub_text(value: str) -> str:
    """Every registered secret in `value` masked. A fleet registers thousands (each account's
    credentials): the long ones are looked up by the text's substrings of their prefix length,
    so the cost grows with the text, not with the number of secrets."""
    found = [s for s in _SHORT if s in value]
    if len(value) >= _PREFIX and _BY_PREFIX:
        for i in range(len(value) - _PREFIX + 1):
            candidates = _BY_PREFIX.get(value[i : i + _PREFIX])
            if candidates:
                found.extend(s for s in candidates if value.startswith(s, i))
    for secret in sorted(set(found), key=len, reverse=True):
        value = value.replace(secret, _MASK)
    return value


def _scrub_processor(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    if not _SECRETS:
        return event_dict
    return {k: _scrub(v) for k, v in event_dict.items()}


# syslog priorities (RFC 5424) by structlog's level names
PRIORITY = {"critical": 2, "exception": 3, "error": 3, "warning": 4, "warn": 4, "info": 6, "debug": 7}


class _JournalPriority:
    """Prefix each rendered line with `<N>`, its syslog priority: journald (SyslogLevelPrefix=,
    on by default) takes it off and files the line at that priority."""

    def __init__(self, render: Callable[..., str]) -> None:
        self._render = render

    def __call__(self, logger: Any, name: str, event_dict: MutableMapping[str, Any]) -> str:
        priority = PRIORITY.get(str(event_dict.get("level", name)), 6)
        return f"<{priority}>{self._render(logger, name, event_dict)}"


def is_journal(stream: TextIO) -> bool:
    """True when `stream` is the journal stream systemd connected this process to."""
    expected = journal_stream()
    if expected is None:
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):
        return False
    return (st.st_dev, st.st_ino) == expected


def configure(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    stream = stream or sys.stdout
    as_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    renderer: Any = structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer(colors=False)
    if is_journal(stream):
        renderer = _JournalPriority(renderer)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _scrub_processor,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    _bridge_stdlib(level)


class _LibraryLogBridge(logging.Handler):
    """Libraries' standard-library log records (aiohttp's server, APScheduler) as omsd's
    own lines: one `library_log` line each, the exception as a short `error` field and
    never a traceback, and a repeating record (same logger and message) at most once per
    `every_s`, with the count of those held back. aiohttp logs "Unhandled exception"
    with a traceback for some malformed requests (a body that claims gzip and is not);
    a stranger must not be able to fill the log that way."""

    def __init__(self, every_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._every_s = every_s
        self._clock = clock
        self._last: dict[tuple[str, str], float] = {}
        self._held: dict[tuple[str, str], int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()[:300]
            key = (record.name, message)
            now = self._clock()
            last = self._last.get(key)
            if last is not None and now - last < self._every_s:
                self._held[key] = self._held.get(key, 0) + 1
                return
            if len(self._last) > 1000:  # bounded whatever the messages
                self._last.clear()
                self._held.clear()
            self._last[key] = now
            fields: dict[str, Any] = {"logger": record.name, "message": message}
            if held := self._held.pop(key, 0):
                fields["repeated"] = held
            if record.exc_info and record.exc_info[1] is not None:
                exc = record.exc_info[1]
                fields["error"] = f"{type(exc).__name__}: {exc}"[:300]
            structlog.get_logger("omsd.library").log(record.levelno, "library_log", **fields)
        except Exception:  # a log line must never break the caller
            self.handleError(record)


def _bridge_stdlib(level: str) -> None:
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _LibraryLogBridge)]:
        root.removeHandler(handler)
    root.addHandler(_LibraryLogBridge())
    # Libraries at warning (APScheduler's "Running job ..." twice per run was nearly all of an
    # idle omsd's log); at debug, their info lines too.
    root.setLevel(
        logging.INFO if level == "debug" else max(logging.getLevelNamesMapping()[level.upper()], LIBRARY_LEVEL)
    )


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
