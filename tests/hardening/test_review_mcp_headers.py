"""Review of stop 29: an MCP upstream's allowed headers (`routing.MCP_HEADERS`) folded over
several lines (obs-fold) went on folded, as a model upstream's did (`test_review_forwarding`)."""

from __future__ import annotations

import base64
import json
import socket

import pytest

from tests.hardening.conftest import assert_refused
from tests.hardening.test_mcp_side_doors import VERSION, setup  # noqa: F401
from tests.hardening.test_review_forwarding import read_answer


@pytest.mark.parametrize("folded", [
    b"accept: application/json, text/event-stream\r\n x-forwarded-user: admin\r\n",
    b"accept: application/json, text/event-stream\r\n\tauthorization: Bearer other\r\n"])
def test_a_folded_mcp_header_is_refused(setup, folded):  # noqa: F811
    gw, _, evil, staff = setup
    evil.canned["/rpc"] = ("application/json", json.dumps(
        {"jsonrpc": "2.0", "id": 1, "result": {"tools": []}}).encode())
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}).encode()
    auth = base64.b64encode(f"u:{staff}".encode())
    head = (f"POST {evil.url}/rpc HTTP/1.1\r\nHost: {evil.url.split('//')[1]}\r\n".encode() +
            b"Proxy-Authorization: Basic " + auth + b"\r\nconnection: close\r\ncontent-type: application/json\r\n"
            b"mcp-protocol-version: " + VERSION.encode() + b"\r\n" + folded +
            b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    before = len(evil.requests)
    with socket.create_connection(("127.0.0.1", gw.port), timeout=30) as s:
        s.sendall(head)
        resp = read_answer(s)
    record = assert_refused(gw, evil, before, resp, 400, 403)
    assert record["reasons"][0]["rule"] == "route.header", record
