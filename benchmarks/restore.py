"""How long a lost database takes to come back from its replica (the RTO's main part).

    .venv/bin/python benchmarks/restore.py [--sizes 100,1000] [--repeat 3]

For each size (MB): an omsd database (its schema, opened by omsd) whose journal is
filled to that size with rows of about 1 KB of JSON (ids and times varying, as real
feed items do: Litestream compresses what it uploads), replicated once to a file://
replica with `litestream replicate -once`. Then, `--repeat` times each:

- baseline: copying the database file (read, write, fsync): the disk's own floor;
- `litestream restore`: what `omsd run` does when OMSD_DB is missing;
- `omsd restore --output` (the same, then SQLite's integrity check and the replay
  check; the journal rows here are filler that the replay check reads past).

All on this machine's disk, file:// replica (S3 adds the download: size / bandwidth).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from omsd.daemon.ops.litestream import Layout, find_binary
from omsd.state.store import Store

ROW_BYTES = 1000


async def build(db: Path, megabytes: int) -> int:
    async with await Store.open(db):
        pass  # the schema, as omsd makes it
    rng = random.Random(megabytes)
    rows = 0
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA journal_mode=WAL")
    while db.stat().st_size < megabytes * 1_000_000:
        batch = []
        for _ in range(10_000):
            rows += 1
            payload = {
                "orderId": f"MKP-{rng.randrange(10**12):012d}-01",
                "state": rng.choice(["waiting-for-manual-authorization", "ready-for-handling", "invoiced"]),
                "currentChange": f"2026-11-{rng.randrange(1, 29):02d}T{rng.randrange(24):02d}:00:00.0000000Z",
                "note": os.urandom(200).hex() + "x" * (ROW_BYTES - 600),
            }
            batch.append(("rejected", "hook", json.dumps(payload), "benchmark filler", "2026-11-30T00:00:00+00:00"))
        conn.executemany(
            "INSERT INTO journal (kind, source, payload, reason, received_at) VALUES (?, ?, ?, ?, ?)", batch
        )
        conn.commit()
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return rows


def timed(command: list[str], env: dict[str, str] | None = None) -> float:
    began = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env=env)  # noqa: S603 - our own binaries
    return time.perf_counter() - began


def copy(src: Path, dst: Path) -> float:
    began = time.perf_counter()
    shutil.copyfile(src, dst)
    with dst.open("rb") as f:
        os.fsync(f.fileno())
    return time.perf_counter() - began


def summary(values: list[float]) -> str:
    return f"median {statistics.median(values):.2f} s (min {min(values):.2f}, max {max(values):.2f})"


async def one_size(megabytes: int, repeat: int, tmp: Path) -> None:
    binary = find_binary()
    db = tmp / f"omsd-{megabytes}.db"
    began = time.perf_counter()
    rows = await build(db, megabytes)
    replica = f"file://{tmp / f'replica-{megabytes}'}"
    layout = Layout.of(db)
    layout.write_config(replica)
    upload = timed([str(binary), "replicate", "-once", "-config", str(layout.config), "-no-expand-env"])
    size = db.stat().st_size
    replica_bytes = sum(p.stat().st_size for p in (tmp / f"replica-{megabytes}").rglob("*") if p.is_file())
    print(
        f"\n{megabytes} MB: {size:,} bytes, {rows:,} journal rows (built in {time.perf_counter() - began:.0f} s); "
        f"first upload {upload:.2f} s, replica {replica_bytes:,} bytes"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMSD_")}
    env.update(OMSD_DB=str(db), OMSD_REPLICA=replica)
    copies, restores, checked = [], [], []
    for n in range(repeat):
        out = tmp / f"out-{n}.db"
        copies.append(copy(db, out))
        out.unlink()
        restores.append(timed([str(binary), "restore", "-config", str(layout.config), "-o", str(out), str(db)]))
        out.unlink()
        checked.append(timed([sys.executable, "-m", "omsd.daemon", "restore", "--output", str(out)], env=env))
        out.unlink()
    print(f"  baseline, copy the file:      {summary(copies)}")
    print(f"  litestream restore:           {summary(restores)}")
    print(f"  omsd restore (with checks):   {summary(checked)}")


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="omsd-restore-bench-", dir=args.dir) as tmp:
        for megabytes in args.sizes:
            await one_size(megabytes, args.repeat, Path(tmp))
    print(f"\nload average {os.getloadavg()}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--sizes", type=lambda v: [int(x) for x in v.split(",")], default=[100, 1000], help="MB, e.g. 100,1000"
    )
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dir", default=None, help="where to work (default: the system's temporary folder)")
    asyncio.run(main(p.parse_args()))
