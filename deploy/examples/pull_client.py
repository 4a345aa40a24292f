"""A connector's loop over omsd's outcome stream (GET /v1/events, long poll).

It resumes from the last seq it handled (kept in a file: survive restarts of either side),
handles each event (here: prints it), and saves the seq after handling it, so an event is
handled at least once and in order. An event's `id` is stable: dedupe on it if handling
twice matters. On 410 Gone (the cursor is older than omsd's retention, or past the end
of a database restored to an older copy) it says so and resumes after `resume_after`
(the oldest event kept, or the last one there is).

    OMSD_URL=http://127.0.0.1:8787 OMSD_API_TOKEN=... python pull_client.py [--cursor FILE] [--until-idle]
                                                                          [--account NAME]

In a fleet (one omsd, many seller accounts) each account has its own stream and its own
seqs: run one loop per account, `--account NAME`, each with its own cursor file.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import aiohttp


def handle(event: dict[str, Any]) -> None:
    """The connector's business: tell the marketplace, update its own order, ..."""
    print(f"{event['seq']} {event['type']} {event['order_id'] or event['marketplace_order_id']}", flush=True)


def load_cursor(path: Path) -> int:
    return int(path.read_text()) if path.exists() else 0


def save_cursor(path: Path, seq: int) -> None:
    path.write_text(str(seq))  # a real connector keeps it in its own database, with what it did


async def main(url: str, token: str, cursor_file: Path, until_idle: bool, account: str | None = None) -> None:
    after = load_cursor(cursor_file)
    events = f"{url}/v1/accounts/{account}/events" if account else f"{url}/v1/events"
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(headers=headers) as http:
        while True:
            params = {"after": str(after), "limit": "500", "wait": "1" if until_idle else "30"}
            async with http.get(events, params=params, timeout=aiohttp.ClientTimeout(total=60)) as resp:
                body = await resp.json()
                if resp.status == 410:
                    print(f"events after {after} are gone: resuming after {body['resume_after']}", file=sys.stderr)
                    after = body["resume_after"]
                    continue
                resp.raise_for_status()
            for event in body["events"]:
                handle(event)
                save_cursor(cursor_file, event["seq"])  # handled: never asked for again
            after = body["next"]
            if until_idle and not body["events"]:
                return


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cursor", type=Path, default=Path("omsd-events.cursor"))
    parser.add_argument("--until-idle", action="store_true", help="stop after a second with nothing new")
    parser.add_argument("--account", help="in a fleet: the seller account whose events to read")
    args = parser.parse_args()
    url = os.environ.get("OMSD_URL", "http://127.0.0.1:8787").rstrip("/")
    asyncio.run(main(url, os.environ["OMSD_API_TOKEN"], args.cursor, args.until_idle, args.account))
