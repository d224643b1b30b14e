"""Long-lived connections (red team, stop 27): what a token allowed when a connection opened is
not allowed for ever after. A WebSocket session (OpenAI Realtime) is one upgrade, authenticated
once; every message on it after that is a new prompt to the model with the org's key."""

from __future__ import annotations

import json
import time

import pytest

from tests.test_websocket_e2e import connect, item, realtime_gateway


@pytest.fixture(scope="module")
def setup(issuer, tmp_path_factory):
    yield from realtime_gateway(issuer, tmp_path_factory.mktemp("long-lived"),
                                identity={"issuers": [{"issuer": issuer.url,
                                                       "audience": "douane-tests"}],
                                          "leeway_seconds": 0})


def test_a_websocket_session_ends_with_its_token(setup, issuer, secrets):
    """A session opened with a token valid 3 more seconds went on taking prompts (and passing
    them upstream with the org's key) after it expired, for as long as the client kept it open:
    a user removed from the IdP, or a stolen token past its lifetime, kept the model. Now the
    first message after the token's expiry ends the session with the API's error event."""
    gw, upstream = setup
    token = issuer.mint("alice@corp.example", ["engineering"], exp=int(time.time()) + 3)
    secrets.add(token)
    client = connect(gw, token)
    assert client.status == 101
    client.send(item("What is the capital of France?"))
    assert client.receive()["delta"] == upstream.reply
    before = len(upstream.received)
    time.sleep(4)
    client.send(item("And of Spain?"))
    error = client.receive()
    assert error is not None and error["type"] == "error", error
    assert "expired" in error["error"]["message"]
    assert len(upstream.received) == before
    records = gw.audit_where(lambda r: r.get("event") == "websocket_message"
                             and r["decision_id"] == error["event_id"])
    assert records[0]["reasons"][0]["rule"] == "identity.expired", json.dumps(records[0])
    client.close()
