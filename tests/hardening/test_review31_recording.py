"""Review, stop 31: the recording writer's values "seen clean" (652ff08: a body's short values
found clean are not scanned again, `untrusted.clean`). Values are tested in one scan of their
join: a newline joins two values into one wrapped base64 run, which decodes to other bytes (a
key encoded in one value, then a value of base64 letters, read as no key), and the value holding
the key was then remembered clean, recorded as sent in every later flow too. The unit cases fail
before the join by `secrets.any_matches`; through the gateway the policy's parts redact it too."""

from __future__ import annotations

import base64
import time

import httpx
import pytest

from douane import secrets, untrusted
from douane.recording import writer
from tests.hardening.conftest import recording_gateway
from tests.hardening.test_evasion import _recordings, chat

KEY = "AKIAIOSFODNN7EXAMPLE"
ENCODED = base64.b64encode(KEY.encode()).decode().rstrip("=")  # (one alone: a key)
AFTER = "ZZZZZZZZZZZZ"  # base64 letters: read after ENCODED across a newline, no key


def test_a_key_encoded_in_one_value_is_no_clean_value():
    assert secrets.find(ENCODED)
    assert not untrusted.clean([ENCODED, AFTER], False, writer.KNOWN_CHARS)
    assert ENCODED not in untrusted._clean
    assert untrusted.clean([AFTER, "gpt-4o-mini", "assistant"], False)  # (clean ones are)


@pytest.mark.parametrize("body", [f'{{"a": "{ENCODED}", "b": "{AFTER}"}}',
                                  f'{{"a": "{ENCODED}"}}'])
def test_a_key_encoded_in_one_value_is_redacted_in_the_body(body):
    untrusted.clean([ENCODED, AFTER], False, writer.KNOWN_CHARS)  # (seen before)
    assert ENCODED not in writer._redacted(body, "application/json")


@pytest.fixture(scope="module")
def gw(issuer, llm, tmp_path_factory):
    with recording_gateway(issuer, llm, tmp_path_factory.mktemp("review31_record")) as gateway:
        yield gateway


def test_a_key_encoded_before_base64_letters_is_in_no_recording(gw, llm, issuer, secrets):
    token = issuer.mint("remy@corp.example", ["engineering"])
    secrets.add(token)
    secrets.add(ENCODED)
    before = len(llm.requests)
    body = {**chat("hello"), "metadata": {"a": ENCODED, "b": AFTER}}
    resp = httpx.post(gw.url + "/v1/chat/completions", json=body,
                      headers={"authorization": f"Bearer {token}"})
    assert resp.status_code == 403, resp.text
    assert len(llm.requests) == before
    record = gw.audit_record(resp.headers["x-douane-decision-id"])
    assert record["reasons"][0]["rule"].startswith("detector.secret."), record
    deadline = time.monotonic() + 30
    while not any(AFTER.encode() in p.read_bytes() for p in _recordings(gw)):
        assert time.monotonic() < deadline, "the refused request was not recorded"
        time.sleep(0.2)
    assert not any(ENCODED.encode() in p.read_bytes() for p in _recordings(gw))


def test_a_key_encoded_outside_the_strings_of_a_body_read_unread_is_redacted():
    body = f'{ENCODED}"x"{AFTER}'  # (typed JSON, refused unread: its text outside quotes read)
    assert ENCODED not in writer._redacted(body, "application/json", frozenset(), True)
