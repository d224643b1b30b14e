"""douane as the OAuth resource server of an MCP upstream, through a real gateway: protected-resource
metadata (RFC 9728), the 401 that points at it, audience binding (RFC 8707), scope step-up,
Origin checks, and the official `mcp` SDK's own OAuth client logging in against a real
OpenID Provider (npm oidc-provider) that it discovers through douane: no token pasted."""

from __future__ import annotations

import asyncio

import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.auth import AuthorizationCodeResult, OAuthClientProvider
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import OAuthClientInformationFull, OAuthClientMetadata, OAuthToken

from tests.support.gateway import Gateway, free_port
from tests.support.oidc_provider import OidcProvider

REDIRECT = "http://127.0.0.1:9/callback"  # never called: the test reads the code from the redirect
SCOPE = "mcp:tools"


@pytest.fixture(scope="module")
def setup(issuer, mcp_server, tmp_path_factory):
    provider = OidcProvider({"alice": ["engineering"]})
    port = free_port()
    resource = f"http://127.0.0.1:{port}/mcp"
    config = {
        "version": 1,
        "identity": {"issuers": [
            {"issuer": provider.issuer, "audience": [resource], "user_claim": "email"},
            {"issuer": issuer.url, "audience": ["douane-tests", resource, "https://other/mcp"]}]},
        "upstreams": {"crm": {"url": mcp_server + "/mcp", "protocol": "mcp", "resource": {
            "uri": resource, "scopes": [SCOPE]}, "origins": ["https://app.example.com"]}},
    }
    with Gateway(config, mode=f"reverse:{mcp_server}", args=["--listen-port", str(port)],
                 workdir=tmp_path_factory.mktemp("oauth")) as gw:
        yield gw, provider, resource
    provider.close()


def rpc(gw: Gateway, headers: dict[str, str] | None = None) -> httpx.Response:
    initialize = {"jsonrpc": "2.0", "id": 7, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "test", "version": "1"}}}
    return httpx.post(gw.url + "/mcp", json=initialize,
                      headers={"accept": "application/json, text/event-stream",
                               **(headers or {})}, timeout=30)


def test_metadata_and_the_challenge_that_points_at_it(setup):
    gw, provider, resource = setup
    meta = httpx.get(gw.url + "/.well-known/oauth-protected-resource/mcp")
    assert meta.status_code == 200
    assert meta.json() == {"resource": resource, "authorization_servers": [
        provider.issuer, meta.json()["authorization_servers"][1]],
        "bearer_methods_supported": ["header"], "resource_name": "crm",
        "scopes_supported": [SCOPE]}
    refused = rpc(gw)
    assert refused.status_code == 401
    challenge = refused.headers["www-authenticate"]
    assert f'resource_metadata="{gw.url}/.well-known/oauth-protected-resource/mcp"' in challenge
    assert f'scope="{SCOPE}"' in challenge
    assert httpx.post(gw.url + "/.well-known/oauth-protected-resource/mcp").status_code == 405


def test_tokens_for_another_resource_or_without_the_scope_are_refused(setup, issuer, mcp_server):
    gw, _, resource = setup
    elsewhere = issuer.mint("alice@corp.example", ["engineering"], aud="https://other/mcp",
                            scope=SCOPE)
    refused = rpc(gw, {"authorization": f"Bearer {elsewhere}"})
    assert refused.status_code == 401 and "not issued for this resource" in refused.text
    assert 'error="invalid_token"' in refused.headers["www-authenticate"]
    narrow = issuer.mint("alice@corp.example", ["engineering"], aud=resource, scope="openid")
    step_up = rpc(gw, {"authorization": f"Bearer {narrow}"})
    assert step_up.status_code == 403
    header = step_up.headers["www-authenticate"]
    assert 'error="insufficient_scope"' in header and f'scope="{SCOPE}"' in header
    good = issuer.mint("alice@corp.example", ["engineering"], aud=resource, scope=SCOPE)
    assert rpc(gw, {"authorization": f"Bearer {good}"}).status_code == 200
    # a browser page on another site cannot drive the endpoint (DNS rebinding)
    evil = rpc(gw, {"authorization": f"Bearer {good}", "origin": "https://evil.example"})
    assert evil.status_code == 403 and "Origin" in evil.text
    listed = rpc(gw, {"authorization": f"Bearer {good}", "origin": "https://app.example.com"})
    assert listed.status_code == 200
    records = gw.audit_where(lambda r: r.get("reasons") and r["reasons"][0]["rule"] in (
        "identity.wrong_resource", "identity.insufficient_scope", "resource.origin"), count=3)
    assert {r["status"] for r in records} == {401, 403}


class MemoryStorage:
    def __init__(self) -> None:
        self.tokens: OAuthToken | None = None
        self.client: OAuthClientInformationFull | None = None

    async def get_tokens(self) -> OAuthToken | None:
        return self.tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self.tokens = tokens

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self.client

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self.client = client_info


def test_the_mcp_sdk_logs_in_by_discovery_through_douane(setup):
    gw, provider, resource = setup
    redirected: list[str] = []

    async def redirect_handler(url: str) -> None:
        redirected.append(url)

    async def callback_handler() -> AuthorizationCodeResult:
        answer = await asyncio.to_thread(provider.log_in, redirected[-1], REDIRECT, "alice")
        return AuthorizationCodeResult(code=answer["code"], state=answer.get("state"),
                                       iss=answer.get("iss"))

    storage = MemoryStorage()
    auth = OAuthClientProvider(
        server_url=resource,
        client_metadata=OAuthClientMetadata(redirect_uris=[REDIRECT], client_name="douane test",
                                            grant_types=["authorization_code", "refresh_token"]),
        storage=storage, redirect_handler=redirect_handler, callback_handler=callback_handler)

    async def run():
        async with httpx2.AsyncClient(auth=auth, timeout=60) as http_client, \
                Client(streamable_http_client(resource, http_client=http_client)) as client:
            tools = await client.list_tools()
            echoed = await client.call_tool("echo", {"text": "hello"})
            return tools, echoed

    tools, echoed = asyncio.run(run())
    assert "echo" in [t.name for t in tools.tools]
    assert echoed.content[0].text.endswith("hello")
    assert redirected and redirected[0].startswith(provider.issuer + "/auth?")
    assert f"resource={resource.replace(':', '%3A').replace('/', '%2F')}" in redirected[0]
    # the calls ran as the user the provider signed in, with the provider's token
    records = gw.audit_where(lambda r: r.get("issuer") == provider.issuer
                             and r.get("action") == "allow", count=2)
    assert {r["user"] for r in records} == {"alice@corp.example"}
