"""Where the request budget and the time went in a `restarts.py` run kept with `--keep`.

    .venv/bin/python benchmarks/budget_trace.py KEPT_RUN_FOLDER [--limit 15]

Reads the folder's `trace.json` (the simulator's books, written by restarts.py) and
`omsd.db` (omsd's journal and outbox) and prints:

- the budget: requests that reached the simulator, admitted and refused, per route and
  per 10 s from the first order, against the account's limit; the seconds omsd was down
  (from each stop to the next process's first request) and what the admitted rate was
  while it was up and work waited;
- the calls by purpose (omsd's outbox: Get orders by purpose and by what they found,
  approval PUTs, those recovered as "outcome unknown" after a SIGKILL, and whether such
  a PUT had reached VTEX at all);
- release → PUT for the held orders, cut into stages: VTEX's release → omsd journals
  it → the Get order that decides is queued → claimed → answered → the PUT queued →
  claimed → at VTEX (p50 / p99 of each stage, seconds);
- the approvals not made, and where each such order stands.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sqlite3
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

PUT_ROUTE = "/api/order-integration/orders/status"
HELD = "waiting-for-manual-authorization"


def ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def pct(values: list[float], q: float) -> str:
    if not values:
        return "-"
    values = sorted(values)
    return f"{values[min(len(values) - 1, int(q * len(values)))]:.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path)
    p.add_argument("--limit", type=float, default=15.0)
    args = p.parse_args()
    trace: dict[str, Any] = json.loads((args.folder / "trace.json").read_text())
    db = sqlite3.connect(args.folder / "omsd.db")
    db.row_factory = sqlite3.Row
    t0 = trace["t0"]  # monotonic
    arrivals = [(t - t0, r) for t, r in trace["arrivals"] if t >= t0]
    limited = [(t - t0, r, acct) for t, r, acct in trace["limited"] if t >= t0]
    orders = trace["orders"]
    puts = [t for t, r in arrivals if r == PUT_ROUTE]
    end = max(puts) if puts else max(t for t, _ in arrivals)

    print(f"== budget: {len(arrivals)} requests from the first order, last PUT at {end:.1f} s")
    refused = Counter(r for _, r, _ in limited)
    for route, n in Counter(r for _, r in arrivals).most_common():
        print(f"  {route}: {n} ({refused[route]} answered 429)")
    # down time: from each stop to the next process's first request
    lives = trace["lives"]
    down = 0.0
    gaps = []
    for before, after in itertools.pairwise(lives):
        if len(before) < 3:
            continue
        stopped = before[2] - t0
        first = next((t for t, _ in arrivals if t >= after[0] - t0), None)
        if first is not None and first <= end:
            gaps.append((stopped, first - stopped, after[1] - after[0] if len(after) > 1 else float("nan")))
            down += first - stopped
    if gaps:
        print(
            f"  {len(gaps)} restarts: down {down:.1f} s in all (stop → next first request p50 "
            f"{pct([g for _, g, _ in gaps], 0.5)} s, of it start → /healthz p50 {pct([h for _, _, h in gaps], 0.5)} s)"
        )
    admitted = [t for t, _ in arrivals if t <= end]
    n_limited = sum(1 for t, _, _ in limited if t <= end)
    up = end - down
    print(
        f"  admitted until the last PUT: {len(admitted) - n_limited} in {end:.1f} s = "
        f"{(len(admitted) - n_limited) / end:.1f}/s ({(len(admitted) - n_limited) / end / args.limit:.0%}); "
        f"while up ({up:.1f} s): {(len(admitted) - n_limited) / max(up, 1e-9):.1f}/s"
    )
    per10 = []
    for k in range(0, int(end) + 1, 10):
        got = sum(1 for t, _ in arrivals if k <= t < k + 10)
        no = sum(1 for t, _, _ in limited if k <= t < k + 10)
        per10.append(f"{(got - no) / 10:.1f}")
    print("  admitted per s, per 10 s: " + " ".join(per10))
    per10 = []
    for k in range(0, int(end) + 1, 10):
        per10.append(str(sum(1 for t, _, _ in limited if k <= t < k + 10)))
    print("  429s per 10 s: " + " ".join(per10))

    print("== calls by purpose (omsd's outbox)")
    rows = db.execute(
        "SELECT kind, json_extract(payload, '$.purpose') AS purpose, state, COUNT(*) AS n FROM outbox GROUP BY 1, 2, 3"
    ).fetchall()
    for r in rows:
        print(f"  {r['kind']} {r['purpose'] or ''} {r['state']}: {r['n']}")
    # what each Get order found, by the transition it caused
    found: Counter[str] = Counter()
    for r in db.execute("SELECT cause FROM history WHERE cause LIKE '%(get_order)%' OR cause LIKE 'Get order%'"):
        cause = r["cause"]
        if "sending approval" in cause:
            found["found it free: PUT"] += 1
        elif "still being created" in cause:
            found["still being created"] += 1
        elif "still held" in cause or "newer hold" in cause:
            found["held"] += 1
        elif "older than the known" in cause:
            found["stale"] += 1
        else:
            found[cause.split(":")[0][:60]] += 1
    print("  Get orders found: " + ", ".join(f"{k}: {v}" for k, v in found.most_common()))
    recovered = db.execute(
        "SELECT order_id, json_extract(payload, '$.seq') AS seq, received_at FROM journal "
        "WHERE kind = 'approval_failed' AND source = 'recovery'"
    ).fetchall()
    reached = 0
    for r in recovered:
        started = db.execute(
            "SELECT started_at FROM outbox WHERE order_id = ? AND seq = ?", (r["order_id"], r["seq"])
        ).fetchone()
        put_at = orders.get(r["order_id"], {}).get("put_at", [])
        if (
            started
            and started["started_at"]
            and any(ts(started["started_at"]) <= p <= ts(r["received_at"]) for p in put_at)
        ):
            reached += 1
    print(f"  approval PUTs recovered as 'outcome unknown': {len(recovered)}, of which reached VTEX: {reached}")

    print("== release -> PUT (held orders), stages in seconds: p50 / p99")
    stages: dict[str, list[float]] = {}
    for oid, o in orders.items():
        hist = o["history"]
        release = next(
            (ts(at) for (s, _), (_, at) in itertools.pairwise(hist) if s == HELD),
            None,
        )
        if release is None or not o["put_at"]:
            continue
        put = o["put_at"][0]
        journaled = db.execute(
            "SELECT MIN(received_at) AS t FROM journal WHERE order_id = ? AND kind = 'status_changed' "
            "AND json_extract(payload, '$.last_state') = ?",
            (oid, HELD),
        ).fetchone()["t"]
        # the Get order that decided the first PUT, and that PUT
        put_row = db.execute(
            "SELECT seq, created_at, started_at FROM outbox WHERE order_id = ? AND kind = 'send_approval' ORDER BY seq",
            (oid,),
        ).fetchall()
        put_row = [r for r in put_row if r["started_at"] and ts(r["started_at"]) <= put + 0.01]
        if not put_row:
            continue
        last_put = put_row[-1]
        fetch = db.execute(
            "SELECT created_at, started_at, done_at FROM outbox WHERE order_id = ? AND kind = 'fetch_order' "
            "AND seq < ? ORDER BY seq DESC LIMIT 1",
            (oid, last_put["seq"]),
        ).fetchone()
        stages.setdefault("release -> PUT", []).append(put - release)
        if journaled:
            stages.setdefault("release -> journaled", []).append(ts(journaled) - release)
        if fetch and fetch["started_at"]:
            stages.setdefault("check queued -> claimed", []).append(ts(fetch["started_at"]) - ts(fetch["created_at"]))
            stages.setdefault("check claimed -> answered", []).append(ts(fetch["done_at"]) - ts(fetch["started_at"]))
            if ts(fetch["created_at"]) < release:
                stages.setdefault("check queued before the release (speculative)", []).append(
                    release - ts(fetch["created_at"])
                )
        stages.setdefault("PUT queued -> claimed", []).append(ts(last_put["started_at"]) - ts(last_put["created_at"]))
        stages.setdefault("PUT claimed -> at VTEX", []).append(put - ts(last_put["started_at"]))
        stages.setdefault("PUTs before the one that went", []).append(float(len(put_row) - 1))
    for name, values in stages.items():
        print(f"  {name}: {pct(values, 0.5)} / {pct(values, 0.99)} over {len(values)}")

    bound(trace, args.limit)

    missing = [oid for oid, o in orders.items() if o["approvals_applied"] == 0 and o["history"][-1][0] != "canceled"]
    print(f"== approvals not made: {len(missing)}")
    phases: Counter[str] = Counter()
    for oid in missing:
        row = db.execute("SELECT phase, status FROM orders WHERE order_id = ?", (oid,)).fetchone()
        status = orders[oid]["history"][-1][0]
        pending = db.execute(
            "SELECT kind, json_extract(payload, '$.purpose') AS purpose FROM outbox WHERE order_id = ? "
            "AND state IN ('pending', 'started')",
            (oid,),
        ).fetchone()
        what = f"{pending['kind']} {pending['purpose'] or ''}".strip() if pending else "nothing queued"
        phases[f"omsd {row['phase'] if row else 'unknown'} ({what}), VTEX {status}"] += 1
    for where, n in phases.most_common():
        print(f"  {n}: {where}")


def bound(trace: dict[str, Any], limit: float) -> None:
    """The least release -> PUT any scheduler could give these orders on this budget, served in
    the order work arrives (which minimises the worst wait): the fewest calls the run needs
    (a tenth of a feed GET and a hundredth of a commit per feed event; a Get order and a PUT
    per approval, due at the release, or at the intent for an order never held) against the
    budget at the sender (the limit over 1.05 s windows), as a fluid queue."""
    off = trace["wall_offset"]
    work: list[tuple[float, float, bool]] = []  # (when, calls, an approval of a held order)
    for o in trace["orders"].values():
        hist = o["history"]
        work += [(ts(at) - off, 0.11, False) for _, at in hist]
        if hist[-1][0] == "canceled" or any(s == "canceled" for s, _ in hist):
            continue
        release = next((ts(at) - off for (s, _), (_, at) in itertools.pairwise(hist) if s == HELD), None)
        if o["held"] and release is not None:
            work.append((release, 2.0, True))
        elif not o["held"] and o["intent_at"] is not None:
            work.append((o["intent_at"], 2.0, False))
    work.sort()
    rate = limit / 1.05
    done_at = float("-inf")
    waits = []
    for when, calls, held in work:
        done_at = max(done_at, when) + calls / rate
        if held:
            waits.append(done_at - when)
    print(
        f"== the least release -> PUT on {limit:g}/s (fluid, FIFO, {sum(c for _, c, _ in work):.0f} calls): "
        f"p50 {pct(waits, 0.5)} / p99 {pct(waits, 0.99)} / max {pct(waits, 1.0)} s"
    )


if __name__ == "__main__":
    main()
