"""WebSocket sessions (red team, stop 27). A session (OpenAI Realtime) is one upgrade, authenticated
once; every message on it after that is a new prompt to the model with the org's key: what a
token allowed when it opened is not allowed for ever after, and what a session asks of the model
(a stored prompt, answers in speech) is held to the grant as a request's body is."""

from __future__ import annotations

import json
import time

import pytest

from tests.test_websocket_e2e import connect, item, realtime_gateway, stopped


@pytest.fixture(scope="module")
def setup(issuer, tmp_path_factory):
    yield from realtime_gateway(issuer, tmp_path_factory.mktemp("websocket-sessions"),
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


@pytest.mark.parametrize(("group", "message", "said"), [
    ("engineering", {"type": "session.update", "session": {"prompt": {"id": "pmpt_abc"}}},
     "stored prompt"),
    ("engineering", {"type": "response.create", "response": {"prompt": {"id": "pmpt_abc"}}},
     "stored prompt"),
    ("textonly", {"type": "session.update", "session": {"output_modalities": ["audio"]}},
     "images, audio and files"),
    ("textonly", {"type": "response.create", "response": {"modalities": ["text", "audio"]}},
     "images, audio and files"),
])
def test_what_a_session_asks_of_the_model_is_held_to_the_grant(setup, issuer, secrets, group,
                                                                message, said):
    """A stored prompt (its instructions and tools added upstream, unseen) and answers in speech
    (media) were refused in a request's body, not in a session's messages: both passed."""
    gw, upstream = setup
    token = issuer.mint("tess@corp.example", [group])
    secrets.add(token)
    client = connect(gw, token)
    assert client.status == 101
    before = len(upstream.received)
    client.send(json.dumps(message))
    assert said in stopped(client, upstream, before)["error"]["message"]
    client.close()
