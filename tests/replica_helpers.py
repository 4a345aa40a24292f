"""What the replication tests share: a replica URL in a test's folder, a restore of it, and
an S3 endpoint on loopback (moto), when it can run here."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omsd.daemon.ops.litestream import Layout, find_binary, restore
from omsd.state.store import Store

S3_KEYS = {"LITESTREAM_ACCESS_KEY_ID": "omsd-test", "LITESTREAM_SECRET_ACCESS_KEY": "omsd-test-secret"}


def file_replica(folder: Path) -> str:
    return f"file://{folder.absolute()}"


async def restored_copy(db: Path, replica: str, out: Path) -> Path:
    """The replica's latest state, restored into `out` (what a lost disk leaves)."""
    layout = Layout.of(out.with_name("restore-source.db"))
    await asyncio.to_thread(layout.write_config, replica)
    got = await restore(find_binary(), layout, out)
    assert got is not None, "the replica holds nothing"
    return out


async def intents_in(db: Path) -> set[str]:
    """The marketplace order ids of the approval intents a database's journal holds."""
    async with await Store.open_readonly(db) as store:
        rows = await store.journal.after(0, limit=1_000_000)
    return {
        json.loads(r.payload)["marketplace_order_id"] for r in rows if r.kind in ("intent_recorded", "intent_received")
    }


@contextlib.contextmanager
def moto_s3(bucket: str = "omsd-test") -> Iterator[str]:
    """An S3 endpoint on 127.0.0.1 (moto's ThreadedMotoServer) with `bucket`; its URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/{bucket}", method="PUT"), timeout=10).close()
        yield endpoint
    finally:
        server.stop()


def s3_replica(endpoint: str, path: str, bucket: str = "omsd-test") -> str:
    return f"s3://{bucket}/{path}?endpoint={endpoint}&region=us-east-1&forcePathStyle=true"


@contextlib.contextmanager
def s3_keys() -> Iterator[dict[str, Any]]:
    """The dummy S3 credentials in this process's environment (Litestream's children read them)."""
    saved = {k: os.environ.get(k) for k in S3_KEYS}
    os.environ.update(S3_KEYS)
    try:
        yield dict(S3_KEYS)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
