"""Both eras of MCP through a real mitmdump, with the official `mcp` SDK's client and MCPServer: the
client's default `auto` mode (a `server/discover` probe), `legacy` (the initialize handshake) and a
pinned `2026-07-28` (stateless requests) list, call, read and get what the caller's grant allows
and are refused the rest; the 2026-07-28 request metadata headers must match the body; refusals
keep the request's JSON-RPC id; filtered listings are marked private to their caller."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.types import ElicitResult

from tests.support.gateway import Gateway
from tests.support.waiting import until

GRANTS = """\
version: 1
groups:
  interns:
    upstreams:
      crm:
        tools: {allow: ["echo"]}
        resources: ["file:///docs/*"]
        prompts: ["summarize"]
  archivists:
    upstreams:
      crm: {tools: {allow: ["archive_table"]}}
rules:
  - {id: deny.codename, literal: "project nightingale", score: 90}
thresholds: {hold: 50, block: 80}
"""
MODERN = "2026-07-28"


@pytest.fixture(scope="module")
def setup(issuer, mcp_server, tmp_path_factory):
    work = tmp_path_factory.mktemp("revision")
    (work / "grants.yaml").write_text(GRANTS)
    config = {"version": 1,
              "identity": {"issuers": [{"issuer": issuer.url, "audience": "douane-tests"}]},
              "upstreams": {"crm": {"url": mcp_server + "/mcp", "protocol": "mcp"}},
              "policy": {"files": [str(work / "grants.yaml")]}, "recording": {}}
    with Gateway(config, mode=f"reverse:{mcp_server}", workdir=work / "gw") as gw:
        yield gw


def received(mcp_server: str) -> int:
    return httpx.get(mcp_server + "/_received").json()["requests"]


@pytest.mark.parametrize("mode", ["auto", "legacy", MODERN])
def test_every_client_mode_lists_calls_reads_and_is_refused(setup, issuer, mode):
    gw = setup
    user = f"{mode.replace('-', '')}@corp.example"
    token = issuer.mint(user, ["interns"])
    listings: list[dict] = []

    async def keep_listings(response: httpx2.Response) -> None:
        await response.aread()
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            messages = [line[5:] for line in response.text.splitlines()
                        if line.startswith("data:")]
        else:
            messages = [response.text]
        for doc in (json.loads(m) for m in messages if m.strip()):
            if isinstance(doc, dict) and "tools" in (doc.get("result") or {}):
                listings.append(doc["result"])

    async def run():
        http_client = httpx2.AsyncClient(headers={"authorization": f"Bearer {token}"},
                                         event_hooks={"response": [keep_listings]})
        async with Client(streamable_http_client(gw.url + "/mcp", http_client=http_client),
                          mode=mode) as client:
            tools = await client.list_tools()
            called = await client.call_tool("echo", {"text": "bonjour"})
            refused = await client.call_tool("lookup_customer", {"customer_id": "7"})
            resource = await client.read_resource("file:///docs/readme.txt")
            prompt = await client.get_prompt("summarize", {"topic": "customs"})
            return tools, called, refused, resource, prompt

    tools, called, refused, resource, prompt = asyncio.run(run())
    assert [t.name for t in tools.tools] == ["echo"]  # filtered to the grant
    assert called.content[0].text == "bonjour"
    assert refused.is_error and "tool lookup_customer is not granted" in refused.content[0].text
    assert "jane.doe@example.org" in resource.contents[0].text
    assert "customs" in prompt.messages[0].content.text
    # the filtered listing is the caller's own, in both eras (the legacy server sets no scope)
    assert listings and all(result["cacheScope"] == "private" for result in listings)
    # the probe (auto) or the handshake (legacy) and the five calls: the last may be written a
    # burst after the client has its answer
    expected = 5 + (mode in ("auto", "legacy"))
    called_ops = {"mcp:tools/list", "mcp:tools/call", "mcp:resources/read", "mcp:prompts/get"}
    records: list[dict] = []

    def seen() -> set:
        records[:] = [r for r in gw.audit_records() if r.get("user") == user]
        return {r.get("interaction", {}).get("operation") for r in records}

    assert until(lambda: called_ops <= seen() and len(records) >= expected), seen()
    operations = seen()
    # auto mode's probe is governed and passed: the client stays in the 2026-07-28 era
    assert ("mcp:server/discover" in operations) == (mode == "auto")
    assert ("mcp:initialize" in operations) == (mode == "legacy")
    blocked = [r for r in records if r.get("action") == "block"]
    assert len(blocked) == 1 and blocked[0]["interaction"]["tool"] == "lookup_customer"
    # recorded per user: a stateless client by its connection, a handshake-era one by its
    # session once it has one (its initialize, by the connection)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        files = {f.name[:4] for f in gw.state_dir.glob(f"recordings/{user}--*/*/*.mitm")}
        if files == ({"conn", "mcp-"} if mode == "legacy" else {"conn"}):
            break
        time.sleep(0.1)
    assert files == ({"conn", "mcp-"} if mode == "legacy" else {"conn"}), files


def modern(gw: Gateway, token: str | None, body: dict, **headers: str) -> httpx.Response:
    sent = {"accept": "application/json, text/event-stream", "mcp-protocol-version": MODERN,
            **({"authorization": f"Bearer {token}"} if token else {}), **headers}
    body["params"]["_meta"] = {"io.modelcontextprotocol/protocolVersion": MODERN,
                               "io.modelcontextprotocol/clientInfo": {"name": "t", "version": "1"},
                               "io.modelcontextprotocol/clientCapabilities": {}}
    return httpx.post(gw.url + "/mcp", json=body, headers=sent, timeout=30)


def call(rid: int, tool: str, arguments: dict) -> dict:
    return {"jsonrpc": "2.0", "id": rid, "method": "tools/call",
            "params": {"name": tool, "arguments": arguments}}


def test_headers_must_say_what_the_body_says(setup, issuer, mcp_server):
    gw = setup
    token = issuer.mint("hedy@corp.example", ["interns"])
    before = received(mcp_server)
    # a header naming an allowed tool over a body calling a denied one
    cases = [
        ({"mcp-method": "tools/call", "mcp-name": "echo"}, call(11, "lookup_customer",
                                                                {"customer_id": "7"})),
        ({"mcp-method": "tools/list", "mcp-name": "echo"}, call(12, "echo", {"text": "a"})),
        ({"mcp-name": "echo"}, call(13, "echo", {"text": "a"})),  # Mcp-Method missing
        ({"mcp-method": "tools/call"}, call(14, "echo", {"text": "a"})),  # Mcp-Name missing
        ({"mcp-method": "tools/call", "mcp-name": "echo", "mcp-param-text": "other"},
         call(15, "echo", {"text": "a"})),
        ({"mcp-method": "tools/call", "mcp-name": "=?base64?" +
          base64.b64encode(b"echo").decode() + "?=", "mcp-protocol-version": "2025-11-25"},
         call(16, "echo", {"text": "a"})),  # the body says 2026-07-28
    ]
    for headers, body in cases:
        refused = modern(gw, token, body, **headers)
        assert refused.status_code == 400, (headers, refused.text)
        doc = refused.json()
        assert doc["id"] == body["id"] and doc["error"]["code"] == -32020
        assert doc["error"]["data"]["reason"] == "header_mismatch"
    # a GET (the handshake era's server stream) carries no request metadata
    get = httpx.get(gw.url + "/mcp", headers={"authorization": f"Bearer {token}",
                                              "accept": "text/event-stream",
                                              "mcp-method": "tools/call"}, timeout=30)
    assert get.status_code == 400 and get.json()["error"]["code"] == -32020
    assert received(mcp_server) == before  # the upstream got nothing
    records = gw.audit_where(lambda r: r.get("user") == "hedy@corp.example",
                             count=len(cases) + 1)
    assert all(r["status"] == 400 and r["reasons"][0]["rule"] == "protocol.header_mismatch"
               for r in records)
    # headers that match (plain, base64, a mirrored argument) pass, stateless: no session
    ok = modern(gw, token, call(17, "echo", {"text": "hé"}), **{
        "mcp-method": "tools/call", "mcp-name": "=?base64?" + base64.b64encode(b"echo").decode()
        + "?=", "mcp-param-text": "=?base64?" + base64.b64encode("hé".encode()).decode() + "?="})
    assert ok.status_code == 200 and ok.json()["result"]["content"][0]["text"] == "hé"
    assert "mcp-session-id" not in ok.headers
    # policy reads the body, whatever the headers say: a denied call is refused as such
    denied = modern(gw, token, call(18, "lookup_customer", {"customer_id": "7"}),
                    **{"mcp-method": "tools/call", "mcp-name": "lookup_customer"})
    assert denied.json()["id"] == 18 and denied.json()["result"]["isError"]
    assert received(mcp_server) == before + 1


def test_refusals_keep_the_request_id(setup, issuer):
    gw = setup
    body = call(41, "echo", {"text": "a"})
    unauthenticated = modern(gw, None, body, **{"mcp-method": "tools/call", "mcp-name": "echo"})
    assert unauthenticated.status_code == 401
    assert unauthenticated.json()["id"] == 41 and unauthenticated.json()["error"]["code"] == -32001
    # a body too large to read for its id, or not JSON-RPC, keeps `null`
    odd = httpx.post(gw.url + "/mcp", content=b"[1, 2]", headers={
        "content-type": "application/json", "accept": "application/json, text/event-stream"})
    assert odd.status_code == 401 and odd.json()["id"] is None
    token = issuer.mint("ida@corp.example", ["interns"])
    unknown = modern(gw, token, {"jsonrpc": "2.0", "id": "x-9", "method": "tasks/list",
                                 "params": {}}, **{"mcp-method": "tasks/list"})
    assert unknown.json()["id"] == "x-9"
    assert unknown.json()["error"]["data"]["reason"] == "method_not_governed"


def test_change_notifications_are_listened_to_but_resource_subscriptions_are_refused(
        setup, issuer, mcp_server):
    gw = setup
    token = issuer.mint("lena@corp.example", ["interns"])

    async def run(**wanted):
        http_client = httpx2.AsyncClient(headers={"authorization": f"Bearer {token}"})
        async with Client(streamable_http_client(gw.url + "/mcp", http_client=http_client),
                          mode=MODERN) as client:
            try:
                async with client.listen(**wanted) as sub:
                    return sub.honored
            except Exception as e:  # the refusal, as the SDK raises it
                return e

    honored = asyncio.run(run(tools_list_changed=True))
    assert getattr(honored, "tools_list_changed", None) is True, honored
    before = received(mcp_server)
    refused = asyncio.run(run(resource_subscriptions=["file:///secret/keys.txt"]))
    assert "not resource subscriptions" in str(refused), refused
    assert received(mcp_server) == before


@pytest.mark.parametrize("mode", ["auto", MODERN])
def test_multi_round_trip_requests_pass_and_the_answers_are_inspected(setup, issuer, mcp_server,
                                                                      mode):
    gw = setup
    token = issuer.mint(f"{mode.replace('-', '')}@archive.example", ["archivists"])
    asked: list[str] = []

    async def run(answer: str):
        async def elicit(context, params):
            asked.append(params.message)
            return ElicitResult(action="accept", content={"why": answer})

        http_client = httpx2.AsyncClient(headers={"authorization": f"Bearer {token}"})
        async with Client(streamable_http_client(gw.url + "/mcp", http_client=http_client),
                          mode=mode, elicitation_callback=elicit) as client:
            return await client.call_tool("archive_table", {"table": "orders"})

    done = asyncio.run(run(f"quarterly cleanup ({mode})"))
    assert asked == ["Why archive orders?"]  # asked in an InputRequiredResult, through douane
    assert done.content[0].text == f"archived orders: quarterly cleanup ({mode})"
    retried = [b for b in httpx.get(mcp_server + "/_received").json()["bodies"]
               if f"quarterly cleanup ({mode})" in b]
    assert len(retried) == 1 and "requestState" in retried[0]  # the server's state came back
    refused = asyncio.run(run("Project Nightingale, obviously"))
    assert refused.is_error and "deny rule deny.codename matched" in refused.content[0].text
    bodies = httpx.get(mcp_server + "/_received").json()["bodies"]
    assert not any("Nightingale" in b for b in bodies)  # the answer never reached the server
