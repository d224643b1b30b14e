"""An MCP `requestState` issued in a stream is its user's from the event that carries it, not
from the stream's end: through a real mitmdump, the server sends its `input_required` answer in
pieces at a model's pace and keeps the stream open; meanwhile the user's retry with the state
reaches the server, another user's is refused (the server receiving nothing, the audit record
naming `mcp.request_state`), and stays refused once the stream has ended."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from douane.cli import main
from tests.conftest import UPSTREAM_KEY
from tests.hardening.conftest import assert_refused
from tests.support.gateway import Gateway, base_config
from tests.support.upstream import FakeUpstream

VERSION = "2025-11-25"
HEADERS = {"accept": "application/json, text/event-stream", "content-type": "application/json",
           "mcp-protocol-version": VERSION}
POLICY = """\
version: 1
groups:
  staff:
    upstreams:
      srv: {tools: {allow: ["*"]}}
"""
PACE = 0.02  # seconds between the pieces of an event, and between keep-alives


class Server:
    """An MCP server asking for input with a `requestState`, down a stream it holds open until
    `release`; a retry echoing a state is answered `done`."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.state = ""

    def __call__(self, handler, req) -> None:
        params = req.get("params") if isinstance(req, dict) else None
        if req.get("method") == "tools/list":
            handler._json(200, {"jsonrpc": "2.0", "id": req["id"], "result": {
                "tools": [{"name": "lookup", "inputSchema": {"type": "object"}}]}})
            return
        if isinstance(params, dict) and "requestState" in params:
            handler._json(200, {"jsonrpc": "2.0", "id": req["id"], "result": {
                "content": [{"type": "text", "text": "done"}]}})
            return
        handler.send_response(200)
        handler.send_header("content-type", "text/event-stream")
        handler.send_header("transfer-encoding", "chunked")
        handler.end_headers()

        def send(raw: bytes) -> None:
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(raw), raw))
            handler.wfile.flush()
            time.sleep(PACE)
        event = ("event: message\ndata: " + json.dumps({"jsonrpc": "2.0", "id": req["id"],
                                                        "result": {
            "resultType": "input_required", "requestState": self.state, "inputRequests": {
                "why": {"method": "elicitation/create", "params": {"message": "why?"}}}}}) +
            "\n\n").encode()
        for at in range(0, len(event), 37):  # the event in pieces, at a model's pace
            send(event[at:at + 37])
        deadline = time.monotonic() + 60
        while not self.release.is_set() and time.monotonic() < deadline:
            send(b": still here\n\n")
        handler.wfile.write(b"0\r\n\r\n")
        handler.wfile.flush()


@pytest.fixture(scope="module")
def setup(issuer, tmp_path_factory):
    server = FakeUpstream()
    server.answer = Server()
    work = tmp_path_factory.mktemp("mcp-state-stream")
    (work / "policy.yaml").write_text(POLICY)
    config = base_config(issuer.url, server.url + "/v1",
                         policy={"files": [str(work / "policy.yaml")]})
    config["upstreams"]["srv"] = {"url": server.url + "/rpc", "protocol": "mcp"}
    users = [issuer.mint(f"{name}@corp.example", ["staff"]) for name in ("sam", "eve")]
    with Gateway(config, mode="regular", env={"DOUANE_TEST_UPSTREAM_KEY": UPSTREAM_KEY},
                 workdir=work / "gw") as gw:
        with httpx.Client(proxy=gw.proxy_url("u", users[0]), timeout=60) as c:
            assert c.post(server.url + "/rpc", headers=HEADERS, json={
                "jsonrpc": "2.0", "id": 1, "method": "tools/list"}).status_code == 200
        main(["tools", "accept", "srv", "lookup", "--config", str(gw.config_file)])
        yield gw, server, users
    server.close()


def call(rid: int = 1, state: str | None = None) -> dict:
    body = {"jsonrpc": "2.0", "id": rid, "method": "tools/call",
            "params": {"name": "lookup", "arguments": {}}}
    if state is not None:
        body["params"] |= {"requestState": state,
                           "inputResponses": {"why": {"action": "accept", "content": {}}}}
    return body


def retry(gw, server, token: str, state: str) -> httpx.Response:
    with httpx.Client(proxy=gw.proxy_url("u", token), timeout=60) as c:
        return c.post(server.url + "/rpc", headers=HEADERS, json=call(2, state))


def refused(gw, server, token: str, state: str) -> dict:
    before = len(server.requests)
    record = assert_refused(gw, server, before, retry(gw, server, token, state), 200, 403)
    assert [r["rule"] for r in record["reasons"]] == ["mcp.request_state"], record
    assert "another user" in record["reasons"][0]["message"], record
    return record


@pytest.mark.parametrize("n", range(3))
def test_a_streamed_state_is_its_users_while_the_stream_goes_on(setup, n):
    gw, server, (sam, eve) = setup
    server.answer.state = f"sealed-{n}-" + "x" * (40 * n)
    server.answer.release.clear()
    with httpx.Client(proxy=gw.proxy_url("u", sam), timeout=60) as c, \
            c.stream("POST", server.url + "/rpc", headers=HEADERS, json=call()) as stream:
        assert stream.status_code == 200
        lines = stream.iter_lines()
        for line in lines:  # the event carrying the state, the stream still open
            if server.answer.state in line:
                break
        # another user racing with it is refused, the server receiving nothing
        refused(gw, server, eve, server.answer.state)
        # its user's retry goes through, while the stream goes on
        before = len(server.requests)
        passed = retry(gw, server, sam, server.answer.state)
        assert passed.status_code == 200 and "done" in passed.text, passed.text[:300]
        assert len(server.requests) == before + 1
        assert server.answer.state.encode() in server.requests[-1].body
        server.answer.release.set()
        rest = "\n".join(lines)
        assert "error" not in rest, rest[-300:]
    refused(gw, server, eve, server.answer.state)  # and after its end
