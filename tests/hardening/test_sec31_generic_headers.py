"""A generic upstream's client headers, what is left from stop 30: the audit record names the
headers douane dropped (names only, bounded, scrubbed, escaped: the client chose them), and a
value it forwards is read for secrets as the policy reads a prompt, the entropy bar too (no rule
of an operator's API says what a value is). Through a real gateway."""

from __future__ import annotations

import base64
import json

import pytest

from tests.hardening.conftest import assert_refused
from tests.hardening.test_review_forwarding import raw
from tests.hardening.test_sec30_generic_forwarding import AWS, KEY, PATH, gw, post  # noqa: F401

# a random token of no known format (a key of an internal service): the policy's entropy bar
OPAQUE = "a8Kq2LmZ9xP4vR7tW1yB3nC6dF0gH5jS"
NAME_KEY = "sk-proj-" + "Tn8Vw3Xy6Zb1" * 3


def test_the_dropped_headers_are_named_in_the_audit_record(gw, llm, token):  # noqa: F811
    resp = post(gw, token, **{"x-tenant": "acme", "cookie": "sid=1", "traceparent": "00-ab-01",
                              "x-custom-switch": "on", "X-Forwarded-For": "10.0.0.1"})
    assert resp.status_code == 200, resp.text[:300]
    record = gw.audit_record(resp.headers["x-douane-decision-id"])
    dropped = record["dropped_headers"]
    assert set(dropped["names"]) >= {"cookie", "traceparent", "x-custom-switch",
                                     "x-forwarded-for"}, dropped
    assert "x-tenant" not in dropped["names"] and "content-type" not in dropped["names"]
    assert dropped["count"] == len(dropped["names"])
    assert "sid=1" not in json.dumps(record)  # names, never values


def test_many_long_dropped_names_are_bounded_and_scrubbed(gw, llm, token, secrets):  # noqa: F811
    """200 headers, names of 155 characters, one a key: the record keeps 32 names of at most a
    few dozen characters and the count (the client's authorization and connection too); the key
    is redacted."""
    secrets.add(NAME_KEY)
    body = json.dumps({"prompt": "hello"}).encode()
    head = [b"POST " + PATH.encode() + b" HTTP/1.1", b"Host: x", b"Connection: close",
            b"Authorization: Bearer " + token.encode(), b"Content-Type: application/json",
            b"Content-Length: " + str(len(body)).encode(), NAME_KEY.encode() + b": 1"]
    head += [b"x-" + b"%03d" % i + b"a" * 150 + b": v" for i in range(200)]
    resp = raw(gw, b"\r\n".join(head) + b"\r\n", body)
    assert resp.status_code == 200, resp.text[:300]
    record = gw.audit_record(resp.headers["x-douane-decision-id"])
    dropped = record["dropped_headers"]
    assert dropped["count"] == 203 and len(dropped["names"]) == 32, dropped["count"]
    assert all(len(n) < 160 for n in dropped["names"]), max(map(len, dropped["names"]))
    assert NAME_KEY.lower() not in json.dumps(record) and NAME_KEY not in json.dumps(record)
    assert len(json.dumps(dropped)) < 32 * 200


@pytest.mark.parametrize("value", [OPAQUE, f"Bearer {OPAQUE}",
                                   base64.b64encode(KEY.encode()).decode(),
                                   KEY.encode().hex(), "acme%20" + AWS.replace("A", "%41")],
                         ids=["opaque", "bearer-opaque", "base64-key", "hex-key", "percent-key"])
def test_a_forwarded_value_holding_a_secret_in_any_form_is_refused(
        gw, llm, token, secrets, value):  # noqa: F811
    """The entropy bar as on a prompt (fails before), and the catalogue's keys in every encoding
    it reads (already refused at stop 30: kept as a guard)."""
    secrets.update({OPAQUE, KEY, AWS})
    before = len(llm.requests)
    record = assert_refused(gw, llm, before, post(gw, token, **{"x-tenant": value}), 403)
    reason = record["reasons"][0]
    assert reason["rule"] == "route.header" and "x-tenant" in reason["message"] and \
        "detector.secret." in reason["message"], reason
    assert OPAQUE not in json.dumps(record)


@pytest.mark.parametrize("value", ["550e8400-e29b-41d4-a716-446655440000",
                                   "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                                   "req_8f3a9c2b1d4e5f6a7b8c9d0e1f2a3b4c", "tenant-42"])
def test_request_ids_and_plain_values_go_on(gw, llm, token, value):  # noqa: F811
    before = len(llm.requests)
    resp = post(gw, token, **{"x-request-id": value})
    assert resp.status_code == 200, resp.text[:300]
    assert len(llm.requests) == before + 1 and llm.requests[-1].headers["x-request-id"] == value
