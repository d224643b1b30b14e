"""Policy through a real mitmdump: blocked prompts never reach the upstream, holds wait for an
approver, MCP listings are filtered, limits answer 429, and reloads take effect live."""

from __future__ import annotations

import asyncio
import time

import httpx2
import openai
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from tests.conftest import UPSTREAM_KEY
from tests.support.gateway import Gateway, base_config
from tests.support.upstream import FakeUpstream

GRANTS = """\
version: 1
groups:
  engineering:
    upstreams:
      llm: {models: ["gpt-*"], max_tokens: 1000}
      crm:
        tools: {allow: ["echo", "lookup_*", "delete_records"]}
        resources: ["file:///docs/*"]
    limits: {requests_per_minute: 100}
  interns:
    upstreams:
      llm: {models: ["gpt-4o-mini"], max_tokens: 100}
      crm: {tools: {allow: ["echo"]}}
    limits: {requests_per_minute: 3}
rules:
  - {id: deny.codename, literal: "project nightingale", score: 90}
tool_risk:
  - {tools: ["delete_*"], score: 50}
thresholds: {hold: 50, block: 80}
"""


@pytest.fixture(scope="module")
def setup(issuer, mcp_server, tmp_path_factory):
    llm = FakeUpstream()
    work = tmp_path_factory.mktemp("policy")
    (work / "grants.yaml").write_text(GRANTS)
    config = base_config(issuer.url, llm.url, policy={"files": [str(work / "grants.yaml")],
                                                       "reload_seconds": 1})
    config["upstreams"]["crm"] = {"url": mcp_server + "/mcp", "protocol": "mcp"}
    with Gateway(config, mode="regular", env={"DOUANE_TEST_UPSTREAM_KEY": UPSTREAM_KEY},
                 workdir=work / "gw") as gw:
        yield gw, llm, work / "grants.yaml"
    llm.close()


def client(gw, llm, token) -> openai.OpenAI:
    return openai.OpenAI(base_url=llm.url + "/v1", api_key="unused", max_retries=0,
                         http_client=openai.DefaultHttpxClient(proxy=gw.proxy_url("u", token)))


def ask(c: openai.OpenAI, text: str, model: str = "gpt-4o-mini", max_tokens: int = 50) -> str:
    reply = c.chat.completions.create(model=model, max_tokens=max_tokens,
                                      messages=[{"role": "user", "content": text}])
    return reply.choices[0].message.content


def test_blocked_prompt_never_reaches_the_upstream(setup, issuer):
    gw, llm, _ = setup
    c = client(gw, llm, issuer.mint("alice@corp", ["engineering"]))
    before = len(llm.requests)
    with pytest.raises(openai.PermissionDeniedError) as err:
        ask(c, "Summarise Project\u200b Nightingale for me")
    assert len(llm.requests) == before
    message = str(err.value)
    assert "deny rule deny.codename matched" in message and "douane decision dcn_" in message
    decision_id = err.value.response.headers["x-douane-decision-id"]
    record = gw.audit_record(decision_id)
    assert record["action"] == "block" and record["risk"] == 90 and record["policy_version"]
    assert "nightingale" not in gw.audit_file().read_text().lower().replace("deny.codename", "")
    assert ask(c, "hello") == "Hello from the fake upstream."


def test_grants_differ_per_group(setup, issuer):
    gw, llm, _ = setup
    intern = client(gw, llm, issuer.mint("ian@corp", ["interns"]))
    with pytest.raises(openai.PermissionDeniedError) as err:
        ask(intern, "hi", model="gpt-4.1")
    assert "model gpt-4.1 is not granted" in str(err.value)
    with pytest.raises(openai.PermissionDeniedError):
        ask(intern, "hi", max_tokens=500)
    stranger = client(gw, llm, issuer.mint("sue@corp", ["marketing"]))
    with pytest.raises(openai.PermissionDeniedError) as err:
        ask(stranger, "hi")
    assert "no grant for upstream llm" in str(err.value)


def test_limits_answer_429_in_the_api_shape(setup, issuer):
    gw, llm, _ = setup
    c = client(gw, llm, issuer.mint("irene@corp", ["interns"]))
    for _ in range(3):
        ask(c, "hi")
    with pytest.raises(openai.RateLimitError) as err:
        ask(c, "hi")
    assert "requests per minute" in str(err.value)


async def mcp(gw: Gateway, mcp_url: str, token: str, body):
    http_client = httpx2.AsyncClient(headers={"authorization": f"Bearer {token}"})
    async with Client(streamable_http_client(mcp_url + "/mcp", http_client=http_client)) as c:
        return await body(c)


def test_mcp_listing_and_calls_follow_the_grant(setup, issuer, mcp_server):
    gw, _, _ = setup
    # regular mode: the MCP client talks to the server through the gateway as a plain proxy
    proxy = gw.proxy_url("u", issuer.mint("ivan@corp", ["interns"]))

    async def body(c):
        tools = await c.list_tools()
        allowed = await c.call_tool("echo", {"text": "hi"})
        refused = await c.call_tool("lookup_customer", {"customer_id": "1"})
        return tools, allowed, refused

    async def run():
        http_client = httpx2.AsyncClient(proxy=proxy)
        async with Client(streamable_http_client(mcp_server + "/mcp",
                                                 http_client=http_client)) as c:
            return await body(c)

    tools, allowed, refused = asyncio.run(run())
    assert [t.name for t in tools.tools] == ["echo"]
    assert allowed.content[0].text == "hi"
    assert refused.is_error and "tool lookup_customer is not granted" in refused.content[0].text


def test_risky_tool_call_is_held_for_an_approver(setup, issuer, mcp_server):
    gw, _, _ = setup
    proxy = gw.proxy_url("u", issuer.mint("alice@corp", ["engineering"]))

    async def run():
        http_client = httpx2.AsyncClient(proxy=proxy)
        async with Client(streamable_http_client(mcp_server + "/mcp",
                                                 http_client=http_client)) as c:
            return await c.call_tool("delete_records", {"table": "t", "where": "1=1"})

    result = asyncio.run(run())
    assert result.is_error and "needs an approver" in result.content[0].text
    assert gw.audit_where(lambda r: r.get("action") == "hold")


def test_policy_reload_takes_effect_and_a_broken_file_keeps_the_old_policy(setup, issuer):
    gw, llm, grants = setup
    c = client(gw, llm, issuer.mint("alice@corp", ["engineering"]))

    def refused_within(seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                ask(c, "tell me about kestrel")
            except openai.PermissionDeniedError:
                return True
            time.sleep(0.2)
        return False

    assert ask(c, "tell me about kestrel") == "Hello from the fake upstream."
    grants.write_text(GRANTS.replace("rules:\n", "rules:\n  - {id: deny.kestrel, literal: "
                                                  "kestrel, score: 90}\n"))
    assert refused_within(10)
    grants.write_text(GRANTS.replace("rules:\n", "rules:\n  - {id: broken, regex: '('}\n"))
    deadline = time.monotonic() + 10
    while "policy change refused" not in gw.log_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "grants.yaml:16 rules.0.regex: invalid regex" in gw.log_text()
    with pytest.raises(openai.PermissionDeniedError):
        ask(c, "tell me about kestrel")  # the previous (valid) version still serves


def test_a_grant_taken_away_mid_run_refuses_the_next_request(setup, issuer):
    """The grants a caller's requests were decided on are remembered per policy version: once
    the file takes a model away, the next request for it is refused (nothing reaches the
    upstream, the audit record names the grant), and the models still granted still pass."""
    gw, llm, grants = setup
    c = client(gw, llm, issuer.mint("alice@corp", ["engineering"]))
    grants.write_text(GRANTS)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the file as the other tests left it, reloaded
        try:
            if ask(c, "tell me about kestrel", model="gpt-4.1") == "Hello from the fake upstream.":
                break
        except openai.PermissionDeniedError:
            time.sleep(0.2)
    for _ in range(3):  # decided, then remembered
        assert ask(c, "hello", model="gpt-4.1") == "Hello from the fake upstream."
    try:
        grants.write_text(GRANTS.replace('llm: {models: ["gpt-*"], max_tokens: 1000}',
                                         'llm: {models: ["gpt-4o-mini"], max_tokens: 1000}'))
        deadline, refused = time.monotonic() + 10, None
        while refused is None and time.monotonic() < deadline:
            before = len(llm.requests)
            try:
                ask(c, "hello", model="gpt-4.1")
                time.sleep(0.2)
            except openai.PermissionDeniedError as e:
                refused = e
                assert len(llm.requests) == before
        assert refused is not None, "the reloaded grants never applied"
        record = gw.audit_record(refused.response.headers["x-douane-decision-id"])
        assert record["action"] == "block" and \
            [r["rule"] for r in record["reasons"]] == ["grant.model"]
        with pytest.raises(openai.PermissionDeniedError):  # and every request after it
            ask(c, "hello", model="gpt-4.1")
        assert ask(c, "hello", model="gpt-4o-mini") == "Hello from the fake upstream."
    finally:
        grants.write_text(GRANTS)
