"""The relay in a fleet: one connector URL hears many accounts, and can tell them apart."""

from __future__ import annotations

from datetime import UTC, datetime

from pydantic import SecretStr
from standardwebhooks import Webhook

from omsd.daemon.relay.webhooks import endpoints
from omsd.state.store.outcomes import OutcomeRow

SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def outcome() -> OutcomeRow:
    at = datetime(2026, 11, 1, tzinfo=UTC)
    return OutcomeRow(7, "118.approval.confirmed.MKP-1-01", "approval.confirmed", at, "MKP-1-01", "1", {})


def test_a_fleet_accounts_event_names_its_account_and_its_id_is_the_accounts() -> None:
    """The same outcome of two accounts: two bodies naming their account, two ids (a receiver
    deduplicates by id), each signed; one account alone sends what it always did."""
    requests = [
        endpoints(
            relay_url="https://c.example/hooks", relay_vtex_url=None, secret=SecretStr(SECRET), account=a, scoped=True
        )[0].request(outcome())
        for a in ("alpha", "beta")
    ]
    bodies = [Webhook(SECRET).verify(r.body, r.headers) for r in requests]
    assert [b["account"] for b in bodies] == ["alpha", "beta"]
    assert [r.headers["webhook-id"] for r in requests] == [b["id"] for b in bodies]
    assert bodies[0]["id"] == "alpha:118.approval.confirmed.MKP-1-01" != bodies[1]["id"]
    [alone] = endpoints(
        relay_url="https://c.example/hooks", relay_vtex_url=None, secret=SecretStr(SECRET), account="alpha"
    )
    single = alone.request(outcome())
    body = Webhook(SECRET).verify(single.body, single.headers)
    assert body["id"] == "118.approval.confirmed.MKP-1-01" and "account" not in body
