"""WebSockets through a real mitmdump: refused unless the upstream allows them; when allowed
(OpenAI Realtime style), every message in both directions passes the deny rules, and what cannot be
inspected or is blocked never arrives."""

from __future__ import annotations

import json

import pytest

from tests.conftest import UPSTREAM_KEY
from tests.support.gateway import Gateway, base_config
from tests.support.ws_upstream import RealtimeUpstream, WsClient

GRANTS = """\
version: 1
default:
  upstreams:
    realtime: {}
rules:
  - {id: deny.codename, literal: "project nightingale", score: 90}
  - {id: deny.answer_hosts, regex: "\\\\b[a-z0-9-]+\\\\.corp\\\\.internal\\\\b", in: [completion], score: 90}
detectors: {secrets: true, injection: false}
thresholds: {hold: 50, block: 80}
"""


def realtime_gateway(issuer, work, **extra):
    """A gateway in front of a RealtimeUpstream whose upstream allows WebSocket."""
    upstream = RealtimeUpstream()
    (work / "grants.yaml").write_text(GRANTS)
    config = base_config(issuer.url, upstream.url + "/v1/realtime",
                         policy={"files": [str(work / "grants.yaml")]}, **extra)
    config["upstreams"]["realtime"] = config["upstreams"].pop("llm")
    config["upstreams"]["realtime"]["allow_websocket"] = True
    with Gateway(config, mode=f"reverse:{upstream.url}",
                 env={"DOUANE_TEST_UPSTREAM_KEY": UPSTREAM_KEY}, workdir=work / "gw") as gw:
        yield gw, upstream
    upstream.close()


@pytest.fixture(scope="module")
def setup(issuer, tmp_path_factory):
    yield from realtime_gateway(issuer, tmp_path_factory.mktemp("websocket"))


def connect(gw: Gateway, token: str) -> WsClient:
    return WsClient(gw.port, "/v1/realtime?model=gpt-realtime",
                    {"authorization": f"Bearer {token}"})


def item(text: str) -> str:
    return json.dumps({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}})


def test_allowed_messages_flow_both_ways_with_the_injected_key(setup, issuer):
    gw, upstream = setup
    client = connect(gw, issuer.mint("alice@corp.example", ["engineering"]))
    assert client.status == 101
    client.send(item("What is the capital of France?"))
    assert client.receive()["delta"] == upstream.reply
    assert "What is the capital of France?" in upstream.received[-1]
    assert upstream.headers[-1]["authorization"] == f"Bearer {UPSTREAM_KEY}"
    client.close()


def test_a_denied_prompt_never_reaches_the_upstream_and_the_connection_is_cut(setup, issuer):
    gw, upstream = setup
    client = connect(gw, issuer.mint("alice@corp.example", ["engineering"]))
    before = len(upstream.received)
    client.send(item("Tell me about Project  NIGHTINGALE"))  # normalised before matching
    error = client.receive()
    assert error["type"] == "error" and error["error"]["code"] == "policy_denied"
    decision = error["event_id"]
    assert decision in error["error"]["message"] and "deny.codename" in error["error"]["message"]
    client.send(item("and now something harmless"))  # nothing passes a cut connection
    assert client.receive(timeout=1) is None
    assert len(upstream.received) == before
    records = [r for r in gw.audit_records(wait_for=1)
               if r.get("event") == "websocket_message" and r["decision_id"] == decision]
    assert records and records[0]["action"] == "block"
    assert records[0]["reasons"][0]["rule"] == "policy.websocket"
    client.close()


def test_a_denied_answer_never_reaches_the_client(setup, issuer):
    gw, upstream = setup
    upstream.reply = "Connect to billing-db.corp.internal with the admin account."
    try:
        client = connect(gw, issuer.mint("alice@corp.example", ["engineering"]))
        client.send(item("What is the deploy key?"))
        error = client.receive()
        assert error["type"] == "error", error
        assert "corp.internal" not in json.dumps(error)
        assert "deny.answer_hosts" in error["error"]["message"]
        client.close()
    finally:
        upstream.reply = "Hello over the WebSocket."


@pytest.mark.parametrize("message", [b"\x00\x01binary audio", "not json at all"])
def test_messages_that_cannot_be_inspected_are_not_sent(setup, issuer, message):
    gw, upstream = setup
    client = connect(gw, issuer.mint("alice@corp.example", ["engineering"]))
    before = len(upstream.received)
    client.send(message)
    error = client.receive()
    assert error["type"] == "error" and error["error"]["code"] == "policy_denied"
    assert len(upstream.received) == before
    client.close()


def test_without_a_token_the_upgrade_is_refused(setup):
    gw, upstream = setup
    before = len(upstream.headers)
    client = WsClient(gw.port, "/v1/realtime", {})
    assert client.status == 401
    assert len(upstream.headers) == before
    client.close()


@pytest.fixture(scope="module")
def masked(issuer, tmp_path_factory):
    """The same upstream behind a gateway that masks answers (auditors exempt)."""
    yield from realtime_gateway(issuer, tmp_path_factory.mktemp("websocket-masked"),
                                masking={"workers": 1, "entities": ["EMAIL_ADDRESS"],
                                         "exempt_groups": ["auditors"], "timeout_seconds": 120})


def test_while_answers_are_masked_the_upgrade_is_refused_but_for_exempt_groups(masked, issuer):
    """Masking reads no WebSocket message: a Realtime answer would leave unmasked, so the upgrade
    is refused (nothing reaches the upstream, the audit names why); exempt groups, whose answers
    are never masked, connect."""
    gw, upstream = masked
    client = WsClient(gw.port, "/v1/realtime?model=gpt-realtime",
                      {"authorization": f"Bearer {issuer.mint('alice@corp.example', ['engineering'])}"})
    assert client.status == 403
    client.close()
    assert upstream.headers == []
    [record] = gw.audit_where(lambda r: any(x.get("rule") == "protocol.websocket_unmasked"
                                            for x in r.get("reasons", [])))
    assert record["action"] == "refuse" and record["user"] == "alice@corp.example"
    client = WsClient(gw.port, "/v1/realtime?model=gpt-realtime",
                      {"authorization": f"Bearer {issuer.mint('ann@corp.example', ['auditors'])}"})
    assert client.status == 101
    client.send(item("hello"))
    assert client.receive()["delta"] == upstream.reply
    client.close()
