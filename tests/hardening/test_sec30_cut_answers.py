"""An answer douane does not rewrite (not an SSE stream of a known API), cut by its upstream
mid-body: the client gets a whole provider-shaped failure naming a decision id, never a
truncated body or a half-closed connection, and the audit record says how it ended. Through a
real gateway, with upstreams cutting at several places and framings."""

from __future__ import annotations

import json
import socket

import httpx
import pytest
import yaml

from tests.hardening.conftest import POLICY, reverse_gateway
from tests.support.upstream import FakeUpstream

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
ANSWER = json.dumps({"id": "chatcmpl-1", "object": "chat.completion", "choices": [
    {"index": 0, "finish_reason": "stop",
     "message": {"role": "assistant", "content": "a long answer " * 200}}]}).encode()
BINARY = bytes(range(256)) * 40


def cut(ctype: str, body: bytes, framing: str, at: int):
    """An upstream answering `body` framed by `framing` (length, chunked, close), closing its
    connection after `at` bytes of it."""
    def answer(handler, _req) -> None:
        handler.send_response(200)
        handler.send_header("content-type", ctype)
        if framing == "length":
            handler.send_header("content-length", str(len(body)))
        elif framing == "chunked":
            handler.send_header("transfer-encoding", "chunked")
        else:
            handler.send_header("connection", "close")
        handler.end_headers()
        sent = body[:at]
        handler.wfile.write(b"%x\r\n%s\r\n" % (len(body), sent) if framing == "chunked" else sent)
        handler.wfile.flush()
        handler.close_connection = True
        handler.connection.shutdown(socket.SHUT_RDWR)
    return answer


@pytest.fixture(scope="module")
def upstream():
    llm = FakeUpstream()
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def gw(issuer, upstream, tmp_path_factory):
    policy = yaml.safe_load(POLICY)
    policy["default"]["upstreams"]["llm"]["operations"] = ["GET /v1/files/*/content"]
    policy["default"]["upstreams"]["internal"] = {"models": ["*"]}
    internal = {"url": upstream.url + "/internal", "protocol": "generic",
                "request_text_paths": ["prompt"], "response_text_paths": ["output"],
                "credential": {"env": "DOUANE_TEST_UPSTREAM_KEY", "header": "x-key"}}
    with reverse_gateway(issuer, upstream, tmp_path_factory.mktemp("sec30_cut"), policy,
                         upstreams={"internal": internal}) as gateway:
        yield gateway


REQUESTS = {
    "chat": ("POST", "/v1/chat/completions", CHAT, "application/json", ANSWER),
    "download": ("GET", "/v1/files/file_x/content", None, "application/octet-stream", BINARY),
    "generic": ("POST", "/internal/run", {"prompt": "hi"}, "application/json",
                json.dumps({"output": "x" * 3000}).encode()),
}


@pytest.mark.parametrize("framing", ["length", "chunked", "close"])
@pytest.mark.parametrize("what", list(REQUESTS))
@pytest.mark.parametrize("at", [1, 700, -5], ids=["first-byte", "middle", "near-end"])
def test_an_answer_cut_mid_body_is_a_clean_failure_with_a_record(gw, upstream, token, what,
                                                                 framing, at):
    method, path, doc, ctype, body = REQUESTS[what]
    upstream.answer = cut(ctype, body, framing, at % len(body))
    try:
        resp = httpx.request(method, gw.url + path, json=doc, timeout=60,
                             headers={"authorization": f"Bearer {token}"})
    finally:
        upstream.answer = None
    if framing == "close" and what == "download":
        # HTTP/1's read-until-close body: its end is the close, no cut can be told from it
        # (nothing to parse in bytes nobody reads): refused at its head since stop 31
        # (test_sec31_cut_answers.py)
        assert resp.status_code == 502 and body[:64] not in resp.content
        assert gw.audit_record(resp.headers["x-douane-decision-id"])["reasons"][0]["rule"] \
            == "upstream.unframed"
        return
    assert resp.status_code == 502, (resp.status_code, resp.content[:300])
    decision_id = resp.headers["x-douane-decision-id"]
    error = resp.json()["error"]  # whole JSON in the API's shape (httpx read it to its end)
    assert error["decision_id"] == decision_id
    assert "mitmproxy" not in resp.text.lower()
    assert "a long answer" not in resp.text and "xxxx" not in resp.text  # nothing of the cut body
    record = gw.audit_record(decision_id)
    assert record["action"] in ("error", "refuse"), record
    assert record["status"] == 502, record
    rule = record["reasons"][0]["rule"]
    # cut short of its length or chunks: the upstream failed before the head left (douane reads
    # every unrewritten answer whole); cut at a close that ends the body: JSON nobody can read
    assert rule == ("protocol.invalid_json" if framing == "close" else "upstream.unreachable"), \
        record
