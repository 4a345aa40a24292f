"""JSON from outside, read safely: UTF-8 only, nested at most MAX_DEPTH deep (checked before
parsing), no NaN or Infinity, no lone surrogates; and text that can always be stored."""

from __future__ import annotations

import json
import re
from typing import Any

MAX_DEPTH = 64
"""The deepest nesting of arrays and objects a request body may have (VTEX's are 2 deep)."""


_JSON_TOKENS = re.compile(r'"[^"\\]*+(?:\\.[^"\\]*+)*+(?:"|\\?\Z)|[\[\]{}]', re.DOTALL)
"""A JSON string or a bracket. An unterminated string runs to the end of the text and the
quantifiers are possessive: a match never fails after a scan, so the search stays linear."""


class BadJson(ValueError):
    """A request body that is not UTF-8 JSON omsd can store; the message is the reason."""


def parse_json(data: bytes) -> Any:
    """A request body as JSON: UTF-8 whatever the declared charset (RFC 8259), nested at
    most MAX_DEPTH deep (checked before parsing, so the parser cannot recurse too deep),
    without NaN/Infinity, and without lone surrogates (I-JSON, RFC 7493: they are not text)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadJson(f"body is not UTF-8 (byte {exc.start})") from None
    if deeper_than(text, MAX_DEPTH):
        raise BadJson(f"body nests deeper than {MAX_DEPTH}")
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        raise BadJson("body is not JSON") from None
    if not _all_text(value):
        raise BadJson("body holds a lone surrogate (\\ud800-\\udfff), which is not text")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def deeper_than(text: str, limit: int) -> bool:
    depth = 0
    for match in _JSON_TOKENS.finditer(text):
        token = match.group()
        if token in ("[", "{"):
            depth += 1
            if depth > limit:
                return True
        elif token in ("]", "}"):
            depth -= 1
    return False


def _all_text(value: Any) -> bool:
    """True when every string (keys included) of a parsed JSON value is valid UTF-8."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if not storable(item):
                return False
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


def safe_text(text: str) -> str:
    """`text` with anything UTF-8 cannot hold (lone surrogates) written as `\\u` escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def storable(text: str) -> bool:
    """True when `text` can be written as UTF-8 (JSON, SQLite, logs)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
