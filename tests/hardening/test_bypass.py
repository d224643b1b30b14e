"""Bypass: ways around the checkpoint rather than through it. Raw sockets where the attack is in
the bytes themselves (request lines, CONNECT targets, conflicting framing headers).

Also proven elsewhere (cited in docs/security.md): an undeclared host over HTTPS CONNECT
(tests/test_routing.py, tests/test_identity_e2e.py), a WebSocket upgrade in reverse mode
(tests/test_protocols_e2e.py), trusted identity headers from an untrusted address in reverse mode
(tests/test_identity_e2e.py).
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import socket

import httpx
import pytest

from tests.conftest import UPSTREAM_KEY
from tests.hardening.conftest import assert_refused
from tests.support.gateway import Gateway, base_config
from tests.support.upstream import FakeUpstream

CHAT = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'


@pytest.fixture(scope="module")
def other():
    """A server no upstream declares (same machine, another port)."""
    upstream = FakeUpstream()
    yield upstream
    upstream.close()


@pytest.fixture(scope="module")
def gw(issuer, llm, tmp_path_factory):
    # declared by name: the same server reached by an IP literal is another, undeclared target
    config = base_config(issuer.url, f"http://localhost:{llm.port}/v1")
    config["identity"]["trusted_headers"] = {"sources": ["10.0.0.0/8"]}
    with Gateway(config, mode="regular", env={"DOUANE_TEST_UPSTREAM_KEY": UPSTREAM_KEY},
                 workdir=tmp_path_factory.mktemp("bypass")) as gateway:
        yield gateway


def proxy_auth(token: str) -> bytes:
    return b"Proxy-Authorization: Basic " + base64.b64encode(f"m:{token}".encode()) + b"\r\n"


def raw(gw: Gateway, data: bytes, timeout: float = 5, first_only: bool = True) -> bytes:
    """Send bytes to the proxy; its answer (the first complete response, or all until close)."""
    with socket.create_connection(("127.0.0.1", gw.port), timeout=timeout) as sock:
        sock.sendall(data)
        out = b""
        try:
            while chunk := sock.recv(65536):
                out += chunk
                head, sep, rest = out.partition(b"\r\n\r\n")
                length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                if first_only and sep and length and len(rest) >= int(length.group(1)):
                    break
        except TimeoutError:
            pass
    return out


def status_of(response: bytes) -> int:
    assert response.startswith(b"HTTP/1.1 "), response[:200]
    return int(response.split(b" ", 2)[1])


def header_of(response: bytes, name: str) -> str:
    head = response.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    values = [line.split(":", 1)[1].strip() for line in head.split("\r\n")[1:]
              if line.split(":", 1)[0].strip().lower() == name]
    assert values, f"no {name} header in {head!r}"
    return values[0]


def post(target: bytes, token: str, *, host: bytes | None = None, extra: bytes = b"",
         body: bytes = CHAT) -> bytes:
    host = host or target.split(b"/")[2]
    return (b"POST " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\n" + proxy_auth(token)
            + b"Content-Type: application/json\r\nConnection: close\r\n" + extra
            + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def test_the_declared_upstream_works(gw, llm, token):
    before = len(llm.requests)
    resp = raw(gw, post(f"http://localhost:{llm.port}/v1/chat/completions".encode(), token))
    assert status_of(resp) == 200
    assert len(llm.requests) == before + 1


@pytest.mark.parametrize("host", ["127.0.0.1", "2130706433", "0x7f000001", "127.1",
                                  "[::ffff:127.0.0.1]", "localhost.", "LOCALHOST.localdomain"])
def test_ip_literals_and_aliases_of_the_declared_host_are_refused(gw, llm, token, host):
    before = len(llm.requests)
    target = f"http://{host}:{llm.port}/v1/chat/completions".encode()
    resp = raw(gw, post(target, token))
    assert status_of(resp) in (400, 403, 502), resp[:300]
    assert len(llm.requests) == before


def test_undeclared_host_and_port_are_refused(gw, llm, other, token):
    for target in (f"http://127.0.0.1:{other.port}/v1/chat/completions",
                   f"http://localhost:{other.port}/v1/chat/completions",
                   f"http://localhost:{llm.port}/admin"):
        resp = raw(gw, post(target.encode(), token))
        assert status_of(resp) == 403 and b"undeclared_upstream" in resp, resp[:300]
    assert other.requests == []


def test_host_header_cannot_redirect_an_undeclared_request_line(gw, llm, other, token):
    # the request line names the target; a declared Host header does not launder it
    target = f"http://127.0.0.1:{other.port}/v1/chat/completions".encode()
    resp = raw(gw, post(target, token, host=f"localhost:{llm.port}".encode()))
    assert status_of(resp) == 403
    assert other.requests == []


@pytest.mark.parametrize("authority", ["127.0.0.1:22", "localhost:22", "localhost:8443",
                                       "localhost:443", "127.0.0.1:{other}"])
def test_connect_to_an_undeclared_port_is_refused(gw, other, token, authority):
    authority = authority.format(other=other.port).encode()
    resp = raw(gw, b"CONNECT " + authority + b" HTTP/1.1\r\nHost: " + authority + b"\r\n"
               + proxy_auth(token) + b"\r\n")
    assert status_of(resp) == 403 and b"undeclared_upstream" in resp, resp[:300]
    assert other.requests == []


@pytest.mark.parametrize("upgrade", [
    b"Upgrade: websocket\r\nConnection: Upgrade\r\n",
    b"Upgrade: WebSocket\r\nConnection: keep-alive, Upgrade\r\n",
    b"upgrade: websocket\r\nconnection: upgrade\r\n"])
def test_websocket_upgrade_through_the_proxy_is_refused(gw, llm, token, upgrade):
    before = len(llm.requests)
    target = f"http://localhost:{llm.port}/v1/realtime".encode()
    resp = raw(gw, b"GET " + target + b" HTTP/1.1\r\nHost: localhost\r\n" + proxy_auth(token)
               + upgrade + b"Sec-WebSocket-Version: 13\r\n"
               b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
    assert status_of(resp) == 403 and b"websocket_refused" in resp, resp[:300]
    assert len(llm.requests) == before


def test_trusted_header_from_an_untrusted_address_is_no_identity(gw, llm):
    before = len(llm.requests)
    target = f"http://localhost:{llm.port}/v1/chat/completions"
    with httpx.Client(proxy=gw.url) as client:
        resp = client.post(target, content=CHAT, headers={
            "content-type": "application/json", "x-forwarded-email": "ceo@corp.example",
            "x-auth-request-user": "ceo", "x-forwarded-for": "10.0.0.5",
            "x-real-ip": "10.0.0.5", "forwarded": "for=10.0.0.5"})
    assert_refused(gw, llm, before, resp, 407)


def test_trusted_header_beside_a_token_changes_nothing(gw, llm, token):
    before = len(llm.requests)
    target = f"http://localhost:{llm.port}/v1/chat/completions".encode()
    resp = raw(gw, post(target, token, extra=b"X-Forwarded-Email: ceo@corp.example\r\n"
                        b"X-Auth-Request-Groups: admins\r\n"))
    assert status_of(resp) == 200
    seen = llm.requests[before].headers
    assert "x-forwarded-email" not in seen and "x-auth-request-groups" not in seen
    record = gw.audit_record(header_of(resp, "x-douane-decision-id"))
    assert record["status"] == 200
    assert record["user"] == "mallory@corp.example" and "admins" not in record["groups"]


SMUGGLED = b"GET /v1/smuggled HTTP/1.1\r\nHost: localhost\r\n\r\n"


@pytest.mark.parametrize("framing", [
    # CL.TE: the proxy and the upstream could disagree on where the body ends
    b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
    b"Transfer-Encoding: chunked\r\nContent-Length: 200\r\n\r\n0\r\n\r\n" + SMUGGLED,
    b"Content-Length: 4\r\nContent-Length: 60\r\n\r\nabcd" + SMUGGLED,
    b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n" + SMUGGLED,
    b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
    b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
    b"Content-Length: +4\r\n\r\nabcd" + SMUGGLED,
    b"Content-Length: 4\r\n folded: continuation\r\n\r\nabcd" + SMUGGLED,
], ids=["cl_te", "te_cl", "two_cl", "te_twice", "te_unknown", "te_space", "cl_plus",
        "obs_fold"])
def test_header_smuggling_is_refused(gw, llm, token, framing):
    before = len(llm.requests)
    target = f"http://localhost:{llm.port}/v1/chat/completions".encode()
    resp = raw(gw, b"POST " + target + b" HTTP/1.1\r\nHost: localhost\r\n" + proxy_auth(token)
               + b"Content-Type: application/json\r\n" + framing)
    assert status_of(resp) >= 400, resp[:300]
    assert all("smuggled" not in r.path for r in llm.requests)
    assert len(llm.requests) == before


def test_identity_does_not_carry_over_on_a_keep_alive_connection(gw, llm, token):
    before = len(llm.requests)
    target = f"http://localhost:{llm.port}/v1/chat/completions".encode()
    first = post(target, token).replace(b"Connection: close\r\n", b"")
    second = (b"POST " + target + b" HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
              b"Content-Type: application/json\r\nContent-Length: " + str(len(CHAT)).encode()
              + b"\r\n\r\n" + CHAT)
    resp = raw(gw, first + second, first_only=False)
    statuses = [int(s) for s in re.findall(rb"HTTP/1\.1 (\d{3}) ", resp)]
    assert statuses == [200, 407], resp[:600]
    assert len(llm.requests) == before + 1


def test_host_header_inside_a_declared_tunnel_cannot_reach_another_server(gw, llm, other, token):
    # a plain-HTTP tunnel to the declared upstream, then a request naming another server
    authority = f"localhost:{llm.port}".encode()
    before = len(llm.requests)
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as sock:
        sock.sendall(b"CONNECT " + authority + b" HTTP/1.1\r\nHost: " + authority + b"\r\n"
                     + proxy_auth(token) + b"\r\n")
        assert status_of(sock.recv(65536)) == 200
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:"
                     + str(other.port).encode() + b"\r\nContent-Type: application/json\r\n"
                     b"Connection: close\r\nContent-Length: " + str(len(CHAT)).encode()
                     + b"\r\n\r\n" + CHAT)
        resp = b""
        while chunk := sock.recv(65536):
            resp += chunk
    # the tunnel's target is the declared server: that is where the request went, nowhere else,
    # under that server's own name
    assert other.requests == []
    assert status_of(resp) == 200 and len(llm.requests) == before + 1
    assert llm.requests[-1].headers["host"] == f"localhost:{llm.port}"


def test_a_connect_inside_a_declared_tunnel_is_refused_with_a_record(gw, llm, other, token):
    """mitmproxy answered a CONNECT inside a tunnel with its own HTML 400: no decision id, no
    audit record. Now douane's refusal, in the API's shape, recorded."""
    authority = f"localhost:{llm.port}".encode()
    inner = f"127.0.0.1:{other.port}".encode()
    before = len(llm.requests)
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as sock:
        sock.sendall(b"CONNECT " + authority + b" HTTP/1.1\r\nHost: " + authority + b"\r\n"
                     + proxy_auth(token) + b"\r\n")
        assert status_of(sock.recv(65536)) == 200
        sock.sendall(b"CONNECT " + inner + b" HTTP/1.1\r\nHost: " + inner + b"\r\n\r\n"
                     b"POST /v1/chat/completions HTTP/1.1\r\nHost: " + inner
                     + b"\r\nContent-Type: application/json\r\nContent-Length: "
                     + str(len(CHAT)).encode() + b"\r\n\r\n" + CHAT)
        resp = b""
        with contextlib.suppress(TimeoutError):
            while chunk := sock.recv(65536):
                resp += chunk
    assert status_of(resp) == 400 and b"nested_connect" in resp, resp[:300]
    assert other.requests == [] and len(llm.requests) == before
    record = gw.audit_record(header_of(resp, "x-douane-decision-id"))
    assert record["action"] == "refuse" and record["status"] == 400
    assert record["reasons"][0]["rule"] == "protocol.nested_connect"
    assert record["method"] == "CONNECT" and inner.decode() in record["reasons"][0]["message"]


def test_a_smuggling_refusal_is_douanes_with_a_record(gw, llm, token):
    """mitmproxy's own 400 for framing it reads but will not pass (Content-Length beside
    Transfer-Encoding; other framings fail its head reader: `protocol.bad_head`) is douane's
    refusal now, with a decision id and a record."""
    framing = b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    before = len(llm.requests)
    target = f"http://localhost:{llm.port}/v1/chat/completions".encode()
    resp = raw(gw, b"POST " + target + b" HTTP/1.1\r\nHost: localhost\r\n" + proxy_auth(token)
               + b"Content-Type: application/json\r\n" + framing)
    assert status_of(resp) == 400 and b"invalid_request" in resp, resp[:300]
    assert len(llm.requests) == before
    record = gw.audit_record(header_of(resp, "x-douane-decision-id"))
    assert record["reasons"][0]["rule"] == "protocol.invalid_request", record
    assert record["path"] == "/v1/chat/completions"


def refused_here(gw: Gateway, llm: FakeUpstream, before: int, resp: bytes, status: int) -> dict:
    """Refused with `status`, unseen by the upstream, audited as a refusal under its decision id."""
    assert status_of(resp) == status, resp[:300]
    assert len(llm.requests) == before
    record = gw.audit_record(header_of(resp, "x-douane-decision-id"))
    assert record["action"] == "refuse" and record["user"] == "mallory@corp.example"
    return record


@pytest.mark.parametrize("path", ["/v1/../admin/keys", "/v1/%2e%2e/admin/keys",
                                  "/v1/chat%2fcompletions", "/v1/%252e%252e/admin/keys",
                                  "/v1//chat/completions"])
def test_ambiguous_paths_through_the_proxy_are_refused(gw, llm, token, path):
    before = len(llm.requests)
    resp = raw(gw, post(f"http://localhost:{llm.port}{path}".encode(), token))
    assert refused_here(gw, llm, before, resp, 400)["reasons"][0]["rule"] == "route.path"


@pytest.mark.parametrize(("method", "path"), [("DELETE", "/v1/models/ft:gpt-4o:acme:prod"),
                                              ("GET", "/v1/organization/admin_api_keys")])
def test_ungoverned_operations_through_the_proxy_are_refused(gw, llm, token, method, path):
    before = len(llm.requests)
    target = f"http://localhost:{llm.port}{path}".encode()
    resp = raw(gw, method.encode() + b" " + target + b" HTTP/1.1\r\nHost: localhost\r\n"
               + proxy_auth(token) + b"Connection: close\r\n\r\n")
    record = refused_here(gw, llm, before, resp, 403)
    assert record["reasons"][0]["rule"] == "route.operation" and b"endpoint_not_governed" in resp


def test_ungoverned_operation_inside_a_declared_tunnel_is_refused(gw, llm, token):
    authority = f"localhost:{llm.port}".encode()
    before = len(llm.requests)
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as sock:
        sock.sendall(b"CONNECT " + authority + b" HTTP/1.1\r\nHost: " + authority + b"\r\n"
                     + proxy_auth(token) + b"\r\n")
        assert status_of(sock.recv(65536)) == 200
        sock.sendall(b"GET /v1/files/file-abc/content HTTP/1.1\r\nHost: " + authority
                     + b"\r\nConnection: close\r\n\r\n")
        resp = b""
        while chunk := sock.recv(65536):
            resp += chunk
    refused_here(gw, llm, before, resp, 403)


@pytest.mark.parametrize("declared", [b"", b"Trailer: X-Checksum\r\n"], ids=["undeclared", "declared"])
def test_request_trailers_are_refused_with_a_record(gw, llm, token, declared):
    # mitmproxy 12.2 cannot read HTTP/1.1 trailers: its connection handler raised before any hook,
    # the client waited for the idle timeout and nothing was audited
    before = len(llm.requests)
    target = f"http://localhost:{llm.port}/v1/chat/completions".encode()
    resp = raw(gw, b"POST " + target + b" HTTP/1.1\r\nHost: localhost\r\n" + proxy_auth(token)
               + b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n" + declared
               + b"\r\n" + b"%x\r\n" % len(CHAT) + CHAT + b"\r\n0\r\nX-Checksum: sk-trailer\r\n\r\n",
               timeout=10)
    assert status_of(resp) == 400, resp[:300]
    assert len(llm.requests) == before
    record = gw.audit_record(header_of(resp, "x-douane-decision-id"))
    assert record["action"] == "refuse" and record["status"] == 400


def test_answer_trailers_are_dropped(gw, llm, token):
    # the same reader read the upstream's answer: a trailer section killed the connection
    def answer(handler, _doc):
        data = json.dumps({"id": "c", "object": "chat.completion", "model": "m", "choices": [
            {"index": 0, "finish_reason": "stop",
             "message": {"role": "assistant", "content": "fine"}}]}).encode()
        handler.send_response(200)
        handler.send_header("content-type", "application/json")
        handler.send_header("transfer-encoding", "chunked")
        handler.end_headers()
        handler.wfile.write(b"%x\r\n%s\r\n0\r\nX-Note: project nightingale\r\n\r\n"
                            % (len(data), data))
    llm.answer = answer
    try:
        target = f"http://localhost:{llm.port}/v1/chat/completions".encode()
        resp = raw(gw, post(target, token), timeout=10, first_only=False)
    finally:
        llm.answer = None
    assert status_of(resp) == 200, resp[:300]
    assert resp.endswith(b"0\r\n\r\n") and b"nightingale" not in resp, resp[-300:]
