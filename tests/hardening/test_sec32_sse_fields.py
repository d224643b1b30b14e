"""Security, stop 32: an SSE event's `event:` and `id:` fields reach the client beside its data
lines, yet only the data was read: a key or a denied phrase rode through in them, masked nowhere
and recorded as sent. They are now read as the data is (the secrets catalogue; the deny rules
for completions, or tool results on MCP), bounded (FIELD_CHARS), each distinct value once; a
`retry:` that is not a number is dropped. A hit ends the stream with the API's error event,
audited under the decision id it names. Through a real gateway, recording on."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from douane.protocols.streams import FIELD_CHARS
from tests.hardening.conftest import DENIED, recording_gateway
from tests.hardening.test_evasion import _recordings
from tests.support.upstream import FakeUpstream

KEY = "AKIAQX7RZ2LMN4TB5KWE"
PATH = "/v1/chat/completions"


def chunk(text: str, *, event: str | None = None, id: str | None = None,
          retry: str | None = None) -> str:
    doc = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
           "model": "gpt-4o-mini", "choices": [{"index": 0, "delta": {"content": text},
                                                "finish_reason": None}]}
    head = "".join(f"{k}: {v}\n" for k, v in (("event", event), ("id", id), ("retry", retry))
                   if v is not None)
    return f"{head}data: {json.dumps(doc)}\n\n"


def stream(*events: str) -> bytes:
    return ("".join(events) + "data: [DONE]\n\n").encode()


@pytest.fixture(scope="module")
def upstream():
    up = FakeUpstream()
    yield up
    up.close()


@pytest.fixture(scope="module")
def gw(issuer, upstream, tmp_path_factory):
    with recording_gateway(issuer, upstream, tmp_path_factory.mktemp("sec32sse")) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def token(issuer, secrets):
    token = issuer.mint("sse@corp.example", ["engineering"])
    secrets.add(token)
    return token


def ask(gw, upstream, token: str, body: bytes) -> httpx.Response:
    upstream.canned[PATH] = ("text/event-stream", body)
    try:
        return httpx.post(gw.url + PATH, timeout=60, headers={"authorization": f"Bearer {token}"},
                          json={"model": "gpt-4o-mini", "stream": True,
                                "messages": [{"role": "user", "content": "hello"}]})
    finally:
        upstream.canned.pop(PATH, None)


def recorded(gw, decision_id: str) -> bytes:
    deadline = time.monotonic() + 30
    while True:
        data = b"".join(p.read_bytes() for p in _recordings(gw))
        if decision_id.encode() in data:
            return data
        assert time.monotonic() < deadline, "not recorded"
        time.sleep(0.2)


CASES = {  # what rides in a field; the rule its record names
    "a key in id": (dict(id=KEY), "protocol.stream_ended", KEY),
    "a key in event": (dict(event=f"delta-{KEY}"), "protocol.stream_ended", KEY),
    "the denied phrase in event": (dict(event=DENIED), "deny.codename", DENIED),
    "the denied phrase in id": (dict(id=DENIED), "deny.codename", DENIED),
    "an id past the bound": (dict(id="i" * (FIELD_CHARS + 1)), "protocol.stream_ended",
                             "i" * (FIELD_CHARS + 1)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_field_carrying_what_data_may_not_ends_the_stream(case, gw, upstream, token, secrets):
    """Before (0ba8e27): 200, the stream whole, the field as sent to the client and in the
    recording."""
    fields, rule, carried = CASES[case]
    secrets.add(KEY)
    resp = ask(gw, upstream, token, stream(chunk("Hello"), chunk(" there", **fields),
                                           chunk(" friend")))
    assert carried.encode() not in resp.content, resp.content[:400]
    assert b"friend" not in resp.content
    decision_id = resp.headers["x-douane-decision-id"]
    assert decision_id in resp.text and "douane_refusal" in resp.text, resp.text[-300:]
    record = gw.audit_record(decision_id)
    assert record["action"] in ("refuse", "block"), record
    assert any(r["rule"] == rule for r in record["reasons"]), record
    assert carried.encode() not in recorded(gw, decision_id)


def test_a_retry_that_is_not_a_number_is_dropped(gw, upstream, token, secrets):
    secrets.add(KEY)
    resp = ask(gw, upstream, token, stream(chunk("Hello", retry=KEY), chunk(" there", retry="3000")))
    assert resp.status_code == 200 and KEY.encode() not in resp.content
    assert b"retry: 3000" in resp.content and b"there" in resp.content


def test_ordinary_fields_pass(gw, upstream, token):
    """Event names and ids as providers and MCP servers send them, repeated each event."""
    events = [chunk(t, event="completion.chunk", id=f"7f3c2a9e-41b8-4d2f-9a61-0c5e8b2d4f17_{n}")
              for n, t in enumerate(["Hello", " there", " friend"])]
    resp = ask(gw, upstream, token, stream(*events))
    assert resp.status_code == 200 and "douane_refusal" not in resp.text, resp.text
    assert b"id: 7f3c2a9e-41b8-4d2f-9a61-0c5e8b2d4f17_2" in resp.content
    assert b"event: completion.chunk" in resp.content and b"friend" in resp.content
