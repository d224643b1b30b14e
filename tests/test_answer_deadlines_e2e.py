"""An upstream that accepts a request and then never answers, or stops in the middle of its answer,
no longer holds the client for mitmproxy's 600 s: past douane's answer deadlines
(`gateway.timeouts.answer_head`, `answer_silence`, `mcp_silence`; 3-5 s here) the client gets a
504 in the API's shape, or a stream already started ends with the API's error event, and the audit
record says `upstream.timeout` (`douane.timeouts`, `douane.upstreamerrors`). A stream at a slow,
steady pace is never cut. Bounds are asserted generously: the machine is shared and loaded."""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any

import httpx
import pytest

from tests.conftest import UPSTREAM_KEY
from tests.support.gateway import Gateway, base_config
from tests.support.upstream import FakeUpstream
from tests.test_approvals_e2e import api_url, call, pending_for

POLICY = """\
version: 1
default:
  upstreams:
    llm: {models: ["*"]}
    claude: {models: ["*"]}
    crm: {tools: {allow: ["*"]}}
    tls: {models: ["*"]}
    secure: {models: ["*"]}
rules:
  - {id: hold.kestrel, literal: "kestrel", score: 60}
  - {id: deny.codename, literal: "project nightingale", in: [completion], score: 90}
thresholds: {hold: 50, block: 80}
"""
HEAD, SILENCE, MCP_SILENCE = 3, 3, 5
LATE = 40  # seconds: far under mitmproxy's 600, far over the deadlines even on a loaded machine
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
released = threading.Event()  # set at the end: the stalled upstream threads let go


def stall() -> None:
    released.wait(120)


def chunk(handler: BaseHTTPRequestHandler, data: bytes) -> None:
    handler.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
    handler.wfile.flush()


def sse_head(handler: BaseHTTPRequestHandler) -> None:
    handler.send_response(200)
    handler.send_header("content-type", "text/event-stream")
    handler.send_header("transfer-encoding", "chunked")
    handler.end_headers()
    handler.wfile.flush()


def openai_delta(text: str) -> bytes:
    return b"data: " + json.dumps({"id": "c", "object": "chat.completion.chunk", "created": 0,
                                   "model": "m", "choices": [{"index": 0, "delta": {
                                       "content": text}, "finish_reason": None}]}).encode() + \
        b"\n\n"


def anthropic_event(name: str, doc: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps({'type': name, **doc})}\n\n".encode()


def answer(handler: BaseHTTPRequestHandler, req: Any) -> None:
    """What the upstream does is named by the request's model."""
    how = req.get("model") if isinstance(req, dict) else None
    if handler.path.endswith("/mcp"):
        mcp(handler, req)
    elif how == "silent":  # accepts, reads, never answers
        stall()
    elif how == "half-body":  # a head and half a whole answer, then nothing
        handler.send_response(200)
        handler.send_header("content-type", "application/json")
        handler.send_header("content-length", "1000")
        handler.end_headers()
        handler.wfile.write(b'{"choices": [')
        handler.wfile.flush()
        stall()
    elif how == "stalls":  # an OpenAI stream that stops after two deltas
        sse_head(handler)
        chunk(handler, openai_delta("Hello"))
        chunk(handler, openai_delta(" there"))
        stall()
    elif how == "held":  # answers in a second
        time.sleep(1)
        handler._json(200, {"id": "c", "object": "chat.completion", "created": 0, "model": "m",
                            "choices": [{"index": 0, "finish_reason": "stop", "message": {
                                "role": "assistant", "content": "approved answer"}}]})
    elif how == "blocked-stalls":  # a denied phrase, then nothing
        sse_head(handler)
        chunk(handler, openai_delta("about project nightingale"))
        stall()
    elif how == "cut":  # an OpenAI stream whose upstream closes its connection after a delta
        sse_head(handler)
        chunk(handler, openai_delta("Partial"))
        handler.close_connection = True
        handler.connection.shutdown(socket.SHUT_RDWR)
    elif how == "claude-stalls":
        sse_head(handler)
        message = {"id": "msg", "type": "message", "role": "assistant", "model": "m",
                   "content": [], "stop_reason": None, "stop_sequence": None,
                   "usage": {"input_tokens": 1, "output_tokens": 1}}
        chunk(handler, anthropic_event("message_start", {"message": message}))
        chunk(handler, anthropic_event("content_block_start", {
            "index": 0, "content_block": {"type": "text", "text": ""}}))
        chunk(handler, anthropic_event("content_block_delta", {
            "index": 0, "delta": {"type": "text_delta", "text": "Bonjour"}}))
        stall()
    elif how == "steady":  # slow but steady: a delta every half second, 3x the silence in all
        sse_head(handler)
        for i in range(6 * SILENCE):
            chunk(handler, openai_delta(f"w{i} "))
            time.sleep(0.5)
        chunk(handler, b"data: [DONE]\n\n")
        handler.wfile.write(b"0\r\n\r\n")
        handler.wfile.flush()
    else:
        raise AssertionError(how)


def mcp(handler: BaseHTTPRequestHandler, req: dict[str, Any]) -> None:
    """An MCP server answering `initialize` by its id: 9 never answers; 10 streams SSE comments
    (keep-alives) a second apart, longer than `mcp_silence`, then the result; 11 starts a stream
    and stops."""
    if req["id"] == 9:
        stall()
        return
    sse_head(handler)
    if req["id"] == 11:
        stall()
        return
    for _ in range(MCP_SILENCE + 3):
        chunk(handler, b": ping\n\n")
        time.sleep(1)
    result = {"jsonrpc": "2.0", "id": 10, "result": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "serverInfo": {"name": "slow", "version": "1"}}}
    chunk(handler, b"event: message\ndata: " + json.dumps(result).encode() + b"\n\n")
    handler.wfile.write(b"0\r\n\r\n")
    handler.wfile.flush()


class Mute:
    """A TCP upstream that accepts connections and never sends a byte (a TLS handshake that
    never completes)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                self.conns.append(self.sock.accept()[0])
            except OSError:
                return

    def close(self) -> None:
        self.sock.close()
        for conn in self.conns:
            conn.close()


@pytest.fixture(scope="module")
def upstreams() -> Iterator[tuple[FakeUpstream, Mute, FakeUpstream]]:
    llm, mute, secure = FakeUpstream(), Mute(), FakeUpstream(tls=True)
    llm.answer = secure.answer = answer
    yield llm, mute, secure
    released.set()
    for server in (llm, mute, secure):
        server.close()


@pytest.fixture(scope="module")
def gw(issuer, upstreams, tmp_path_factory) -> Iterator[Gateway]:
    llm, mute, secure = upstreams
    work = tmp_path_factory.mktemp("deadlines")
    (work / "policy.yaml").write_text(POLICY)
    config = base_config(issuer.url, llm.url, policy={"files": [str(work / "policy.yaml")]},
                         gateway={"timeouts": {"answer_head": HEAD, "answer_silence": SILENCE,
                                               "mcp_silence": MCP_SILENCE}},
                         approvals={"listen": "127.0.0.1:0", "approver_groups": ["approvers"]})
    config["upstreams"]["claude"] = {"url": llm.url + "/anthropic", "protocol": "anthropic",
                                     "credential": {"env": "DOUANE_TEST_UPSTREAM_KEY"}}
    config["upstreams"]["crm"] = {"url": llm.url + "/mcp", "protocol": "mcp"}
    config["upstreams"]["tls"] = {"url": f"https://127.0.0.1:{mute.port}", "protocol": "openai",
                                  "credential": {"env": "DOUANE_TEST_UPSTREAM_KEY"}}
    config["upstreams"]["secure"] = {"url": secure.url, "protocol": "openai",
                                     "credential": {"env": "DOUANE_TEST_UPSTREAM_KEY"}}
    with Gateway(config, env={"DOUANE_TEST_UPSTREAM_KEY": UPSTREAM_KEY},
                 args=["--set", "ssl_insecure=true"], workdir=work / "gw") as gateway:
        yield gateway


@pytest.fixture(scope="module")
def client(gw, issuer) -> Iterator[httpx.Client]:
    token = issuer.mint("una@corp.example", ["engineering"])
    with httpx.Client(proxy=gw.proxy_url("u", token), timeout=120,
                      verify=ssl.create_default_context(cafile=gw.ca_file)) as c:
        yield c


def timed_out(gw: Gateway, resp: httpx.Response) -> dict:
    """A 504 in the API's shape naming its decision, whose record says upstream.timeout."""
    assert resp.status_code == 504, (resp.status_code, resp.text[:300])
    assert "mitmproxy" not in resp.text.lower()
    decision_id = resp.headers["x-douane-decision-id"]
    assert decision_id in resp.text
    record = gw.audit_record(decision_id)
    assert record["action"] == "error" and record["status"] == 504, record
    assert record["reasons"][0]["rule"] == "upstream.timeout", record
    return record


def test_an_upstream_that_never_answers_gets_a_504(gw, client, upstreams):
    start = time.monotonic()
    resp = client.post(upstreams[0].url + "/v1/chat/completions", json={**CHAT, "model": "silent"})
    took = time.monotonic() - start
    timed_out(gw, resp)
    assert HEAD - 0.5 < took < LATE, took
    print(f"\nno head: 504 after {took:.2f} s (answer_head {HEAD} s)")
    error = resp.json()["error"]
    assert error["code"] == "upstream_timeout" and f"within {HEAD} s" in error["message"]


def test_a_whole_answer_that_stops_midway_gets_a_504(gw, client, upstreams):
    start = time.monotonic()
    resp = client.post(upstreams[0].url + "/v1/chat/completions",
                       json={**CHAT, "model": "half-body"})
    assert time.monotonic() - start < LATE
    timed_out(gw, resp)
    assert "choices" not in resp.text  # nothing of the half answer


def test_an_anthropic_upstream_that_never_answers(gw, client, upstreams):
    resp = client.post(upstreams[0].url + "/anthropic/v1/messages",
                       json={"model": "silent", "max_tokens": 5,
                             "messages": [{"role": "user", "content": "hi"}]})
    timed_out(gw, resp)
    assert resp.json()["type"] == "error"


def initialize(client: httpx.Client, url: str, rpc_id: int) -> httpx.Response:
    return client.post(url + "/mcp", headers={"accept": "application/json, text/event-stream"},
                       json={"jsonrpc": "2.0", "id": rpc_id, "method": "initialize",
                             "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                                        "clientInfo": {"name": "t", "version": "1"}}})


def test_an_mcp_upstream_that_never_answers_is_a_json_rpc_error(gw, client, upstreams):
    resp = initialize(client, upstreams[0].url, 9)
    timed_out(gw, resp)
    doc = resp.json()
    assert doc["jsonrpc"] == "2.0" and doc["id"] == 9 and doc["error"]["code"] == -32000, doc


def test_an_mcp_stream_kept_alive_by_comments_is_not_cut(gw, client, upstreams):
    resp = initialize(client, upstreams[0].url, 10)
    assert resp.status_code == 200, resp.text[:300]
    assert '"serverInfo"' in resp.text and '"error"' not in resp.text, resp.text[-300:]


def test_an_mcp_stream_that_stalls_ends_with_a_json_rpc_error(gw, client, upstreams):
    start = time.monotonic()
    resp = initialize(client, upstreams[0].url, 11)
    assert MCP_SILENCE - 0.5 < time.monotonic() - start < LATE
    decision_id = resp.headers["x-douane-decision-id"]
    data = [line for line in resp.text.splitlines() if line.startswith("data: ")]
    error = json.loads(data[-1][6:])
    assert error["id"] == 11 and decision_id in error["error"]["message"], error
    assert f"within {MCP_SILENCE} s" in error["error"]["message"]
    assert gw.audit_record(decision_id)["reasons"][0]["rule"] == "upstream.timeout"


def test_a_stream_that_stalls_ends_with_the_api_error_event(gw, client, upstreams):
    start = time.monotonic()
    with client.stream("POST", upstreams[0].url + "/v1/chat/completions",
                       json={**CHAT, "model": "stalls", "stream": True}) as resp:
        assert resp.status_code == 200
        body = resp.read().decode()  # ends: no closed connection mid-body
    took = time.monotonic() - start
    assert SILENCE - 0.5 < took < LATE
    print(f"\nstalled stream: error event after {took:.2f} s (answer_silence {SILENCE} s)")
    assert "Hello" in body and " there" in body  # what came before the stall was delivered
    decision_id = resp.headers["x-douane-decision-id"]
    last = [line for line in body.splitlines() if line.startswith("data: ")][-1]
    error = json.loads(last[6:])["error"]
    assert decision_id in error["message"] and f"within {SILENCE} s" in error["message"], error
    record = gw.audit_record(decision_id)
    assert record["action"] == "error" and record["status"] == 504, record
    assert record["reasons"][0]["rule"] == "upstream.timeout", record


def test_an_anthropic_stream_that_stalls_ends_with_its_error_event(gw, client, upstreams):
    with client.stream("POST", upstreams[0].url + "/anthropic/v1/messages",
                       json={"model": "claude-stalls", "max_tokens": 5, "stream": True,
                             "messages": [{"role": "user", "content": "hi"}]}) as resp:
        body = resp.read().decode()
    assert "Bonjour" in body and "event: error" in body, body[-500:]
    decision_id = resp.headers["x-douane-decision-id"]
    assert decision_id in body.split("event: error")[-1]
    assert gw.audit_record(decision_id)["reasons"][0]["rule"] == "upstream.timeout"


def test_a_stream_its_upstream_closes_midway_ends_with_the_error_event(gw, client, upstreams):
    with client.stream("POST", upstreams[0].url + "/v1/chat/completions",
                       json={**CHAT, "model": "cut", "stream": True}) as resp:
        body = resp.read().decode()  # properly ended, not a connection closed mid-body
    decision_id = resp.headers["x-douane-decision-id"]
    assert "Partial" in body
    error = json.loads([line for line in body.splitlines() if line.startswith("data: ")][-1][6:])
    assert decision_id in error["error"]["message"] and "was cut" in error["error"]["message"]
    record = gw.audit_record(decision_id)
    assert record["action"] == "error" and record["status"] == 502, record
    assert record["reasons"][0]["rule"] == "upstream.cut" and record["ended"] == "upstream_failed"


def test_a_stream_blocked_then_stalled_keeps_its_block(gw, client, upstreams):
    """douane ended the stream with its error event (a deny rule); the upstream then stalls: the
    client's stream ends at the silence deadline (it waited for the upstream's end before), and
    the record keeps the block."""
    start = time.monotonic()
    with client.stream("POST", upstreams[0].url + "/v1/chat/completions",
                       json={**CHAT, "model": "blocked-stalls", "stream": True}) as resp:
        body = resp.read().decode()
    assert time.monotonic() - start < LATE
    assert "nightingale" not in body and "blocked" in body, body[-300:]
    record = gw.audit_record(resp.headers["x-douane-decision-id"])
    assert record["action"] == "block" and record["status"] == 403, record
    assert record["ended"] == "upstream_timeout", record


def test_a_slow_steady_stream_is_never_cut(gw, client, upstreams):
    start = time.monotonic()
    with client.stream("POST", upstreams[0].url + "/v1/chat/completions",
                       json={**CHAT, "model": "steady", "stream": True}) as resp:
        body = resp.read().decode()
    assert f"w{6 * SILENCE - 1} " in body and "[DONE]" in body and "error" not in body, body[-300:]
    print(f"\nsteady stream: {6 * SILENCE} deltas half a second apart, whole in "
          f"{time.monotonic() - start:.2f} s")
    record = gw.audit_record(resp.headers["x-douane-decision-id"])
    assert record["action"] == "allow", record


def test_a_tls_handshake_that_never_completes_gets_a_504(gw, client, upstreams):
    start = time.monotonic()
    resp = client.post(f"https://127.0.0.1:{upstreams[1].port}/v1/chat/completions", json=CHAT)
    took = time.monotonic() - start
    assert took < LATE
    timed_out(gw, resp)
    print(f"\nTLS handshake never done: 504 after {took:.2f} s")


def test_the_time_held_for_an_approver_does_not_count(gw, client, upstreams, issuer):
    api, bob = api_url(gw), issuer.mint("bob@corp", ["approvers"])
    result: list[httpx.Response] = []
    asked = threading.Thread(target=lambda: result.append(client.post(
        upstreams[0].url + "/v1/chat/completions",
        json={"model": "held", "messages": [{"role": "user", "content": "about kestrel"}]})))
    asked.start()
    pending = pending_for(api, bob, "una@corp.example")
    time.sleep(HEAD + 2)  # held longer than the answer's head deadline
    status, _ = call(api, bob, "POST", f"/approvals/{pending['id']}/approve", {})
    assert status == 200
    asked.join(LATE)
    resp, = result
    assert resp.status_code == 200 and resp.json()["choices"][0]["message"]["content"] == \
        "approved answer", resp.text[:300]


def test_the_connection_serves_the_next_request(gw, client, upstreams):
    resp = client.post(upstreams[0].url + "/v1/chat/completions", json={**CHAT, "model": "silent"})
    timed_out(gw, resp)
    with client.stream("POST", upstreams[0].url + "/v1/chat/completions",
                       json={**CHAT, "model": "steady", "stream": True}) as resp:
        assert "[DONE]" in resp.read().decode()


def test_behind_a_connect_tunnel_to_a_tls_upstream(gw, client, upstreams):
    """The wake-up finds its stream through the tunnel's layers (an HTTP layer above the
    CONNECT, TLS, the HTTP layer inside)."""
    secure = upstreams[2]
    timed_out(gw, client.post(secure.url + "/v1/chat/completions",
                              json={**CHAT, "model": "silent"}))
    with client.stream("POST", secure.url + "/v1/chat/completions",
                       json={**CHAT, "model": "stalls", "stream": True}) as resp:
        body = resp.read().decode()
    assert "Hello" in body and f"within {SILENCE} s" in body.splitlines()[-2], body[-300:]


def test_in_reverse_mode(issuer, upstreams, tmp_path):
    secure = upstreams[2]
    (tmp_path / "policy.yaml").write_text("version: 1\ndefault:\n  upstreams:\n"
                                          "    llm: {models: [\"*\"]}\n")
    config = base_config(issuer.url, secure.url,
                         policy={"files": [str(tmp_path / "policy.yaml")]},
                         gateway={"timeouts": {"answer_head": HEAD, "answer_silence": SILENCE}})
    token = issuer.mint("una@corp.example", ["engineering"])
    with Gateway(config, mode=f"reverse:{secure.url}", args=["--set", "ssl_insecure=true"],
                 env={"DOUANE_TEST_UPSTREAM_KEY": UPSTREAM_KEY}, workdir=tmp_path / "gw") as rgw, \
            httpx.Client(base_url=rgw.url, timeout=120,
                         headers={"authorization": f"Bearer {token}"}) as c:
        timed_out(rgw, c.post("/v1/chat/completions", json={**CHAT, "model": "silent"}))
        with c.stream("POST", "/v1/chat/completions",
                      json={**CHAT, "model": "stalls", "stream": True}) as resp:
            body = resp.read().decode()
        assert "Hello" in body and f"within {SILENCE} s" in body, body[-300:]
        # the client's connection goes on
        assert c.post("/v1/chat/completions",
                      json={**CHAT, "model": "held"}).status_code == 200


class H2Upstream:
    """A TLS HTTP/2 upstream (h2 only): a chat request whose model is "silent" is never answered,
    any other is answered at once; counts the connections it accepted."""

    def __init__(self) -> None:
        from tests.support.upstream import _tls_context
        self.context = _tls_context()
        self.context.set_alpn_protocols(["h2"])
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._connection, args=(conn,), daemon=True).start()

    def _connection(self, raw: socket.socket) -> None:
        import h2.config
        import h2.connection
        import h2.events

        try:
            tls = self.context.wrap_socket(raw, server_side=True)
            h2c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
            h2c.initiate_connection()
            tls.sendall(h2c.data_to_send())
            bodies: dict[int, bytes] = {}
            while data := tls.recv(65536):
                for event in h2c.receive_data(data):
                    if isinstance(event, h2.events.DataReceived):
                        bodies[event.stream_id] = bodies.get(event.stream_id, b"") + event.data
                        h2c.acknowledge_received_data(event.flow_controlled_length,
                                                      event.stream_id)
                    elif isinstance(event, h2.events.StreamEnded):
                        req = json.loads(bodies.pop(event.stream_id, b"{}") or b"{}")
                        if req.get("model") == "silent":
                            continue
                        body = json.dumps({"id": "c", "object": "chat.completion", "created": 0,
                                           "model": "m", "choices": [{
                                               "index": 0, "finish_reason": "stop", "message": {
                                                   "role": "assistant", "content": "h2 answer"}}]
                                           }).encode()
                        h2c.send_headers(event.stream_id, [
                            (":status", "200"), ("content-type", "application/json"),
                            ("content-length", str(len(body)))])
                        h2c.send_data(event.stream_id, body, end_stream=True)
                tls.sendall(h2c.data_to_send())
        except (OSError, ssl.SSLError, ValueError):
            return

    def close(self) -> None:
        self.sock.close()


def test_an_http2_upstream_stream_is_reset_alone(issuer, tmp_path):
    """An HTTP/2 client and upstream: one stream never answered is cut (504, RST_STREAM to the
    upstream), while the same connection's other streams are answered, before and after."""
    from tests.hardening.test_evasion import H2Only

    up = H2Upstream()
    (tmp_path / "policy.yaml").write_text("version: 1\ndefault:\n  upstreams:\n"
                                          "    llm: {models: [\"*\"]}\n")
    config = base_config(issuer.url, f"https://127.0.0.1:{up.port}",
                         policy={"files": [str(tmp_path / "policy.yaml")]},
                         gateway={"timeouts": {"answer_head": HEAD}})
    token = issuer.mint("una@corp.example", ["engineering"])
    verify = H2Only(ssl.PROTOCOL_TLS_CLIENT)
    url = f"https://127.0.0.1:{up.port}/v1/chat/completions"
    try:
        with Gateway(config, args=["--set", "ssl_insecure=true"],
                     env={"DOUANE_TEST_UPSTREAM_KEY": UPSTREAM_KEY},
                     workdir=tmp_path / "gw") as h2gw:
            verify.load_verify_locations(cafile=h2gw.ca_file)
            with httpx.Client(proxy=h2gw.proxy_url("u", token), timeout=120, http2=True,
                              verify=verify) as c:
                assert c.post(url, json=CHAT).http_version == "HTTP/2"
                result: list[httpx.Response] = []
                silent = threading.Thread(target=lambda: result.append(
                    c.post(url, json={**CHAT, "model": "silent"})))
                silent.start()
                time.sleep(0.5)
                during = c.post(url, json=CHAT)  # the same connection, while one waits
                silent.join(LATE)
                after = c.post(url, json=CHAT)
            timed_out(h2gw, result[0])
            assert during.status_code == after.status_code == 200, (during.text, after.text)
            assert "h2 answer" in during.text and "h2 answer" in after.text
            assert up.accepted == 1, up.accepted  # one upstream connection, kept: a stream reset
    finally:
        up.close()
