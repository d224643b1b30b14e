"""Review of stop 29's forwarding allowlist (`douane.forwarding`) through a real gateway, with
requests no SDK writes: a header given twice, folded, a name spelt with a space or a control
character; a parameter given twice under another spelling."""

from __future__ import annotations

import json
import socket
import urllib.parse

import httpx
import pytest
import yaml

from tests.conftest import UPSTREAM_KEY
from tests.hardening.conftest import assert_refused
from tests.hardening.test_provider_headers import MESSAGE, granted, gw  # noqa: F401
from tests.support.gateway import Gateway, base_config


def raw(gateway, head: bytes, body: bytes = b"") -> httpx.Response:
    """One request written as is; its answer read back as httpx would."""
    port = urllib.parse.urlsplit(gateway.url).port
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head + b"\r\n" + body)
        return read_answer(s)


def read_answer(s: socket.socket) -> httpx.Response:
    """An answer read until closed, or its Content-Length is in."""
    data = b""
    while chunk := s.recv(65536):
        data += chunk
        head, ended, rest = data.partition(b"\r\n\r\n")
        length = [int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:")]
        if ended and (length and len(rest) >= length[0] or not length and
                      b"chunked" in head.lower() and rest.endswith(b"0\r\n\r\n")):
            break
    status, _, rest = data.partition(b"\r\n")
    headers, _, content = rest.partition(b"\r\n\r\n")
    fields = [tuple(x.strip() for x in line.split(b":", 1)) for line in headers.split(b"\r\n")]
    return httpx.Response(int(status.split()[1]), headers=fields, content=content)


def message(gateway, user: str, extra: bytes) -> httpx.Response:
    body = json.dumps(MESSAGE).encode()
    return raw(gateway, b"POST /anthropic/v1/messages HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
               b"Authorization: Bearer " + user.encode() + b"\r\nContent-Type: application/json"
               b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n" + extra, body)


@pytest.mark.parametrize("extra", [
    b"anthropic-beta: files-api-2025-04-14\r\nanthropic-beta: mcp-client-2025-04-04\r\n",
    b"Anthropic-Beta: files-api-2025-04-14\r\nANTHROPIC-BETA: mcp-client-2025-04-04\r\n",
    b"anthropic-beta: files-api-2025-04-14,\r\n mcp-client-2025-04-04\r\n",
    b"anthropic-beta: files-api-2025-04-14\r\n\tmcp-client-2025-04-04\r\n",
    b"anthropic-beta: files-api-2025-04-14, , mcp-client-2025-04-04\r\n",
    b"anthropic-beta: files-api-2025-04-14, MCP-Client-2025-04-04\r\n",
], ids=["twice", "twice-cased", "folded", "folded-tab", "empty-between", "upper"])
def test_a_beta_beside_a_granted_one_is_refused(gw, llm, granted, extra):  # noqa: F811
    before = len(llm.requests)
    resp = message(gw, granted, extra)
    record = assert_refused(gw, llm, before, resp, 403)
    assert record["reasons"][0]["rule"] in ("grant.beta", "route.header"), record


@pytest.mark.parametrize("extra", [b"anthropic-beta : mcp-client-2025-04-04\r\n",
                                   b"anthropic-beta\t: mcp-client-2025-04-04\r\n",
                                   b"openai-organization : org-other\r\n"])
def test_a_name_spelt_with_a_space_never_reaches_the_provider(gw, llm, granted, extra):  # noqa: F811
    before = len(llm.requests)
    resp = message(gw, granted, extra)
    if resp.status_code == 200:
        seen = llm.requests[before].headers
        assert not any(k.strip().lower() in ("anthropic-beta", "openai-organization")
                       for k in seen), seen
    else:
        assert len(llm.requests) == before


def test_a_refused_name_is_recorded_bounded_and_printable(gw, llm, token):  # noqa: F811
    name = b"anthropic-\x1b[31mred\x07" + b"x" * 5000
    before = len(llm.requests)
    resp = message(gw, token, name + b": 1\r\n")
    record = assert_refused(gw, llm, before, resp, 400, 403, 431)
    text = json.dumps(record)
    assert "\x1b" not in text and "\x07" not in text, record["reasons"]
    assert len(text) < 5000
    assert "\x1b" not in gw.log_text()


@pytest.mark.parametrize("query", ["limit[]=1&limit[]=2", "after[]=file-a&after[]=file-b",
                                   "after[x]=file-a", "%6Cimit=1&limit=2",
                                   "limit=1&limit%5B%5D=2", "purpose=batch&purpose[]=x"])
def test_a_parameter_given_twice_in_any_spelling_is_refused(gw, llm, granted, query):  # noqa: F811
    before = len(llm.requests)
    resp = httpx.get(f"{gw.url}/v1/files?{query}", headers={"authorization": f"Bearer {granted}"})
    record = assert_refused(gw, llm, before, resp, 400)
    assert record["reasons"][0]["rule"] == "route.query", record


def test_an_idempotency_key_is_its_users(gw, llm, token, granted):  # noqa: F811
    """Every user reaches the provider with the org's one credential, which is what a provider
    keys a replayed answer by: another user sending the same `Idempotency-Key` (seen in a log, a
    screen) would be served this user's answer. It reaches the provider as the user's own."""
    sent = []
    for user in (token, granted, token):
        before = len(llm.requests)
        resp = httpx.post(f"{gw.url}/v1/chat/completions", json={
            "model": "m", "messages": [{"role": "user", "content": "hi"}]},
            headers={"authorization": f"Bearer {user}", "idempotency-key": "retry-7f3a"})
        assert resp.status_code == 200, resp.text
        sent.append(llm.requests[before].headers.get("idempotency-key"))
    assert sent[0] == sent[2] and sent[0] != sent[1] and "retry-7f3a" not in sent, sent
    assert all(s and len(s) <= 64 for s in sent), sent


@pytest.mark.parametrize("extra", [
    b"x-stainless-lang: python\r\n anthropic-beta: mcp-client-2025-04-04\r\n",
    b"user-agent: sdk\r\n\tanthropic-beta: mcp-client-2025-04-04\r\n",
    b"anthropic-version: 2023-06-01\r\n x\r\n"])
def test_a_folded_value_is_not_forwarded_folded(gw, llm, token, extra):  # noqa: F811
    """A value folded onto a continuation line went to the provider with its `\\r\\n ` (RFC
    9112: a gateway rejects an obs-fold or makes it a space): a server reading the next line as
    a header of its own would take `anthropic-beta` nobody granted."""
    before = len(llm.requests)
    resp = message(gw, token, extra)
    record = assert_refused(gw, llm, before, resp, 400, 403)
    assert record["reasons"][0]["rule"] == "route.header", record



@pytest.mark.parametrize("protocols", [
    b"Sec-WebSocket-Protocol: realtime\r\nSec-WebSocket-Protocol: openai-insecure-api-key.sk-x\r\n",
    b"sec-websocket-protocol: realtime,OpenAI-Project.proj_other\r\n",
    b"sec-websocket-protocol: realtime, openai-beta.realtime-v1,openai-organization.o\r\n",
    b"sec-websocket-protocol: realtime,\r\n openai-organization.org-other\r\n",
    b"sec-websocket-protocol: realtime\topenai-organization.org-other\r\n"],
    ids=["twice", "cased", "third", "folded", "tab"])
def test_a_realtime_subprotocol_naming_an_account_is_refused_in_any_spelling(
        gw, llm, token, protocols):  # noqa: F811
    before = len(llm.requests)
    resp = raw(gw, b"GET /v1/realtime?model=m HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
               b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
               b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
               b"Authorization: Bearer " + token.encode() + b"\r\n" + protocols)
    record = assert_refused(gw, llm, before, resp, 403)
    assert record["reasons"][0]["rule"] == "route.header", record



@pytest.fixture(scope="module")
def narrow(issuer, llm, tmp_path_factory):
    """A gateway whose one grant allows the tool `lookup` only; a token of that grant."""
    work = tmp_path_factory.mktemp("review-tools")
    policy = {"version": 1, "default": {"upstreams": {"llm": {
        "models": ["*"], "tools": {"allow": ["lookup"]}}}}}
    (work / "policy.yaml").write_text(yaml.safe_dump(policy))
    config = base_config(issuer.url, llm.url + "/v1", policy={"files": [str(work / "policy.yaml")]})
    with Gateway(config, mode=f"reverse:{llm.url}", env={"DOUANE_TEST_UPSTREAM_KEY": UPSTREAM_KEY},
                 workdir=work) as gateway:
        yield gateway, issuer.mint("nina@corp.example", ["staff"])


@pytest.mark.parametrize("name", ["delete_all", ["delete_all"], {"n": "delete_all"}, None])
def test_a_tool_is_a_tool_whatever_its_name(narrow, llm, name):
    """A function tool whose `name` is not a string (or is missing) was not counted as a tool
    (Anthropic's are), so a grant allowing some tools never read it: it went on."""
    gateway, user = narrow
    fn = {"parameters": {"type": "object"}} | ({} if name is None else {"name": name})
    before = len(llm.requests)
    resp = httpx.post(f"{gateway.url}/v1/chat/completions", headers={
        "authorization": f"Bearer {user}"}, json={
        "model": "m", "messages": [{"role": "user", "content": "hi"}],
        "tools": [{"type": "function", "function": fn}]})
    record = assert_refused(gateway, llm, before, resp, 400, 403)
    assert "grant.tool" in [r["rule"] for r in record["reasons"]], record
