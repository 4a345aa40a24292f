"""Ingest and replay of a feed dump: `omsd ingest --kind feed FILE` then `omsd replay`, end
to end, beside a baseline in the same run.

    .venv/bin/python benchmarks/ingest.py [--orders 40000] [--handles vtex|short] [--file PATH]
                                          [--baseline REF] [--runs N]

The dump is what `GET /api/orders/feed` returns (camelCase items, one JSON object a
line), written by this script (seed 1): for `--orders` 40,000, exactly 186,590 items,
each a distinct status change through realistic sequences (free or held, approved,
canceled, waiting), in delivery order (by emission time plus up to 60 s of queue
reordering, orders spread over three days); other sizes scale the same mix. Handles are
VTEX-size JWTs (about 1.3 KB: header.payload.signature around an SQS receipt handle,
as in the Orders API example) or, with `--handles short`, the simulator's (about 50 B).
`--file` keeps the dump and reuses it.

For the baseline (`--baseline REF`, see benchmarks/commands.py) and this tree, `--runs`
times each, alternating: a new database (`omsd init`), the ingest, then the replay, each
in a process of its own: wall time, events per second, the command's peak RSS. The
orders and their history (times left out: each run has its own clock) are compared
between the codes.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import os
import platform
import random
import sqlite3
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import commands

C, A, WFMA, FFMT, AF, WTC, RFH, CANCEL, CANCELED = (
    "order-created", "order-accepted", "waiting-for-manual-authorization", "waiting-ffmt-authorization",
    "authorize-fulfillment", "window-to-cancel", "ready-for-handling", "cancel", "canceled",
)  # fmt: skip
# (status sequence, orders out of 40,000): 186,590 items
MIX = [
    ([C, A, FFMT, AF, WTC, RFH], 12_863),  # free, approved, ready for handling
    ([C, A, WFMA, FFMT, AF, WTC, RFH], 4_000),  # held, authorized, approved, ready for handling
    ([C, A, WFMA, CANCEL, CANCELED], 2_000),  # held, rejected
    ([C, A, FFMT], 8_138),  # free, waiting for the marketplace
    ([C, A, WFMA], 3_000),  # held, undecided
    ([C, A, FFMT, CANCEL, CANCELED], 2_000),  # free, canceled before approval
    ([C, A, FFMT, AF, WTC], 4_000),  # free, approved, in window-to-cancel
    ([C, A], 3_999),  # just accepted
]
GAP_S = {  # seconds before reaching this status, from the one before
    A: (1, 5), FFMT: (1, 10), WFMA: (1, 10), AF: (10, 1800), WTC: (0.5, 3), RFH: (1800, 1900),
    CANCEL: (60, 21600), CANCELED: (1, 60),
}  # fmt: skip
T0 = datetime(2026, 11, 24, tzinfo=UTC)
SPAN_S = 3 * 86400


def generate(path: Path, orders: int, vtex_handles: bool) -> int:
    """Write the dump; returns its number of items."""
    rng = random.Random(1)
    kinds = [seq for seq, count in MIX for _ in range(round(count * orders / 40_000))]
    rng.shuffle(kinds)
    items: list[tuple[datetime, dict[str, str]]] = []
    for n, seq in enumerate(kinds):
        order_id = f"MKP-{1_000_000 + n}-01"
        t = T0 + timedelta(seconds=rng.uniform(0, SPAN_S))
        last_state, last_change = "", t - timedelta(seconds=rng.uniform(0.5, 2))
        for status in seq:
            if status != C:
                lo, hi = GAP_S[status] if not (status == FFMT and last_state == WFMA) else (60, 21600)
                t += timedelta(seconds=rng.uniform(lo, hi))
            item = {
                "eventId": uuid.UUID(int=rng.getrandbits(128)).hex.upper(),
                "handle": "",
                "domain": "Fulfillment",
                "state": status,
                "lastState": last_state,
                "orderId": order_id,
                "lastChange": _vtex_time(last_change, rng),
                "currentChange": _vtex_time(t, rng),
            }
            items.append((t + timedelta(seconds=rng.uniform(0, 60)), item))
            last_state, last_change = status, t
    items.sort(key=lambda pair: pair[0])
    with path.open("w") as out:
        for delivered, item in items:
            item["handle"] = _jwt(item, delivered, rng) if vtex_handles else f"h.{rng.getrandbits(128):032x}.0"
            out.write(json.dumps(item, separators=(",", ":")) + "\n")
    return len(items)


def _vtex_time(t: datetime, rng: random.Random) -> str:
    """VTEX's seven fractional digits and Z."""
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond:06d}{rng.randint(0, 9)}Z"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _jwt(item: dict[str, str], delivered: datetime, rng: random.Random) -> str:
    """A handle shaped like VTEX's: a signed JWT around an SQS receipt handle."""
    fmt = "%m/%d/%Y %H:%M:%S"
    claims = {
        "AppKey": "vtexappkey-bench-KEY",
        "Account": "bench",
        "Handle": "AQEB" + base64.b64encode(rng.randbytes(309)).decode(),
        "OrderId": item["orderId"],
        "MessageId": str(uuid.UUID(int=rng.getrandbits(128))),
        "Domain": item["domain"],
        "State": item["state"],
        "LastState": item["lastState"],
        "CreatedAt": delivered.strftime(fmt),
        "iss": "broadcast-api.vtexcommerce.com.br",
    }
    header = _b64(b'{"alg":"HS256","typ":"JWT"}')
    return f"{header}.{_b64(json.dumps(claims, separators=(',', ':')).encode())}.{_b64(rng.randbytes(32))}"


def state_digest(db: Path) -> str:
    """The orders and their history, times left out (each run has its own clock)."""
    digest = hashlib.sha256()
    with contextlib.closing(sqlite3.connect(db)) as conn:
        for row in conn.execute("SELECT order_id, phase, status, marketplace_order_id FROM orders ORDER BY 1"):
            digest.update(repr(row).encode())
        history = "SELECT order_id, journal_offset, from_phase, to_phase, status, cause FROM history ORDER BY 1, 2, id"
        for row in conn.execute(history):
            digest.update(repr(row).encode())
    return digest.hexdigest()[:12]


def main(orders: int, vtex_handles: bool, file: Path | None, baseline_ref: str | None, runs: int) -> None:
    with tempfile.TemporaryDirectory() as tmp, commands.baseline(baseline_ref) as base:
        dump = file or Path(tmp) / "feed.jsonl"
        if not dump.exists():
            start = time.perf_counter()
            count = generate(dump, orders, vtex_handles)
            print(f"generated {count:,} feed items in {time.perf_counter() - start:.1f} s")
        with dump.open() as lines:
            items = sum(1 for _ in lines)
        print(f"feed dump: {items:,} items, {dump.stat().st_size / 1e6:.0f} MB ({dump})")
        codes = ([base] if base else []) + [commands.Code("this tree")]
        print(f"{'code':<22} {'command':<8} {'s':>7} {'events/s':>9} {'peak RSS':>9}  state")
        digests: dict[str, str] = {}
        for n in range(runs):
            for code in codes:
                db = Path(tmp) / f"run-{n}-{code.name.split()[0]}.db"
                commands.run(code, db, ["init"])
                for command in (["ingest", "--kind", "feed", str(dump)], ["replay"]):
                    done = commands.run(code, db, command)
                    rss = f"{done.peak_rss_mib:.0f} MiB"
                    print(
                        f"{code.name:<22} {command[0]:<8} {done.seconds:>7.1f} {items / done.seconds:>9,.0f} {rss:>9}  "
                        f"{state_digest(db)}",
                        flush=True,
                    )
                digests[code.name] = state_digest(db)
                for path in Path(tmp).glob(f"{db.name}*"):
                    path.unlink()
        same = len(set(digests.values())) == 1
        print(f"same orders and history from every code: {'yes' if same else 'NO'}")
        where = f"Python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} cores"
        print(f"{where}; load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--orders", type=int, default=40_000)
    parser.add_argument("--handles", choices=("vtex", "short"), default="vtex")
    parser.add_argument("--file", type=Path, help="keep the feed dump here (reused when it exists)")
    parser.add_argument("--baseline", metavar="REF", help="also run the code of this git commit, in the same run")
    parser.add_argument("--runs", type=int, default=1, help="runs of each code, alternating")
    args = parser.parse_args()
    main(args.orders, args.handles == "vtex", args.file, args.baseline, args.runs)
