"""HTTP/2 requests mitmproxy refuses before any hook (`douane.protocols.http2`): each answered
by douane with a decision id and audited, as HTTP/1's are. Raw HTTP/2 frames through a real
gateway's CONNECT tunnel (no client library writes these), the upstream receiving nothing."""

from __future__ import annotations

import base64
import json
import re
import socket
import ssl

import h2.config
import h2.connection
import h2.events
import pytest

from tests.conftest import UPSTREAM_KEY
from tests.support.gateway import Gateway, base_config

CHAT = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()


@pytest.fixture(scope="module")
def gw(issuer, tls_llm, tmp_path_factory):
    work = tmp_path_factory.mktemp("sec30-h2")
    with Gateway(base_config(issuer.url, tls_llm.url + "/v1"), mode="regular",
                 env={"DOUANE_TEST_UPSTREAM_KEY": UPSTREAM_KEY},
                 args=["--set", "ssl_insecure=true", "--set", "connection_strategy=lazy"],
                 workdir=work / "gw") as gateway:
        yield gateway


class Tunnel:
    """An HTTP/2 connection inside a CONNECT tunnel, writing headers unvalidated."""

    def __init__(self, gw: Gateway, token: str, port: int):
        self.port = port
        sock = socket.create_connection(("127.0.0.1", gw.port), timeout=30)
        auth = base64.b64encode(f"m:{token}".encode())
        sock.sendall(b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                     b"Proxy-Authorization: Basic %s\r\n\r\n" % (port, port, auth))
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        context = ssl.create_default_context(cafile=gw.ca_file)
        context.set_alpn_protocols(["h2"])
        self.tls = context.wrap_socket(sock, server_hostname="127.0.0.1")
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False))
        self.conn.initiate_connection()
        self.tls.sendall(self.conn.data_to_send())

    def request(self, stream_id: int, headers: list[tuple[str, str]], body: bytes = b""
                ) -> tuple[int, dict[str, str], bytes] | h2.events.ConnectionTerminated:
        """The answer's status, headers and body, or how the connection was ended."""
        self.conn.send_headers(stream_id, headers, end_stream=not body)
        if body:
            self.conn.send_data(stream_id, body, end_stream=True)
        self.tls.sendall(self.conn.data_to_send())
        return self.answer(stream_id)

    def answer(self, stream_id: int) -> tuple[int, dict[str, str], bytes] | \
            h2.events.ConnectionTerminated:
        """`stream_id`'s answer: its status, headers and body, or how the connection ended."""
        status, fields, data = 0, {}, b""
        while True:
            chunk = self.tls.recv(65536)
            assert chunk, "the gateway closed the connection without an answer or a GOAWAY"
            for event in self.conn.receive_data(chunk):
                if isinstance(event, h2.events.ConnectionTerminated):
                    return event
                if isinstance(event, h2.events.ResponseReceived) and event.stream_id == stream_id:
                    fields = {k.decode(): v.decode() for k, v in event.headers}
                    status = int(fields.pop(":status"))
                elif isinstance(event, h2.events.DataReceived) and event.stream_id == stream_id:
                    data += event.data
                    self.conn.acknowledge_received_data(event.flow_controlled_length, stream_id)
                elif isinstance(event, h2.events.StreamEnded) and event.stream_id == stream_id:
                    return status, fields, data
            self.tls.sendall(self.conn.data_to_send())

    def close(self) -> None:
        self.tls.close()


def chat_headers(port: int, **changed: str) -> list[tuple[str, str]]:
    pseudo = {":method": "POST", ":scheme": "https", ":authority": f"127.0.0.1:{port}",
              ":path": "/v1/chat/completions", **changed}
    return [*((k, v) for k, v in pseudo.items() if v), ("content-type", "application/json")]


@pytest.mark.parametrize("changed, says", [
    ({":scheme": "ftp"}, "Invalid request scheme"),
    ({":authority": "a!b:443"}, "invalid HTTP/2 request headers"),
], ids=["scheme", "authority"])
def test_a_request_mitmproxy_will_not_pass_is_refused_with_a_record(gw, tls_llm, token, changed,
                                                                    says):
    before = len(tls_llm.requests)
    tunnel = Tunnel(gw, token, tls_llm.port)
    try:
        status, headers, body = tunnel.request(1, chat_headers(tls_llm.port, **changed), CHAT)
        assert status == 400, (status, headers, body[:300])
        assert "mitmproxy" not in json.dumps(headers).lower() + body.decode().lower()
        decision_id = headers["x-douane-decision-id"]
        assert json.loads(body)["error"]["decision_id"] == decision_id
        record = gw.audit_record(decision_id)
        assert record["action"] == "refuse" and record["status"] == 400, record
        assert record["reasons"][0]["rule"] == "protocol.invalid_request", record
        assert says in record["reasons"][0]["message"], record
        # its flow's record is this one: no other says the request was allowed
        assert not [r for r in gw.audit_records() if r.get("action") == "allow"
                    and says.lower() in str(r.get("error")).lower()]
        # the connection stays usable: the next request on it is governed as any
        status, headers, body = tunnel.request(3, chat_headers(tls_llm.port), CHAT)
        assert status == 200, (status, body[:300])
    finally:
        tunnel.close()
    assert len(tls_llm.requests) == before + 1  # the valid one only


@pytest.mark.parametrize("headers", [
    [(":method", "POST"), (":scheme", "https"), (":authority", "127.0.0.1"),
     (":path", "/v1/chat/completions"), ("X-Upper", "1")],
    [(":method", "POST"), (":scheme", "https"), (":authority", "127.0.0.1"),
     (":path", "/v1/chat/completions"), ("connection", "keep-alive")],
    [(":method", "POST"), (":method", "GET"), (":scheme", "https"), (":authority", "127.0.0.1"),
     (":path", "/v1/chat/completions")],
    [(":method", "CONNECT"), (":authority", "127.0.0.1:443")],  # a tunnel inside the tunnel
], ids=["upper-case", "connection-specific", "pseudo-twice", "connect"])
def test_a_protocol_error_ends_the_connection_with_a_record(gw, tls_llm, token, headers):
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
    record = gw.audit_record(found.group(1).decode())
    assert record["action"] == "refuse" and record["reasons"][0]["rule"] == "protocol.h2_error"
    assert "GOAWAY" in record["reasons"][0]["message"], record
    assert len(tls_llm.requests) == before


def test_over_http1_a_request_refused_at_mitmproxys_checks_has_one_record(gw, tls_llm, token):
    """The same refusal over HTTP/1 (Content-Length beside Transfer-Encoding in the tunnel): its
    flow's record was `allow` with an error beside the refusal's; now one record, refused."""
    before = len(tls_llm.requests)
    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=30)
    auth = base64.b64encode(f"m:{token}".encode())
    port = tls_llm.port
    sock.sendall(b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                 b"Proxy-Authorization: Basic %s\r\n\r\n" % (port, port, auth))
    assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    with ssl.create_default_context(cafile=gw.ca_file).wrap_socket(
            sock, server_hostname="127.0.0.1") as tls:
        tls.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                    b"Content-Type: application/json\r\nContent-Length: 5\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" % port)
        answer = tls.recv(65536)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    decision_id = re.search(rb"x-douane-decision-id: (dcn_[0-9a-f]+)", answer).group(1).decode()
    record = gw.audit_record(decision_id)
    assert record["action"] == "refuse" and record["reasons"][0]["rule"] == \
        "protocol.invalid_request", record
    assert record["method"] == "POST" and record["path"] == "/v1/chat/completions", record
    assert not [r for r in gw.audit_records() if r.get("action") == "allow"
                and "transfer-encoding" in str(r.get("error"))]
    assert len(tls_llm.requests) == before


def test_an_http2_body_without_a_length_reaches_an_http1_upstream_whole(gw, tls_llm, token):
    """HTTP/2 needs no content-length; mitmproxy handed the head on as is to this HTTP/1
    upstream, which read the request without its body, then the body as a request of its own
    (a smuggled request, the answers shifted). douane now sends the body's length with it."""
    before = len(tls_llm.requests)
    tunnel = Tunnel(gw, token, tls_llm.port)
    try:
        for stream_id in (1, 3):  # the second on the same upstream connection: not shifted
            status, _, body = tunnel.request(stream_id, chat_headers(tls_llm.port), CHAT)
            assert status == 200 and json.loads(body)["object"] == "chat.completion", body[:300]
    finally:
        tunnel.close()
    seen = tls_llm.requests[before:]
    assert [r.body for r in seen] == [CHAT, CHAT], seen
    assert all(r.headers["content-length"] == str(len(CHAT)) for r in seen)
