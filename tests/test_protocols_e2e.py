"""Protocols through a real mitmdump: streams stay streams, refusals are each SDK's typed errors,
compressed bodies are inspected, MCP works with the official client."""

from __future__ import annotations

import asyncio
import gzip
import json

import anthropic
import httpx
import httpx2
import openai
import pytest
import zstandard
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from tests.conftest import UPSTREAM_KEY
from tests.support.gateway import Gateway, base_config
from tests.support.upstream import DEFAULT_REPLY, Gate
from tests.support.waiting import until


@pytest.fixture(scope="module")
def gw(issuer, llm, tmp_path_factory):
    config = base_config(issuer.url, llm.url)
    config["upstreams"]["claude"] = {"url": llm.url + "/anthropic", "protocol": "anthropic",
                                     "credential": {"env": "DOUANE_TEST_UPSTREAM_KEY"}}
    config["gateway"] = {"body_size_limit": "64k"}
    with Gateway(config, mode=f"reverse:{llm.url}", env={"DOUANE_TEST_UPSTREAM_KEY": UPSTREAM_KEY},
                 workdir=tmp_path_factory.mktemp("protocols")) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def token(issuer):
    return issuer.mint("alice@corp.example", ["engineering"])


def test_openai_chat_stream_stays_a_stream(gw, llm, token):
    # the upstream sends the role and the first words, then holds the rest until the client has
    # read those words: a gateway that buffered the stream would have the gate time out
    llm.gate = gate = Gate(after=2)
    try:
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key=token, max_retries=0)
        stream = client.chat.completions.create(
            model="gpt-4o", stream=True, messages=[{"role": "user", "content": "hi"}])
        text = ""
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                gate.open()
                text += chunk.choices[0].delta.content
    finally:
        llm.gate = None
        gate.open()
    assert text == DEFAULT_REPLY
    # the first words arrived while the upstream still held the rest (not buffered)
    assert gate.reached.is_set() and not gate.late
    decision_id = stream.response.headers["x-douane-decision-id"]
    record = gw.audit_record(decision_id)
    assert record["interaction"]["inspected"] == ["request", "response-stream"]
    assert record["interaction"]["stream"] is True


def test_openai_responses_stream(gw, token):
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=token, max_retries=0)
    with client.responses.stream(model="gpt-4.1", input="hi") as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert text == DEFAULT_REPLY == final.output_text


def test_anthropic_stream(gw, token):
    client = anthropic.Anthropic(base_url=gw.url + "/anthropic", api_key=token, max_retries=0)
    with client.messages.stream(model="claude-test", max_tokens=50,
                                messages=[{"role": "user", "content": "hi"}]) as stream:
        text = "".join(stream.text_stream)
    assert text == DEFAULT_REPLY


def test_openai_sdk_gets_typed_errors(gw, llm, token):
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=token, max_retries=0)
    before = len(llm.requests)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="gpt-4o", messages="not a list")
    assert "messages must be a list" in str(err.value) and "douane decision dcn_" in str(err.value)
    with pytest.raises(openai.PermissionDeniedError) as err:
        client.post("/batches", body={"input_file_id": "f"}, cast_to=object)
    assert err.value.body["code"] == "endpoint_not_governed"
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(model="gpt-4o",
                                       messages=[{"role": "user", "content": "x" * 70000}])
    assert err.value.status_code == 413
    assert len(llm.requests) == before


def test_anthropic_sdk_gets_typed_errors(gw, llm, token):
    client = anthropic.Anthropic(base_url=gw.url + "/anthropic", api_key=token, max_retries=0)
    before = len(llm.requests)
    with pytest.raises(anthropic.BadRequestError) as err:
        client.messages.create(model="claude-test", max_tokens=5, messages="nope")
    assert err.value.body["type"] == "error"
    assert "douane decision dcn_" in err.value.body["error"]["message"]
    assert len(llm.requests) == before


@pytest.mark.parametrize("encoding", ["gzip", "zstd"])
def test_compressed_bodies_are_decoded_and_inspected(gw, llm, token, encoding):
    # duplicate keys are only visible after decoding: refusing them proves the body was read
    body = b'{"model": "a", "model": "b", "messages": []}'
    packed = gzip.compress(body) if encoding == "gzip" else zstandard.compress(body)
    before = len(llm.requests)
    resp = httpx.post(gw.url + "/v1/chat/completions", content=packed,
                      headers={"authorization": f"Bearer {token}", "content-encoding": encoding,
                               "content-type": "application/json"})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "duplicate_json_key"
    resp = httpx.post(gw.url + "/v1/chat/completions", content=body,
                      headers={"authorization": f"Bearer {token}", "content-encoding": "x-evil",
                               "content-type": "application/json"})
    assert resp.status_code == 415
    assert len(llm.requests) == before


def test_websocket_upgrade_is_refused(gw, llm, token):
    before = len(llm.requests)
    resp = httpx.get(gw.url + "/v1/realtime", headers={
        "authorization": f"Bearer {token}", "upgrade": "websocket", "connection": "Upgrade",
        "sec-websocket-version": "13", "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ=="})
    assert resp.status_code == 403 and resp.json()["error"]["code"] == "websocket_refused"
    assert len(llm.requests) == before


@pytest.fixture(scope="module")
def mcp_gw(issuer, mcp_server, tmp_path_factory):
    config = base_config(issuer.url, mcp_server + "/mcp", protocol="mcp")
    with Gateway(config, mode=f"reverse:{mcp_server}", env={"DOUANE_TEST_UPSTREAM_KEY": UPSTREAM_KEY},
                 workdir=tmp_path_factory.mktemp("mcp")) as gateway:
        yield gateway


async def mcp_session(gw: Gateway, token: str, body):
    http_client = httpx2.AsyncClient(headers={"authorization": f"Bearer {token}"})
    async with Client(streamable_http_client(gw.url + "/mcp", http_client=http_client)) as client:
        return await body(client)


def test_mcp_client_works_through_douane(mcp_gw, token):
    async def body(client):
        tools = await client.list_tools()
        called = await client.call_tool("echo", {"text": "bonjour"})
        resource = await client.read_resource("file:///docs/readme.txt")
        prompt = await client.get_prompt("summarize", {"topic": "customs"})
        return tools, called, resource, prompt

    tools, called, resource, prompt = asyncio.run(mcp_session(mcp_gw, token, body))
    assert {t.name for t in tools.tools} == {"echo", "lookup_customer", "delete_records",
                                             "archive_table"}
    assert called.content[0].text == "bonjour"
    assert "jane.doe@example.org" in resource.contents[0].text
    assert "customs" in prompt.messages[0].content.text
    # the discovery probe and the four calls (the module's gateway holds other tests' records,
    # and the last record may be written a burst later)
    called_ops = {"mcp:server/discover", "mcp:tools/list", "mcp:tools/call", "mcp:resources/read",
                  "mcp:prompts/get"}
    records: list[dict] = []

    def operations() -> set:
        records[:] = mcp_gw.audit_records()
        return {r.get("interaction", {}).get("operation") for r in records}

    assert until(lambda: called_ops <= operations()), operations()
    # the SDK's discovery probe is governed and passed: the client speaks 2026-07-28, statelessly
    assert "mcp:initialize" not in operations()
    call = next(r for r in records if r.get("interaction", {}).get("operation") == "mcp:tools/call")
    assert call["interaction"]["tool"] == "echo" and "response" in " ".join(
        call["interaction"]["inspected"])


def test_mcp_refusals_are_mcp_errors(mcp_gw, token):
    async def body(client):
        return await client.list_tools()

    with pytest.raises(BaseException) as err:
        asyncio.run(mcp_session(mcp_gw, "not-a-token-" + "x" * 30, body))
    errors = [err.value]
    flat = []
    while errors:
        e = errors.pop()
        if isinstance(e, BaseExceptionGroup):
            errors += list(e.exceptions)
        else:
            flat.append(e)
    assert any(isinstance(e, MCPError) and "douane decision dcn_" in str(e) for e in flat)


def test_mcp_unknown_method_gets_a_json_rpc_error(mcp_gw, token):
    resp = httpx.post(mcp_gw.url + "/mcp", headers={
        "authorization": f"Bearer {token}", "accept": "application/json, text/event-stream"},
        json={"jsonrpc": "2.0", "id": 9, "method": "sampling/createMessage", "params": {}})
    assert resp.status_code == 200
    doc = resp.json()
    assert doc["id"] == 9 and doc["error"]["data"]["reason"] == "method_not_governed"
    assert json.dumps(doc).count("douane decision") == 1
