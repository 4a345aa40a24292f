"""A connector's receiver for omsd's relay (OMSD_RELAY_URL): verify, deduplicate, handle.

omsd signs each POST per Standard Webhooks (webhook-id, webhook-timestamp,
webhook-signature, secret OMSD_RELAY_SECRET). Answer 2xx once the event is handled; any
other answer (or none) and omsd sends it again later, with the same webhook-id, in order
for that order. 410 tells omsd to stop sending (an operator re-enables it).

    RELAY_SECRET=whsec_... python webhook_receiver.py [--listen 127.0.0.1:9000]
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from aiohttp import web
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

SEEN = web.AppKey("seen", set[str])
HOOK = web.AppKey("hook", Webhook)


def handle(event: dict[str, Any]) -> None:
    """The connector's business (here: print it)."""
    print(f"{event['seq']} {event['type']} {event['order_id'] or event['marketplace_order_id']}", flush=True)


async def receive(request: web.Request) -> web.Response:
    body = await request.text()
    try:
        event = request.app[HOOK].verify(body, dict(request.headers))
    except (WebhookVerificationError, ValueError):
        return web.Response(status=401, text="bad signature")
    seen = request.app[SEEN]
    if request.headers["webhook-id"] not in seen:  # at least once: a retry may repeat one
        handle(event)
        seen.add(request.headers["webhook-id"])  # a real connector keeps this in its database
    return web.Response(status=204)


def app(secret: str) -> web.Application:
    application = web.Application()
    application[HOOK] = Webhook(secret)
    application[SEEN] = set()
    application.router.add_post("/omsd/events", receive)
    return application


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:9000")
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    web.run_app(app(os.environ["RELAY_SECRET"]), host=host, port=int(port), print=None)
