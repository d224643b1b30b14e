"""Red team, stop 32: a token issued for an MCP resource, used on the other routes. For an MCP
upstream with a `resource:`, the issuer's `audience` lists the resource's URI (README: "accept
tokens issued for the resource"); the token an MCP client obtained for that one server (any client
that registered dynamically, with only the MCP scope) was then a token for every route: the model
APIs with the org's key, other MCP servers. RFC 8707 / MCP authorization: a token is accepted only
by the resource it was issued for. A token whose only accepted audiences are MCP resources' URIs
is refused 401 on any other upstream; the gateway's own audience still opens every route."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import UPSTREAM_KEY
from tests.hardening.conftest import POLICY, assert_refused, with_claude
from tests.hardening.test_evasion import chat
from tests.support.gateway import Gateway, base_config

SCOPE = "mcp:tools"
RESOURCE = "https://douane.corp.example/mcp"


@pytest.fixture(scope="module")
def gw(issuer, llm, tmp_path_factory):
    work = tmp_path_factory.mktemp("redteam32_audience")
    (work / "policy.yaml").write_text(POLICY.replace(
        '    claude: {models: ["*"]}\n',
        '    claude: {models: ["*"]}\n    crm: {}\n    wiki: {}\n', 1))
    config = base_config(issuer.url, llm.url + "/v1", policy={"files": [str(work / "policy.yaml")]})
    config["identity"]["issuers"][0]["audience"] = ["douane-tests", RESOURCE]
    with_claude(config, llm.url)
    config["upstreams"]["crm"] = {"url": llm.url + "/mcp", "protocol": "mcp",
                                  "resource": {"uri": RESOURCE, "scopes": [SCOPE]}}
    config["upstreams"]["wiki"] = {"url": llm.url + "/wiki", "protocol": "mcp"}
    with Gateway(config, mode=f"reverse:{llm.url}", workdir=work / "gw",
                 env={"DOUANE_TEST_UPSTREAM_KEY": UPSTREAM_KEY}) as gateway:
        yield gateway


def _mint(issuer, secrets, aud) -> str:
    token = issuer.mint("mia@corp.example", ["engineering"], aud=aud, scope=SCOPE)
    secrets.add(token)
    return token


LIST = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
MCP_HEADERS = {"accept": "application/json, text/event-stream",
               "mcp-protocol-version": "2025-06-18"}


@pytest.mark.parametrize("route", ["chat", "anthropic", "other_mcp"])
def test_a_token_for_an_mcp_resource_opens_no_other_route(gw, llm, issuer, secrets, route):
    """Before: 200, the upstream called with the org's key (or the other MCP server called)."""
    token = _mint(issuer, secrets, RESOURCE)
    auth = {"authorization": f"Bearer {token}"}
    before = len(llm.requests)
    if route == "chat":
        resp = httpx.post(gw.url + "/v1/chat/completions", json=chat("hi"), headers=auth)
    elif route == "anthropic":
        resp = httpx.post(gw.url + "/anthropic/v1/messages", headers={"x-api-key": token},
                          json={"model": "claude-x", "max_tokens": 10,
                                "messages": [{"role": "user", "content": "hi"}]})
    else:
        resp = httpx.post(gw.url + "/wiki", json=LIST, headers={**auth, **MCP_HEADERS})
    record = assert_refused(gw, llm, before, resp, 401)
    assert record["reasons"][0]["rule"] == "identity.wrong_resource", record


def test_the_token_still_opens_its_resource_and_the_gateways_token_every_route(
        gw, llm, issuer, secrets):
    resource_token = _mint(issuer, secrets, RESOURCE)
    before = len(llm.requests)
    resp = httpx.post(gw.url + "/mcp", json=LIST,
                      headers={"authorization": f"Bearer {resource_token}", **MCP_HEADERS})
    assert resp.status_code != 401 and len(llm.requests) == before + 1, resp.text
    for aud in ("douane-tests", ["douane-tests", RESOURCE]):
        token = _mint(issuer, secrets, aud)
        resp = httpx.post(gw.url + "/v1/chat/completions", json=chat("hi"),
                          headers={"authorization": f"Bearer {token}"})
        assert resp.status_code == 200, resp.text
