"""An HTTP/2 connection ended for breaking the protocol at a request's head (an upper-case or
connection-specific header, a pseudo-header twice, a CONNECT inside the tunnel): its audit
record names the method and path of that head (h2 decoded it before refusing it), bounded and
escaped as every record's values are; one ended by what no head carried has none. Raw frames
through a real gateway's CONNECT tunnel, the upstream receiving nothing."""

from __future__ import annotations

import json
import re

import h2.errors
import h2.events
import pytest

from tests.hardening.test_sec30_http2_refusals import CHAT, Tunnel, gw  # noqa: F401

LONG = "/v1/" + "a" * 5000 + "\x1b[31m"


def ended_record(gw, tls_llm, token, headers: list[tuple[str, str]]) -> dict:  # noqa: F811
    before = len(tls_llm.requests)
    tunnel = Tunnel(gw, token, tls_llm.port)
    try:
        ended = tunnel.request(1, headers, CHAT)
    finally:
        tunnel.close()
    assert isinstance(ended, h2.events.ConnectionTerminated), ended
    assert ended.error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR
    found = re.search(rb"decision (dcn_[0-9a-f]+)", ended.additional_data or b"")
    assert found, ended.additional_data
    assert len(tls_llm.requests) == before
    record = gw.audit_record(found.group(1).decode())
    assert record["action"] == "refuse" and record["reasons"][0]["rule"] == "protocol.h2_error"
    return record


def head(path: str = "/v1/chat/completions", *extra: tuple[str, str]) -> list[tuple[str, str]]:
    return [(":method", "POST"), (":scheme", "https"), (":authority", "127.0.0.1"),
            (":path", path), *extra]


@pytest.mark.parametrize("headers, method, path", [
    (head("/v1/chat/completions?x=1", ("X-Upper", "1")), "POST", "/v1/chat/completions"),
    (head("/v1/files", ("connection", "keep-alive")), "POST", "/v1/files"),
    ([(":method", "DELETE"), (":method", "GET"), *head("/v1/models")[1:]], "DELETE",
     "/v1/models"),
    ([(":method", "CONNECT"), (":authority", "10.0.0.9:443")], "CONNECT", "10.0.0.9:443"),
], ids=["upper-case", "connection-specific", "pseudo-twice", "connect"])
def test_the_head_that_broke_the_connection_is_named(gw, tls_llm, token,  # noqa: F811
                                                     headers, method, path):
    record = ended_record(gw, tls_llm, token, headers)
    assert (record.get("method"), record.get("path")) == (method, path), record


def test_a_long_path_with_escape_codes_is_bounded_and_escaped(gw, tls_llm, token):  # noqa: F811
    record = ended_record(gw, tls_llm, token, head(LONG, ("X-Upper", "1")))
    assert record["method"] == "POST" and record["path"].startswith("/v1/aaaa"), record
    assert len(record["path"]) < 1200 and "\x1b" not in json.dumps(record)


def test_an_error_no_head_carried_names_none(gw, tls_llm, token):  # noqa: F811
    """A DATA frame on a stream never opened, after a request served on the same connection:
    the record names no method or path (not the earlier request's)."""
    tunnel = Tunnel(gw, token, tls_llm.port)
    try:
        status, _, body = tunnel.request(1, head("/v1/chat/completions",
                                                 ("content-type", "application/json")), CHAT)
        assert status == 200, body[:300]
        before = len(tls_llm.requests)
        tunnel.tls.sendall(b"\x00\x00\x02\x00\x01\x00\x00\x00\x05hi")  # DATA, END_STREAM, 5
        ended = tunnel.answer(5)
    finally:
        tunnel.close()
    assert isinstance(ended, h2.events.ConnectionTerminated), ended
    found = re.search(rb"decision (dcn_[0-9a-f]+)", ended.additional_data or b"")
    assert found, ended.additional_data
    record = gw.audit_record(found.group(1).decode())
    assert record["reasons"][0]["rule"] == "protocol.h2_error", record
    assert "method" not in record and "path" not in record, record
    assert len(tls_llm.requests) == before
