"""Security, stop 33: the recording writer redacted a value by its shape alone (the secrets
catalogue), so a credential of no shape the catalogue knows (an opaque refresh token, a short
password, a client secret) under a key naming it (`refresh_token`, `password`, `clientSecret`,
`metadata.api_key`, nested anywhere, in a JSON text inside a string too) was recorded as sent.
A string value under a credential's name (`secrets.credential_key`) is now recorded as
`<SECRET:rule id>`, in request and answer bodies, SSE events, WebSocket messages, forms and
queries. Through a real gateway, recording on: the .mitm files do not hold the values."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from douane import secrets as catalogue
from douane.recording import writer
from tests.hardening.conftest import recording_gateway
from tests.hardening.test_evasion import _recordings

PATH = "/v1/chat/completions"
# no catalogue shape: read alone, none is a secret
REFRESH = "rt-plover-quiet-meadow"
PASSWORD = "Plover!blue"
CLIENT_SECRET = "cs-plover-lantern"
API_KEY = "ak-plover-harbour"
ACCESS = "at-plover-orchard"
ANSWER_SECRET = "as-plover-granite"
SENT = (REFRESH, PASSWORD, CLIENT_SECRET, API_KEY, ACCESS, ANSWER_SECRET)


@pytest.fixture(scope="module")
def gw(issuer, llm, tmp_path_factory):
    with recording_gateway(issuer, llm, tmp_path_factory.mktemp("sec33keys")) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def token(issuer, secrets):
    token = issuer.mint("keys@corp.example", ["engineering"])
    secrets.add(token)
    return token


def recorded(gw, decision_id: str) -> bytes:
    deadline = time.monotonic() + 30
    while True:
        data = b"".join(p.read_bytes() for p in _recordings(gw))
        if decision_id.encode() in data:
            return data
        assert time.monotonic() < deadline, "not recorded"
        time.sleep(0.2)


def test_none_of_the_values_has_a_catalogue_shape():
    """Else the test would pass without the names."""
    for value in SENT:
        assert not catalogue.find(value) and not catalogue.find(f"the value {value}")


def tool_call(arguments: dict) -> dict:
    return {"id": "call_1", "type": "function",
            "function": {"name": "login", "arguments": json.dumps(arguments)}}


def test_values_under_credential_names_are_not_recorded(gw, llm, token):
    """Before (c856cd1): each value in the .mitm file as sent."""
    answer = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
              "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                  "role": "assistant", "content": None,
                  "tool_calls": [tool_call({"user": "bob", "clientSecret": ANSWER_SECRET})]}}],
              "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
    llm.canned[PATH] = ("application/json", json.dumps(answer).encode())
    try:
        resp = httpx.post(gw.url + PATH, timeout=60, headers={"authorization": f"Bearer {token}"},
                          json={"model": "gpt-4o-mini", "max_tokens": 20,
                                "metadata": {"refresh_token": REFRESH, "api_key": API_KEY},
                                "messages": [
                                    {"role": "user", "content": "log me in"},
                                    {"role": "assistant", "content": None, "tool_calls": [
                                        tool_call({"password": PASSWORD,
                                                   "oauth": {"client_secret": CLIENT_SECRET,
                                                             "accessToken": ACCESS}})]},
                                    {"role": "tool", "tool_call_id": "call_1", "content": "ok"}]})
    finally:
        llm.canned.pop(PATH, None)
    assert resp.status_code == 200, resp.text[:300]
    assert ANSWER_SECRET in resp.text  # delivered: the recording is what changes
    assert all(v.encode() in llm.requests[-1].body for v in SENT[:-1])
    data = recorded(gw, resp.headers["x-douane-decision-id"])
    assert [v for v in SENT if v.encode() in data] == []
    assert b"<SECRET:detector.secret.credential>" in data
    assert b"<SECRET:detector.secret.password>" in data


def test_an_sse_event_s_credential_value_is_not_recorded(gw, llm, token):
    event = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
             "model": "gpt-4o-mini", "refresh_token": ANSWER_SECRET,
             "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]}
    body = f"data: {json.dumps(event)}\n\ndata: [DONE]\n\n".encode()
    llm.canned[PATH] = ("text/event-stream", body)
    try:
        resp = httpx.post(gw.url + PATH, timeout=60, headers={"authorization": f"Bearer {token}"},
                          json={"model": "gpt-4o-mini", "max_tokens": 20, "stream": True,
                                "messages": [{"role": "user", "content": "hello"}]})
    finally:
        llm.canned.pop(PATH, None)
    assert resp.status_code == 200, resp.text[:300]
    data = recorded(gw, resp.headers["x-douane-decision-id"])
    assert ANSWER_SECRET.encode() not in data and b"hi" in data


@pytest.mark.parametrize(("text", "kept"), [
    ('{"token": " Hello", "logprob": -0.1}', True),  # logprobs: a model's token
    ('{"max_tokens": 5, "prompt_cache_key": "user-42-session", "idempotency_key": "k-1"}', True),
    ('{"next_page_token": "pg-2", "progressToken": "p-9", "secret_name": "db"}', True),
    ('{"password": "${DB_PASSWORD}", "api_key": "<your key>", "refresh_token": ""}', True),
    ('{"password": "hunter2"}', False),
    ('{"a": [{"b": {"x-api-key": "short"}}]}', False),
    ('{"Authorization": "Basic Ym9iOnNlY3JldA"}', False),
])
def test_what_a_credential_name_is(text, kept):
    assert (writer._keyed(text) == text) is kept, writer._keyed(text)


def test_forms_and_queries():
    form = "grant_type=refresh_token&refresh_token=opaque1&client_secret=s%2Fx&scope=a"
    assert writer._redacted(form, "application/x-www-form-urlencoded") == (
        "grant_type=refresh_token&refresh_token=<SECRET:detector.secret.credential>"
        "&client_secret=<SECRET:detector.secret.credential>&scope=a")
    assert writer._form_keyed("q=1&password=pw") == "q=1&password=<SECRET:detector.secret.password>"


def test_bounded_depth():
    """JSON inside a string inside a string, `KEYED_DEPTH` deep; deeper is left (bounded)."""
    inner: object = {"password": "pw-1"}
    for _ in range(writer.KEYED_DEPTH):
        inner = {"args": json.dumps(inner)}
    assert "pw-1" not in writer._keyed(json.dumps(inner))
    deeper = {"args": json.dumps(inner)}
    assert writer._keyed(json.dumps(deeper)) == json.dumps(deeper)
