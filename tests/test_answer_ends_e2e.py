"""Every flow that reached douane's checkpoint ends with an audit record saying how it ended, also
when no answer was sent (the client left, an HTTP/2 stream was reset), and a body past mitmproxy's
own cut (`body_size_limit`) is refused in the API's shape with a decision id, not with
mitmproxy's HTML page (`douane.upstreamerrors`)."""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import UPSTREAM_KEY
from tests.hardening.test_evasion import H2Only
from tests.support.gateway import Gateway, base_config
from tests.support.upstream import FakeUpstream

POLICY = """\
version: 1
default:
  upstreams:
    llm: {models: ["*"]}
"""
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
released = threading.Event()


MIB = 1024 * 1024


def answer(handler, req: Any) -> None:
    model = req.get("model", "") if isinstance(req, dict) else ""
    if model.startswith("silent"):
        released.wait(120)
        return
    if model.startswith("big"):  # 3 MiB, past mitmproxy's cut (2 MiB: the answer limit)
        body = json.dumps({"choices": [{"message": {"content": "x" * 3 * MIB}}]}).encode()
        handler.send_response(200)
        handler.send_header("content-type", "application/json")
        if model == "big-chunked":  # no length: the cut comes as the body arrives
            handler.send_header("transfer-encoding", "chunked")
            handler.end_headers()
            for i in range(0, len(body), 65536):
                piece = body[i:i + 65536]
                try:
                    handler.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                except OSError:
                    return
            handler.wfile.write(b"0\r\n\r\n")
        else:
            handler.send_header("content-length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body)
        return
    handler.send_response(200)
    handler.send_header("content-type", "text/event-stream")
    handler.send_header("transfer-encoding", "chunked")
    handler.end_headers()
    for i in range(200):  # a slow stream
        data = b"data: " + json.dumps({"id": "c", "object": "chat.completion.chunk", "created": 0,
                                       "model": "m", "choices": [{"index": 0, "delta": {
                                           "content": f"w{i} "}, "finish_reason": None}]}
                                      ).encode() + b"\n\n"
        try:
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            handler.wfile.flush()
        except OSError:
            return
        if released.wait(0.2):
            return


@pytest.fixture(scope="module")
def llm() -> Iterator[FakeUpstream]:
    upstream = FakeUpstream(tls=True)
    upstream.answer = answer
    yield upstream
    released.set()
    upstream.close()


@pytest.fixture(scope="module")
def gw(issuer, llm, tmp_path_factory) -> Iterator[Gateway]:
    work = tmp_path_factory.mktemp("ends")
    (work / "policy.yaml").write_text(POLICY)
    config = base_config(issuer.url, llm.url, policy={"files": [str(work / "policy.yaml")]},
                         gateway={"body_size_limit": "1m", "answer_size_limit": "2m",
                                  "timeouts": {"body": 3}})
    with Gateway(config, env={"DOUANE_TEST_UPSTREAM_KEY": UPSTREAM_KEY},
                 args=["--set", "ssl_insecure=true"], workdir=work / "gw") as gateway:
        yield gateway


@pytest.fixture(scope="module")
def token(issuer) -> str:
    return issuer.mint("una@corp.example", ["engineering"])


def proxied(gw: Gateway, token: str, timeout: float = 20, **kwargs: Any) -> httpx.Client:
    kwargs.setdefault("verify", ssl.create_default_context(cafile=gw.ca_file))
    return httpx.Client(proxy=gw.proxy_url("u", token), timeout=timeout, **kwargs)


def records_of(gw: Gateway, model: str) -> list[dict]:
    return gw.audit_where(lambda r: r.get("model") == model)


def test_a_client_leaving_before_the_head(gw, llm, token):
    with proxied(gw, token, timeout=2) as c, pytest.raises(httpx.ReadTimeout):
        c.post(llm.url + "/v1/chat/completions", json={**CHAT, "model": "silent-1"})
    record, = records_of(gw, "silent-1")
    assert record["ended"] == "client_left" and record["error"] == "Client disconnected.", record
    assert "status" not in record  # nothing was answered


def test_a_client_leaving_mid_stream(gw, llm, token):
    with proxied(gw, token) as c, c.stream("POST", llm.url + "/v1/chat/completions",
                                           json={**CHAT, "model": "leaver", "stream": True}
                                           ) as resp:
        next(resp.iter_bytes())
    record, = records_of(gw, "leaver")
    assert record["ended"] == "client_left" and record["status"] == 200, record


def test_an_http2_connection_closed_under_its_stream(gw, llm, token):
    verify = H2Only(ssl.PROTOCOL_TLS_CLIENT)
    verify.load_verify_locations(cafile=gw.ca_file)
    with proxied(gw, token, http2=True, verify=verify) as c, c.stream(
            "POST", llm.url + "/v1/chat/completions",
            json={**CHAT, "model": "h2-closed", "stream": True}) as resp:
        assert resp.http_version == "HTTP/2"
        next(resp.iter_bytes())
    record, = records_of(gw, "h2-closed")
    assert record["ended"] == "client_left" and record["status"] == 200, record


def test_an_http2_stream_reset_by_the_client(gw, llm, token):
    """A raw HTTP/2 client resets its stream (RST_STREAM, CANCEL) mid-answer, and keeps its
    connection: the record says so."""
    import h2.config
    import h2.connection
    import h2.events

    ctx = ssl.create_default_context(cafile=gw.ca_file)
    ctx.set_alpn_protocols(["h2"])
    sock = socket.create_connection(("127.0.0.1", gw.port))
    sock.sendall(f"CONNECT 127.0.0.1:{llm.port} HTTP/1.1\r\nHost: 127.0.0.1:{llm.port}\r\n"
                 f"Proxy-Authorization: Bearer {token}\r\n\r\n".encode())
    assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    tls = ctx.wrap_socket(sock, server_hostname="127.0.0.1")
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    body = json.dumps({**CHAT, "model": "h2-reset", "stream": True}).encode()
    conn.send_headers(1, [(":method", "POST"), (":scheme", "https"),
                          (":authority", f"127.0.0.1:{llm.port}"),
                          (":path", "/v1/chat/completions"),
                          ("content-type", "application/json"),
                          ("content-length", str(len(body)))])
    conn.send_data(1, body, end_stream=True)
    tls.sendall(conn.data_to_send())
    deadline = time.monotonic() + 30
    got_data = False
    while not got_data and time.monotonic() < deadline:
        for event in conn.receive_data(tls.recv(65536)):
            got_data = got_data or isinstance(event, h2.events.DataReceived)
        tls.sendall(conn.data_to_send())
    assert got_data
    conn.reset_stream(1)
    tls.sendall(conn.data_to_send())
    record, = records_of(gw, "h2-reset")
    tls.close()
    assert record["ended"] == "client_reset" and record["status"] == 200, record
    assert "reset by client" in record["error"]


def test_an_answer_past_the_wire_cut_is_refused_in_the_api_shape(gw, llm, token):
    with proxied(gw, token, timeout=60) as c:
        for model in ("big", "big-chunked"):
            resp = c.post(llm.url + "/v1/chat/completions", json={**CHAT, "model": model})
            assert resp.status_code == 502, (model, resp.text[:300])
            assert resp.headers["content-type"] == "application/json"
            assert "mitmproxy" not in resp.text.lower() and "xxxx" not in resp.text
            error = resp.json()["error"]
            decision_id = resp.headers["x-douane-decision-id"]
            assert error["code"] == "answer_too_large" and decision_id in error["message"]
            record = gw.audit_record(decision_id)
            assert record["action"] == "refuse" and record["status"] == 502, record
            assert record["ended"] == "too_large", record


def test_a_chunked_request_past_the_wire_cut_is_refused_in_the_api_shape(gw, llm, token):
    before = len(llm.requests)

    def body() -> Iterator[bytes]:
        yield b'{"model": "m", "messages": [{"role": "user", "content": "'
        for _ in range(48):
            yield b"y" * 65536
        yield b'"}]}'

    with proxied(gw, token, timeout=60) as c:  # (httpcore reads the answer of a body cut short)
        resp = c.post(llm.url + "/v1/chat/completions", content=body(),
                      headers={"content-type": "application/json"})
    assert resp.status_code == 413, resp.text[:300]
    assert "mitmproxy" not in resp.text.lower()
    decision_id = resp.headers["x-douane-decision-id"]
    assert decision_id in resp.text and resp.json()["error"]["code"] == "request_too_large"
    assert len(llm.requests) == before
    record = gw.audit_record(decision_id)
    assert record["action"] == "refuse" and record["status"] == 413 and \
        record["ended"] == "too_large", record


def test_a_body_too_slow_is_a_client_timeout(gw, llm, token):
    """douane closes a connection whose request body does not come in time (408): the record
    says so, not that the client left."""
    body = json.dumps({**CHAT, "model": "slow-body"}).encode()
    sock = socket.create_connection(("127.0.0.1", gw.port))
    sock.sendall(f"CONNECT 127.0.0.1:{llm.port} HTTP/1.1\r\nHost: 127.0.0.1:{llm.port}\r\n"
                 f"Proxy-Authorization: Bearer {token}\r\n\r\n".encode())
    assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    with ssl.create_default_context(cafile=gw.ca_file).wrap_socket(
            sock, server_hostname="127.0.0.1") as tls:
        tls.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{llm.port}\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                    .encode() + body[:10])
        tls.settimeout(40)
        assert tls.recv(65536) == b""  # closed by douane, past its 3 s
    record, = gw.audit_where(lambda r: r.get("ended") == "client_timeout")
    assert record["action"] == "refuse" and record["status"] == 408, record
    assert record["reasons"][0]["rule"] == "protocol.timeout"
