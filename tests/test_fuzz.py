"""Fuzzing what comes from outside: the feed item parser, the hook, the notification route
and /v1/*, with generated and mutated bodies (byte flips, deep nesting, bad encodings, huge
numbers, surrogates, wrong types, overlong ids, odd dates).

Bodies are sent plain, gzip-compressed, or claiming gzip without being it.
Each route runs on aiohttp's test server with a real store and a real processor. For every
input: no 5xx and no exception escapes; an accepted body re-parses into the event journaled.
After each campaign: every journal row is valid UTF-8 and readable, and a real event sent
after the campaign is still applied.

Size: OMSD_FUZZ_EXAMPLES inputs per target (default: the CI size, a few hundred in all).
`OMSD_FUZZ_EXAMPLES=2500 OMSD_FUZZ_REPORT=fuzz.json pytest tests/test_fuzz.py` is the large
campaign (5 targets: 12,500 inputs) whose figures docs/benchmarks.md records.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import sqlite3
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from omsd.daemon.http.common import ApiContext
from omsd.daemon.http.connector import ApprovalRequest
from omsd.daemon.http.routes import build_app
from omsd.daemon.intake import entries, wire
from omsd.daemon.intake.feed import FeedPoller
from omsd.daemon.ops.metrics import Metrics
from omsd.daemon.pipeline.processor import Processor
from omsd.daemon.vtex.fake import FakeVtex
from omsd.state.events import read_entry
from omsd.state.models import Policy
from omsd.state.store import Store
from tests.api_helpers import AUTH, NOTIFY, api_context, envelope, hook_headers, push
from tests.api_helpers import settings as api_settings
from tests.helpers import feed_until, until

EXAMPLES = int(os.environ.get("OMSD_FUZZ_EXAMPLES", "0"))
NOW = datetime(2026, 11, 1, tzinfo=UTC)
TALLY: dict[str, Counter[str]] = defaultdict(Counter)


def campaign(ci_examples: int) -> settings:
    """Hypothesis settings: the CI size (derandomized: the same inputs on every run) or
    OMSD_FUZZ_EXAMPLES random inputs."""
    return settings(
        max_examples=EXAMPLES or ci_examples,
        derandomize=not EXAMPLES,
        database=None,
        deadline=None,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
        ],
    )


@pytest.fixture(scope="module", autouse=True)
def _report() -> Iterator[None]:
    """With OMSD_FUZZ_REPORT set, write the inputs and statuses per route there."""
    yield
    path = os.environ.get("OMSD_FUZZ_REPORT")
    if path:
        Path(path).write_text(json.dumps({k: dict(v) for k, v in TALLY.items()}, indent=2, sort_keys=True))


# ---- strategies ------------------------------------------------------------------------
ODD_DATES = st.one_of(
    st.sampled_from(
        [
            "0001-01-01T00:00:00+14:00",
            "9999-12-31T23:59:59-14:00",
            "1999-12-31T23:59:59Z",
            "2100-01-01T00:00:00Z",
            "2019-02-30T00:00:00Z",
            "2019-08-12T20:54:23.71538399999999Z",
            "+002019-08-12T20:54:23Z",
            "2019-08-12",
            "T",
            "",
        ]
    ),
    st.builds(
        "{:04d}-{:02d}-{:02d}T{:02d}:00:00{}{:02d}:{:02d}".format,
        st.integers(1, 9999),
        st.integers(0, 13),
        st.integers(0, 32),
        st.integers(0, 25),
        st.sampled_from(["+", "-"]),
        st.integers(0, 24),
        st.integers(0, 60),
    ),
)
SURROGATES = st.text(alphabet=st.characters(categories=["Cs"]), min_size=1, max_size=3)
NASTY_TEXT = st.one_of(
    st.text(max_size=30),
    SURROGATES,
    st.builds(lambda a, s, b: a + s + b, st.text(max_size=5), SURROGATES, st.text(max_size=5)),
    st.builds(lambda c, n: c * n, st.sampled_from(["9", "A", "é", "/", "\x00", " "]), st.integers(1, 70_000)),
    ODD_DATES,
)
HUGE_NUMBERS = st.one_of(
    st.integers(),
    st.builds(lambda k: 10**k, st.integers(15, 5000)),
    st.floats(allow_nan=True, allow_infinity=True),
)
SCALARS = st.one_of(st.none(), st.booleans(), HUGE_NUMBERS, NASTY_TEXT)
VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(NASTY_TEXT, inner, max_size=4), max_leaves=10
)


def nested(value: Any, depth: int) -> Any:
    for n in range(depth):
        value = [value] if n % 2 else {"a": value}
    return value


DEEP = st.builds(nested, SCALARS, st.integers(1, 3000))
FIELD_VALUES = st.one_of(VALUES, DEEP, NASTY_TEXT, ODD_DATES)


@st.composite
def mutated(draw: st.DrawFn, template: dict[str, Any]) -> Any:
    """The template with some fields changed, dropped or added, or something else entirely."""
    shape = draw(st.sampled_from(["fields", "fields", "fields", "value", "deep"]))
    if shape == "value":
        return draw(VALUES)
    if shape == "deep":
        return nested(template, draw(st.integers(1, 3000)))
    body = dict(template)
    keys = [*template, "extra", "ORDERID", "handle"]
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(keys))
        if draw(st.booleans()) and key in body:
            del body[key]
        else:
            body[key] = draw(FIELD_VALUES)
    return body


def encode(value: Any, how: str) -> bytes:
    try:
        if how == "utf-8":
            return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")
        if how == "utf-16":
            return json.dumps(value, ensure_ascii=False).encode("utf-16", "surrogatepass")
        if how == "latin-1":
            return json.dumps(value, ensure_ascii=False).encode("latin-1", "replace")
        return json.dumps(value).encode()
    except (ValueError, RecursionError):  # an int too long to print, a value too deep
        return b"[" * 5000


@st.composite
def bodies(draw: st.DrawFn, template: dict[str, Any]) -> bytes:
    """Bytes: a mutated template in some encoding, then maybe flipped, cut or padded."""
    data = encode(draw(mutated(template)), draw(st.sampled_from(["ascii", "ascii", "utf-8", "utf-16", "latin-1"])))
    kind = draw(st.sampled_from(["as is", "as is", "flip", "cut", "noise"]))
    if kind == "flip" and data:
        buf = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            buf[draw(st.integers(0, len(buf) - 1))] = draw(st.integers(0, 255))
        data = bytes(buf)
    elif kind == "cut":
        data = data[: draw(st.integers(0, len(data)))]
    elif kind == "noise":
        data = draw(st.binary(max_size=64)) + data + draw(st.binary(max_size=64))
    return data


def content_encoded(data: bytes, how: str) -> tuple[bytes, dict[str, str]]:
    """The body as sent: plain, gzip-compressed, or claiming gzip without being it."""
    if how == "gzip":
        return gzip.compress(data), {"Content-Encoding": "gzip"}
    if how == "not gzip":
        return data, {"Content-Encoding": "gzip"}
    return data, {}


ENCODINGS = st.sampled_from(["none", "none", "none", "none", "none", "gzip", "not gzip"])
CONTENT_TYPES = st.sampled_from(
    [
        "application/json",
        "application/json; charset=utf-8",
        "application/json; charset=utf-16",
        "application/json; charset=x-no-such",
        "text/plain; charset=latin-1",
        "application/octet-stream",
    ]
)


# ---- the server under test -----------------------------------------------------------------
class Fuzzed:
    """omsd's routes with a real store and a real running processor."""

    def __init__(self, client: TestClient[Any, Any], ctx: ApiContext, processor: Processor) -> None:
        self.client = client
        self.ctx = ctx
        self.processor = processor

    async def post(self, route: str, path: str, data: bytes, headers: dict[str, str], encoding: str) -> tuple[int, Any]:
        sent, extra = content_encoded(data, encoding)
        resp = await self.client.post(path, data=sent, headers={**headers, **extra})
        TALLY[route]["inputs"] += 1
        TALLY[route][str(resp.status)] += 1
        assert resp.status < 500, (resp.status, await resp.text(), data[:200])
        return resp.status, await resp.json()


@pytest.fixture
async def fuzzed(tmp_path: Path) -> AsyncIterator[Fuzzed]:
    """The routes; once the campaign is over, the journal is checked and a real event is sent."""
    async with await Store.open(tmp_path / "fuzz.db") as store:
        metrics = Metrics()
        s = api_settings()
        processor = Processor(store, Policy(), metrics=metrics)
        stop = asyncio.Event()
        task = asyncio.create_task(processor.run(stop, poll_s=0.05))
        ctx = api_context(store, s, processor, processor.wake.set, metrics)
        ctx.reject_budget.burst = ctx.reject_budget.burst_all = 1e9  # store every reject: more to check
        client: TestClient[Any, Any] = TestClient(TestServer(build_app(ctx)))
        await client.start_server()
        try:
            yield Fuzzed(client, ctx, processor)
            await still_applies_real_events(client, store, task)
            assert_journal_readable(store.path)
        finally:
            await client.close()
            stop.set()
            await task


async def still_applies_real_events(client: TestClient[Any, Any], store: Store, task: asyncio.Task[None]) -> None:
    order_id = "AFTER-FUZZ-01"
    resp = await client.post("/vtex/hook", json=push(OrderId=order_id), headers=hook_headers())
    assert resp.status == 200 and not task.done()

    async def applied() -> bool:
        order = await store.read.load_order(order_id)
        return order is not None and order.status == "ready-for-handling"

    await until(applied, timeout=20, what="a real push applied after the campaign")


def assert_journal_readable(db: Path) -> None:
    """Every row is UTF-8; accepted rows read back as entries, rejected ones as JSON."""
    conn = sqlite3.connect(db)
    conn.text_factory = bytes
    try:
        rows = conn.execute("SELECT kind, version, payload, reason, order_id, dedup_key FROM journal").fetchall()
        unreadable = conn.execute("SELECT COUNT(*) FROM unreadable").fetchone()[0]
    finally:
        conn.close()
    for kind, version, payload, *texts in rows:
        for text in (kind, payload, *texts):
            assert text is None or text.decode("utf-8")
        if kind == b"rejected":
            json.loads(payload)
        else:
            read_entry(kind.decode(), version, payload)
    assert unreadable == 0


def last_payload(db: Path) -> dict[str, Any]:
    conn = sqlite3.connect(db)
    try:
        row = conn.execute('SELECT kind, version, payload FROM journal ORDER BY "offset" DESC LIMIT 1').fetchone()
    finally:
        conn.close()
    return read_entry(row[0], row[1], row[2]).model_dump(mode="json")


# ---- the campaigns ---------------------------------------------------------------------------
FEED_ITEM = {
    "eventId": "ED423DDED4C1AE580CADAC1A4D02DA3F",
    "handle": "eyJhbGciOiJIUzI1NiJ9.h",
    "domain": "Fulfillment",
    "state": "ready-for-handling",
    "lastState": "window-to-cancel",
    "orderId": "953712004126-01",
    "lastChange": "2019-08-12T20:54:01.134057Z",
    "currentChange": "2019-08-12T20:54:23.7153839Z",
}


@pytest.fixture
async def feed_store(tmp_path: Path) -> AsyncIterator[Store]:
    """One store for the whole feed campaign, checked when it is over."""
    async with await Store.open(tmp_path / "feed.db") as store:
        yield store
        assert_journal_readable(store.path)


@campaign(ci_examples=80)
@given(item=mutated(FEED_ITEM))
async def test_feed_items(feed_store: Store, item: Any) -> None:
    """Any feed item is journaled by the poller without an exception, its handle (when it has
    a usable one) is committed, and an accepted item is the event its fields say."""
    vtex = FakeVtex([[item]])
    metrics = Metrics()
    quick = api_settings(feed_empty_rechecks=0)  # an empty answer ends the round: its commit goes at once
    poller = FeedPoller(feed_store, vtex, quick, metrics=metrics)
    result = entries.feed_item(item, NOW)

    def journaled() -> float:
        return sum(
            metrics.sample(f"omsd_{n}_total", source="feed") for n in ("events_in", "duplicates", "rejected_input")
        )

    await feed_until(poller, lambda: journaled() == 1 and (result.handle is None or bool(vtex.committed)), "journaled")
    TALLY["feed item"]["inputs"] += 1
    TALLY["feed item"]["accepted" if result.accepted else "rejected"] += 1
    assert vtex.committed == ([result.handle] if result.handle else [])
    if result.accepted and metrics.sample("omsd_events_in_total", source="feed"):
        expected = wire.FeedItem.model_validate(item).event("feed").model_dump(mode="json")
        assert last_payload(feed_store.path) == expected


@campaign(ci_examples=50)
@given(data=bodies(push()), content_type=CONTENT_TYPES, signed=st.booleans(), encoding=ENCODINGS)
async def test_hook_route(fuzzed: Fuzzed, data: bytes, content_type: str, signed: bool, encoding: str) -> None:
    """No body makes the hook answer 5xx; an accepted push is the event journaled."""
    headers = {"Content-Type": content_type, **(hook_headers() if signed else {})}
    status, answer = await fuzzed.post("hook", "/vtex/hook", data, headers, encoding)
    if status == 200 and answer.get("received") and not answer["duplicate"]:
        pushed = entries.hook_item(json.loads(data), NOW)
        assert pushed.entry is not None and pushed.reason is None and pushed.account == "shop"
        assert last_payload(fuzzed.ctx.store.path) == json.loads(pushed.entry.payload)


@campaign(ci_examples=50)
@given(
    data=bodies(envelope()),
    content_type=CONTENT_TYPES,
    an=st.none() | st.sampled_from(["shop", "other", "%FF"]),
    encoding=ENCODINGS,
)
async def test_notification_route(
    fuzzed: Fuzzed, data: bytes, content_type: str, an: str | None, encoding: str
) -> None:
    """No body makes the notification route answer 5xx; an accepted one is a valid envelope."""
    path = NOTIFY if an is None else f"{NOTIFY}?an={an}"
    status, answer = await fuzzed.post("notification", path, data, {"Content-Type": content_type}, encoding)
    if status == 200:
        env = wire.ResultEnvelope.model_validate(json.loads(data))
        if not answer["duplicate"]:
            assert last_payload(fuzzed.ctx.store.path)["marketplace_order_id"] == env.marketplace_order_id


@campaign(ci_examples=50)
@given(
    data=bodies({"marketplaceOrderId": "M-1", "orderId": "V-1-01"}),
    content_type=CONTENT_TYPES,
    auth=st.sampled_from([AUTH, {}, {"Authorization": "Bearer x"}, {"Authorization": "Basic \\x7f"}]),
    encoding=ENCODINGS,
)
async def test_v1_approvals(
    fuzzed: Fuzzed, data: bytes, content_type: str, auth: dict[str, str], encoding: str
) -> None:
    """No body or header makes /v1/approvals answer 5xx; an accepted body is a valid request."""
    headers = {"Content-Type": content_type, **auth}
    status, answer = await fuzzed.post("/v1/approvals", "/v1/approvals", data, headers, encoding)
    if status == 202:
        req = ApprovalRequest.model_validate(json.loads(data))
        assert answer["accepted"] is True
        assert last_payload(fuzzed.ctx.store.path)["marketplace_order_id"] == req.marketplace_order_id


@campaign(ci_examples=40)
@given(key=NASTY_TEXT.filter(lambda k: 0 < len(k) < 3000), route=st.sampled_from(["orders", "status"]))
async def test_v1_reads(fuzzed: Fuzzed, key: str, route: str) -> None:
    """No key makes /v1/orders/{key} or /v1/status answer 5xx."""
    quoted = quote(key.encode("utf-8", "surrogatepass"), safe="")
    path = f"/v1/orders/{quoted}" if route == "orders" else f"/v1/status?x={quoted}"
    resp = await fuzzed.client.get(path, headers=AUTH)
    TALLY["/v1 reads"]["inputs"] += 1
    TALLY["/v1 reads"][str(resp.status)] += 1
    assert resp.status < 500, (resp.status, await resp.text())
