"""An upstream that cannot be reached, or fails before its answer's head: the client gets a refusal
in the API's shape with a decision id (not mitmproxy's HTML page), and the audit record says the
upstream failed (`douane.upstreamerrors`)."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterator

import httpx
import pytest

from douane.upstreamerrors import failure
from tests.conftest import UPSTREAM_KEY
from tests.hardening.test_evasion import H2Only
from tests.support.gateway import Gateway, base_config, free_port

POLICY = """\
version: 1
default:
  upstreams:
    llm: {models: ["*"]}
    claude: {models: ["*"]}
    crm: {tools: {allow: ["echo"]}}
    raw: {models: ["*"]}
    cut: {models: ["*"]}
"""
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


class Failing:
    """A TCP upstream that reads what it is sent, then closes (`garbage`: after sending bytes that
    are neither TLS nor HTTP). Counts the connections it accepted."""

    def __init__(self, garbage: bytes = b""):
        self.garbage = garbage
        self.accepted = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            with conn:
                conn.settimeout(5)
                try:
                    conn.recv(65536)
                    if self.garbage:
                        conn.sendall(self.garbage)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def closer() -> Iterator[Failing]:
    server = Failing()
    yield server
    server.close()


@pytest.fixture(scope="module")
def garbage() -> Iterator[Failing]:
    server = Failing(b"\x00garbage, not TLS\r\n" * 4)
    yield server
    server.close()


REFUSED = f"http://127.0.0.1:{free_port()}"  # nobody listens there


@pytest.fixture(scope="module")
def babbler() -> Iterator[Failing]:
    server = Failing(b"\x1b[31mnot HTTP at all " + b"\xff" * 2000 + b"\r\n\r\n")
    yield server
    server.close()


@pytest.fixture(scope="module")
def cutter() -> Iterator[Failing]:
    server = Failing(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                     b"content-length: 1000\r\n\r\n{\"choices\": [")
    yield server
    server.close()


@pytest.fixture(scope="module")
def gw(issuer, closer, garbage, babbler, cutter, tmp_path_factory) -> Iterator[Gateway]:
    work = tmp_path_factory.mktemp("upstreamerr")
    (work / "policy.yaml").write_text(POLICY)
    config = base_config(issuer.url, REFUSED,
                         policy={"files": [str(work / "policy.yaml")]})
    config["upstreams"]["claude"] = {"url": f"https://127.0.0.1:{garbage.port}",
                                     "protocol": "anthropic",
                                     "credential": {"env": "DOUANE_TEST_UPSTREAM_KEY"}}
    config["upstreams"]["crm"] = {"url": f"http://127.0.0.1:{closer.port}/mcp",
                                  "protocol": "mcp"}
    config["upstreams"]["cut"] = {"url": f"http://127.0.0.1:{cutter.port}", "protocol": "openai",
                                  "credential": {"env": "DOUANE_TEST_UPSTREAM_KEY"}}
    config["upstreams"]["raw"] = {"url": f"http://127.0.0.1:{babbler.port}", "protocol": "openai",
                                  "credential": {"env": "DOUANE_TEST_UPSTREAM_KEY"}}
    with Gateway(config, env={"DOUANE_TEST_UPSTREAM_KEY": UPSTREAM_KEY},
                 workdir=work / "gw") as gateway:
        yield gateway


@pytest.fixture(scope="module")
def client(gw, issuer) -> Iterator[httpx.Client]:
    token = issuer.mint("una@corp.example", ["engineering"])
    with httpx.Client(proxy=gw.proxy_url("u", token), timeout=60,
                      verify=ssl.create_default_context(cafile=gw.ca_file)) as c:
        yield c


def assert_upstream_failed(gw: Gateway, resp: httpx.Response, status: int) -> dict:
    """A refusal with `status`, nothing of mitmproxy's, and its decision's audit record."""
    assert resp.status_code == status, (resp.status_code, resp.text[:300])
    assert resp.headers["content-type"] == "application/json"
    assert "mitmproxy" not in resp.text.lower()
    assert all("mitmproxy" not in f"{k}: {v}".lower() for k, v in resp.headers.items())
    assert "server" not in resp.headers
    decision_id = resp.headers["x-douane-decision-id"]
    assert decision_id in resp.text
    record = gw.audit_record(decision_id)
    assert record["action"] == "error" and record["status"] == status, record
    assert record["reasons"][0]["rule"] in ("upstream.unreachable", "upstream.timeout"), record
    # how it ended, from mitmproxy's error code: not connected (refused, TLS), or failed after
    assert record["ended"] in ("upstream_unreachable", "upstream_failed"), record
    return record


def test_connection_refused_is_answered_in_openai_shape(gw, client):
    resp = client.post(REFUSED + "/v1/chat/completions", json=CHAT)
    assert assert_upstream_failed(gw, resp, 502)["ended"] == "upstream_unreachable"
    error = resp.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "upstream_unreachable"
    assert "the connection was refused" in error["message"], gw.audit_record(resp.headers["x-douane-decision-id"])


def test_a_tls_upstream_speaking_garbage_is_answered_in_anthropic_shape(gw, client, garbage):
    before = garbage.accepted
    resp = client.post(f"https://127.0.0.1:{garbage.port}/v1/messages",
                       json={"model": "claude-sonnet-4-5", "max_tokens": 10,
                             "messages": [{"role": "user", "content": "hi"}]})
    assert garbage.accepted > before  # douane did try it
    record = assert_upstream_failed(gw, resp, 502)
    doc = resp.json()
    assert doc["type"] == "error" and doc["error"]["type"] == "api_error", doc
    assert "garbage" not in resp.text  # what the upstream sent does not reach the client
    assert len(record["reasons"][0]["message"]) <= 400


def test_an_upstream_closing_before_answering_is_a_json_rpc_error(gw, client, closer):
    before = closer.accepted
    resp = client.post(f"http://127.0.0.1:{closer.port}/mcp",
                       headers={"accept": "application/json, text/event-stream"},
                       json={"jsonrpc": "2.0", "id": 7, "method": "initialize",
                             "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                                        "clientInfo": {"name": "t", "version": "1"}}})
    assert closer.accepted > before
    assert assert_upstream_failed(gw, resp, 502)["ended"] == "upstream_failed"
    doc = resp.json()
    assert doc["jsonrpc"] == "2.0" and doc["id"] == 7 and doc["error"]["code"] == -32000, doc
    assert "closed the connection before answering" in doc["error"]["message"]


def test_an_unreadable_answer_is_not_relayed(gw, client, babbler):
    before = babbler.accepted
    resp = client.post(f"http://127.0.0.1:{babbler.port}/v1/chat/completions", json=CHAT)
    assert babbler.accepted > before
    record = assert_upstream_failed(gw, resp, 502)
    assert "not HTTP" not in resp.text and "its answer could not be read" in resp.text
    # the audit record has the upstream's bytes bounded and escaped, not raw
    for text in (record["error"], record["reasons"][0]["message"]):
        assert len(text) <= 400 and "\x1b" not in text and "\xff" not in text, text


def test_a_whole_answer_cut_before_its_end_is_not_relayed(gw, client, cutter):
    before = cutter.accepted
    resp = client.post(f"http://127.0.0.1:{cutter.port}/v1/chat/completions", json=CHAT)
    assert cutter.accepted > before
    assert_upstream_failed(gw, resp, 502)
    assert "choices" not in resp.text


def test_an_http2_client_gets_the_same_answer(gw, issuer, garbage):
    token = issuer.mint("una@corp.example", ["engineering"])
    verify = H2Only(ssl.PROTOCOL_TLS_CLIENT)
    verify.load_verify_locations(cafile=gw.ca_file)
    with httpx.Client(proxy=gw.proxy_url("u", token), timeout=60, http2=True,
                      verify=verify) as h2:
        resp = h2.post(f"https://127.0.0.1:{garbage.port}/v1/messages",
                       json={"model": "claude-sonnet-4-5", "max_tokens": 10,
                             "messages": [{"role": "user", "content": "hi"}]})
    assert resp.http_version == "HTTP/2"
    assert_upstream_failed(gw, resp, 502)
    assert resp.json()["error"]["type"] == "api_error"


def test_the_gateway_keeps_serving_on_the_same_connection(gw, client):
    for _ in range(2):
        resp = client.post(REFUSED + "/v1/chat/completions", json=CHAT)
        assert_upstream_failed(gw, resp, 502)


@pytest.mark.parametrize(("message", "status", "told"), [
    ("[Errno 111] Connect call failed ('127.0.0.1', 9)", 502, "the connection was refused"),
    ("[Errno -2] Name or service not known", 502, "its name could not be resolved"),
    ("TimeoutError: connection timed out", 504, "timed out"),
    ("TLS handshake failed: record layer failure", 502, "the TLS handshake failed"),
    ("server closed connection", 502, "it closed the connection before answering"),
    ("something else", 502, "it failed"),
])
def test_failures_are_told_in_a_few_fixed_words(message, status, told):
    assert failure(message)[0] == status and failure(message)[2] == told
