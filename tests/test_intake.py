"""Turning feed items and hook pushes into journal entries: accepted, or rejected with a reason."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from omsd.daemon.intake.entries import feed_item, hook_item
from omsd.daemon.intake.wire import is_ping
from omsd.daemon.vtex.times import BadTime, _six_digit_fraction, parse_time

NOW = datetime(2026, 11, 1, tzinfo=UTC)
GOOD = {
    "eventId": "ED423DDED4C1AE580CADAC1A4D02DA3F",
    "handle": "h-1",
    "domain": "Fulfillment",
    "state": "ready-for-handling",
    "lastState": "window-to-cancel",
    "orderId": "953712004126-01",
    "lastChange": "2019-08-12T20:54:01.134057Z",
    "currentChange": "2019-08-12T20:54:23.7153839Z",
}


def test_vtex_example_item_is_accepted() -> None:
    """The example item from VTEX's reference becomes a StatusChanged entry with its handle."""
    intake = feed_item(GOOD, NOW)
    assert intake.accepted and intake.handle == "h-1"
    payload = json.loads(intake.entry.payload)
    assert payload["state"] == "ready-for-handling"
    assert payload["current_change"].startswith("2019-08-12T20:54:23.715383")
    assert intake.entry.event_id == "feed:ED423DDED4C1AE580CADAC1A4D02DA3F"


def test_field_names_are_case_insensitive() -> None:
    """PascalCase or lower-case keys read the same (VTEX's boilerplate parses leniently)."""
    item = {k[0].upper() + k[1:]: v for k, v in GOOD.items()}
    intake = feed_item(item, NOW)
    assert intake.accepted
    assert intake.entry.dedup_key == feed_item(GOOD, NOW).entry.dedup_key


def test_unknown_extra_fields_are_ignored() -> None:
    """AvailableDate (seen in VTEX's boilerplate, not in the schema) does not hurt."""
    assert feed_item({**GOOD, "AvailableDate": "2019-08-12T20:54:23Z"}, NOW).accepted


BAD: list[tuple[str, Any, str]] = [
    ("missing orderId", {k: v for k, v in GOOD.items() if k != "orderId"}, "missing field orderId"),
    ("missing state", {**GOOD, "state": ""}, "missing field state"),
    ("unknown status", {**GOOD, "state": "teleported"}, "unknown status"),
    ("bad timestamp", {**GOOD, "currentChange": "12/08/2019"}, "currentChange"),
    ("impossible date", {**GOOD, "currentChange": "2019-13-45T99:00:00Z"}, "currentChange"),
    ("wrong type", {**GOOD, "orderId": 953712004126}, "orderId must be a string"),
    ("not an object", ["a", "list"], "must be a JSON object"),
    ("missing handle", {k: v for k, v in GOOD.items() if k != "handle"}, "missing field handle"),
    ("missing currentChange", {k: v for k, v in GOOD.items() if k != "currentChange"}, "currentChange"),
]


@pytest.mark.parametrize(("item", "reason"), [(b[1], b[2]) for b in BAD], ids=[b[0] for b in BAD])
def test_malformed_items_are_rejected_with_a_reason(item: Any, reason: str) -> None:
    """A malformed item is kept as a rejected entry naming the problem; its handle (if any)
    is still returned so that it gets committed."""
    intake = feed_item(item, NOW)
    assert not intake.accepted
    assert intake.entry.kind == "rejected"
    assert intake.entry.reason is not None and reason in intake.entry.reason
    if isinstance(item, dict) and "handle" in item:
        assert intake.handle == item["handle"]
        assert "h-1" not in intake.entry.payload  # the kept item leaves the handle out


def test_a_redelivered_bad_item_has_the_same_dedup_key() -> None:
    """The same bad item delivered again (new handle) is one rejected entry."""
    a = feed_item({**GOOD, "state": "teleported", "handle": "h-1"}, NOW)
    b = feed_item({**GOOD, "state": "teleported", "handle": "h-2"}, NOW)
    assert a.entry.dedup_key == b.entry.dedup_key


@pytest.mark.parametrize(
    ("text", "micro"),
    [
        ("2019-08-12T20:54:23.7153839Z", 715383),
        ("2019-01-31T20:09:41.8830000Z", 883000),
        ("2024-02-06T20:46:11.7010747+00:00", 701074),
        ("2024-02-06T20:46:11Z", 0),
        ("2024-02-06T17:46:11.5-0300", 500000),
    ],
)
def test_parse_time_accepts_vtex_forms(text: str, micro: int) -> None:
    """Seven fractional digits, Z, +00:00 and compact offsets all parse to UTC."""
    value = parse_time(text)
    assert value.tzinfo is not None and value.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
    assert value.microsecond == micro


def test_parse_time_without_zone_is_utc_and_garbage_fails() -> None:
    """A zone-less timestamp is read as UTC; anything else raises BadTime."""
    assert parse_time("2024-02-06T20:46:11") == datetime(2024, 2, 6, 20, 46, 11, tzinfo=UTC)
    assert parse_time("2024-02-06T20:46:11.8830000") == datetime(2024, 2, 6, 20, 46, 11, 883000, tzinfo=UTC)
    with pytest.raises(BadTime):
        parse_time("yesterday")


def test_an_offset_is_converted_to_utc() -> None:
    """A change written with an offset is stored as the same instant in UTC."""
    assert parse_time("2024-02-06T17:46:11.5-03:00") == datetime(2024, 2, 6, 20, 46, 11, 500000, tzinfo=UTC)


PUSH = {
    "Domain": "Fulfillment",
    "OrderId": "v52277740atmc-01",
    "State": "ready-for-handling",
    "LastState": "window-to-cancel",
    "LastChange": "2019-08-14T17:11:39.2550122Z",
    "CurrentChange": "2019-08-14T17:12:48.0965893Z",
    "Origin": {"Account": "automacaoqa", "Key": "vtexappkey-appvtex"},
}


def test_vtex_example_push_is_accepted_with_its_account() -> None:
    """VTEX's PascalCase example push becomes a StatusChanged entry; the account is returned."""
    pushed = hook_item(PUSH, NOW)
    assert pushed.reason is None and pushed.entry is not None and not pushed.ping
    assert pushed.account == "automacaoqa"
    payload = json.loads(pushed.entry.payload)
    assert payload["source"] == "hook" and payload["last_state"] == "window-to-cancel"
    assert payload["current_change"].startswith("2019-08-14T17:12:48.096589")


def test_push_and_feed_item_for_one_change_share_the_dedup_key() -> None:
    """The same change seen by feed (camelCase) and hook (PascalCase) is one event."""
    item = {**{k[0].lower() + k[1:]: v for k, v in PUSH.items() if k != "Origin"}, "handle": "h"}
    pushed = hook_item(PUSH, NOW)
    assert pushed.entry is not None
    assert pushed.entry.dedup_key == feed_item(item, NOW).entry.dedup_key


def test_push_without_current_change_takes_last_change() -> None:
    """VTEX's guide shows pushes without CurrentChange: LastChange is the change time."""
    pushed = hook_item({k: v for k, v in PUSH.items() if k != "CurrentChange"}, NOW)
    assert pushed.entry is not None and pushed.reason is None
    assert json.loads(pushed.entry.payload)["current_change"].startswith("2019-08-14T17:11:39.255012")


BAD_PUSHES: list[tuple[str, Any, str]] = [
    ("no change time", {k: v for k, v in PUSH.items() if k not in ("CurrentChange", "LastChange")}, "CurrentChange"),
    ("no origin", {k: v for k, v in PUSH.items() if k != "Origin"}, "missing field Origin"),
    ("origin not an object", {**PUSH, "Origin": "automacaoqa"}, "Origin must be an object"),
    ("no account", {**PUSH, "Origin": {"Key": "k"}}, "missing field Origin.Account"),
    ("unknown status", {**PUSH, "State": "teleported"}, "unknown status"),
    ("bad time", {**PUSH, "CurrentChange": "soon"}, "CurrentChange"),
    ("not an object", "ready-for-handling", "must be a JSON object"),
]


@pytest.mark.parametrize(("body", "reason"), [(b[1], b[2]) for b in BAD_PUSHES], ids=[b[0] for b in BAD_PUSHES])
def test_malformed_pushes_are_rejected_with_a_reason(body: Any, reason: str) -> None:
    """A malformed push becomes a rejected entry whose reason names the field as VTEX spells it."""
    pushed = hook_item(body, NOW)
    assert pushed.entry is not None and pushed.entry.kind == "rejected"
    assert pushed.reason is not None and reason in pushed.reason


def test_ping_is_recognised_in_any_casing() -> None:
    """VTEX's hookConfig ping carries no order and touches nothing."""
    assert is_ping({"hookConfig": "ping"}) and is_ping({"HookConfig": "ping"})
    assert not is_ping({**PUSH, "hookConfig": "ping"}) and not is_ping(["hookConfig"])
    assert hook_item({"hookConfig": "ping"}, NOW).ping


def test_fractions_beyond_microseconds_are_cut_to_six_digits() -> None:
    """VTEX's seven fractional digits are cut before parsing (not every 3.11 takes them)."""
    assert _six_digit_fraction("2019-01-31T20:09:41.8830000Z") == "2019-01-31T20:09:41.883000Z"
    assert _six_digit_fraction("2019-01-31T20:09:41.5-0300") == "2019-01-31T20:09:41.5-0300"
    assert _six_digit_fraction("2019-01-31T20:09:41Z") == "2019-01-31T20:09:41Z"


POISON: list[tuple[str, Any, str]] = [
    ("overflowing date", {**GOOD, "currentChange": "0001-01-01T00:00:00+14:00"}, "currentChange"),
    ("year before 2000", {**GOOD, "currentChange": "1999-12-31T23:59:59Z"}, "out of range"),
    ("year after 2100", {**GOOD, "lastChange": "2100-01-01T00:00:00Z"}, "out of range"),
    ("lone surrogate in orderId", {**GOOD, "orderId": "95371\ud800-01"}, "orderId"),
    ("lone surrogate in lastState", {**GOOD, "lastState": "\udfff"}, "lastState"),
    ("lone surrogate in domain", {**GOOD, "domain": "Fulfil\ud800"}, "domain"),
    ("overlong orderId", {**GOOD, "orderId": "9" * 60_000}, "orderId"),
    ("orderId with a slash", {**GOOD, "orderId": "../feed"}, "orderId"),
    ("orderId with a space", {**GOOD, "orderId": "1 2"}, "orderId"),
    ("overlong eventId", {**GOOD, "eventId": "E" * 200}, "eventId"),
    ("handle with a surrogate", {**GOOD, "handle": "h\ud800"}, "handle"),
    ("huge number", {**GOOD, "orderId": 10**4000}, "orderId"),
    ("nested deep", {**GOOD, "state": [[[[[]]]]] * 3}, "state"),
]


@pytest.mark.parametrize(("item", "reason"), [(p[1], p[2]) for p in POISON], ids=[p[0] for p in POISON])
def test_poisoned_items_are_rejected_and_storable(item: Any, reason: str) -> None:
    """An item that would overflow, break JSON or SQLite, or flood the logs is a rejected
    entry naming the field, and every text of the entry is valid UTF-8."""
    intake = feed_item(item, NOW)
    assert not intake.accepted and intake.entry.kind == "rejected"
    assert intake.entry.reason is not None and reason in intake.entry.reason
    for text in (intake.entry.payload, intake.entry.reason, intake.entry.order_id, intake.entry.dedup_key):
        assert text is None or text.encode("utf-8")
    assert intake.entry.order_id is None or len(intake.entry.order_id) <= 128
    assert intake.handle is None or intake.handle.encode("ascii")


def test_an_unrepresentable_item_is_still_rejected() -> None:
    """An item too deep to serialise is kept by its type and digest, not a crash."""
    deep: list[Any] = []
    for _ in range(5000):
        deep = [deep]
    intake = feed_item({**GOOD, "extra": deep}, NOW)
    assert intake.accepted
    intake = feed_item({**GOOD, "state": deep}, NOW)
    assert not intake.accepted and intake.entry.payload.encode("utf-8")


def test_ids_at_their_limits_are_accepted() -> None:
    """The longest allowed ids and VTEX's id shapes pass."""
    for order_id in ("953712004126-01", "v52277740atmc-01", "MKP-123456789-01", "A" + "1" * 127):
        assert feed_item({**GOOD, "orderId": order_id}, NOW).accepted, order_id
    assert feed_item({**GOOD, "handle": "eyJ." + "x" * 16_000}, NOW).accepted


@pytest.mark.parametrize(
    ("text", "reason"),
    [("0001-01-01T00:00:00+14:00", "out of range"), ("9999-12-31T23:59:59-14:00", "out of range")],
)
def test_parse_time_refuses_overflowing_dates(text: str, reason: str) -> None:
    """A date that overflows when converted to UTC is BadTime, never OverflowError."""
    with pytest.raises(BadTime, match=reason):
        parse_time(text)


def test_poisoned_pushes_are_rejected() -> None:
    """A push with an overflowing date or a surrogate id is a rejected entry, not an exception."""
    for body in ({**PUSH, "CurrentChange": "0001-01-01T00:00:00+14:00"}, {**PUSH, "OrderId": "\ud800"}):
        pushed = hook_item(body, NOW)
        assert pushed.entry is not None and pushed.entry.kind == "rejected" and pushed.reason
        assert pushed.entry.payload.encode("utf-8")


def test_a_deep_rejected_item_is_kept_as_a_summary() -> None:
    """A rejected item nested deeper than a JSON reader goes is kept as head, size and
    digest, so the journal row parses back."""
    deep: Any = "x"
    for _ in range(900):  # json.dumps writes it; json.loads, under a test's stack, may not
        deep = {"a": deep}
    intake = feed_item({**GOOD, "state": deep}, NOW)
    summary = json.loads(intake.entry.payload)
    assert not intake.accepted and summary["size"] > 3000 and "sha256" in summary and "text" in summary
