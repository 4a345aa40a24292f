"""Each request checked against VTEX's OpenAPI files and the prose rules around them
(doc §7, §1.2, §1.4, §2.1, §3.1, §3.6). A check returns the problem in words, or None."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

RETENTION_MIN_S = 345600  # §1.4: 4 days
RETENTION_MAX_S = 1209600  # §1.4: 14 days
MAXLOT_MAX = 10  # §1.2
STATUS_UPDATE_FIELDS = ("marketplaceOrderId", "marketplaceOrderStatus", "connectorName", "connectorEndpoint")
MARKETPLACE_ORDER_STATUSES = ("new", "approved")  # §3.1: the schema's enum is lower-case
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def check_credentials(request: web.Request, app_key: str, app_token: str) -> bool:
    """§0: the AppKey/AppToken header pair, both together."""
    return (
        request.headers.get("X-VTEX-API-AppKey") == app_key and request.headers.get("X-VTEX-API-AppToken") == app_token
    )


def check_json_headers(request: web.Request) -> str | None:
    """§0, §7: every operation declares Accept and Content-Type application/json as required."""
    for name in ("Accept", "Content-Type"):
        if "application/json" not in request.headers.get(name, ""):
            return f"header {name} missing"
    return None


def check_maxlot(text: str | None) -> str | None:
    """§1.2, §7: `maxlot` is required and at most 10."""
    if text is None:
        return "without maxlot"
    try:
        maxlot = int(text)
    except ValueError:
        maxlot = 0
    if not 1 <= maxlot <= MAXLOT_MAX:
        return f"maxlot={text}"
    return None


def check_filter(f: Any) -> tuple[str | None, int]:
    """§1.4, §2.1: FromWorkflow needs a status list, FromOrders an expression and
    disableSingleFire; mixing the two kinds' fields is 409."""
    if not isinstance(f, dict) or f.get("type") not in ("FromWorkflow", "FromOrders"):
        return "filter.type must be FromWorkflow or FromOrders", 400
    if f["type"] == "FromWorkflow":
        if "expression" in f or "disableSingleFire" in f:
            return "FromWorkflow cannot carry expression/disableSingleFire", 409
        if not isinstance(f.get("status"), list) or not f["status"]:
            return "FromWorkflow needs a non-empty status list", 400
        return None, 200
    if "status" in f:
        return "FromOrders cannot carry status", 409
    if not isinstance(f.get("expression"), str) or not isinstance(f.get("disableSingleFire"), bool):
        return "FromOrders needs expression and disableSingleFire", 400
    return None, 200


def validate_feed_config(body: Any) -> tuple[str | None, int]:
    """The rules of VTEX's feed configuration (schema and prose, §1.4). Returns (problem, status)."""
    if not isinstance(body, dict) or "filter" not in body or "queue" not in body:
        return "filter and queue are required", 400
    problem, status = check_filter(body["filter"])
    if problem:
        return problem, status
    q = body["queue"]
    if not isinstance(q, dict) or not isinstance(q.get("visibilityTimeoutInSeconds"), int):
        return "queue.visibilityTimeoutInSeconds is required", 400
    if "MessageRetentionPeriodInSeconds" not in q:
        return "queue.MessageRetentionPeriodInSeconds is required (schema spelling)", 400
    retention = q["MessageRetentionPeriodInSeconds"]
    if not isinstance(retention, int) or not RETENTION_MIN_S <= retention <= RETENTION_MAX_S:
        return f"MessageRetentionPeriodInSeconds must be within {RETENTION_MIN_S}..{RETENTION_MAX_S}", 400
    return None, 200


def validate_hook_config(body: Any) -> tuple[str | None, int]:
    """The rules of VTEX's hook configuration (§2.1): the feed's filter rules, an https URL
    (plain http only on loopback, for a local daemon), headers as an object."""
    if not isinstance(body, dict) or "filter" not in body or "hook" not in body:
        return "filter and hook are required", 400
    problem, status = check_filter(body["filter"])
    if problem:
        return problem, status
    hook = body["hook"]
    if not isinstance(hook, dict) or not isinstance(hook.get("url"), str) or not isinstance(hook.get("headers"), dict):
        return "hook.url and hook.headers are required", 400
    parts = urlsplit(hook["url"])
    loopback = parts.hostname in LOOPBACK_HOSTS
    if parts.scheme != "https" and not (parts.scheme == "http" and loopback):
        return "Only https scheme is accepted", 400
    return None, 200


def validate_status_update(body: Any, an: str | None, account: str) -> str | None:
    """UpdateOrderStatusRequest (§3.1, §7): all four fields required; status lower-case;
    the connector endpoint carries no query string; `an`, when given, is this account."""
    if not isinstance(body, dict):
        return "body must be an object"
    for name in STATUS_UPDATE_FIELDS:
        if not isinstance(body.get(name), str) or not body[name]:
            return f"{name} is required"
    if body["marketplaceOrderStatus"] not in MARKETPLACE_ORDER_STATUSES:
        return "marketplaceOrderStatus must be new or approved"
    parts = urlsplit(body["connectorEndpoint"])
    if parts.query or parts.scheme not in ("http", "https"):
        return "connectorEndpoint must be a URL without a query string"
    if an is not None and an != account:
        return f"an={an} is not this account"
    unknown = set(body) - set(STATUS_UPDATE_FIELDS)
    if unknown:
        return f"unexpected fields {sorted(unknown)}"
    return None
