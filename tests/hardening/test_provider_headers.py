"""A client's headers and query string on a model's upstream (`douane.forwarding`): the SDKs'
own headers go on, what changes the account the org's key bills or turns on a feature nobody
granted is refused before the upstream (audited, naming the header or parameter), anything
else is dropped. Through a real gateway in reverse mode, with the official SDKs."""

from __future__ import annotations

import contextlib
import json

import anthropic
import httpx
import openai
import pytest
import yaml

from tests.conftest import UPSTREAM_KEY
from tests.hardening.conftest import POLICY, assert_refused, reverse_gateway
from tests.support.gateway import Gateway

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
MESSAGE = {"model": "claude-x", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
BETAS = {"upstreams": {"claude": {"models": ["*"], "betas": ["files-api-*"]},
                       "llm": {"models": ["*"], "operations": ["GET /v1/models", "GET /v1/files"],
                               "betas": ["responses=experimental"]}}}


@pytest.fixture(scope="module")
def gw(issuer, llm, tmp_path_factory):
    policy = yaml.safe_load(POLICY)
    policy["groups"]["betas"] = BETAS
    with reverse_gateway(issuer, llm, tmp_path_factory.mktemp("provider_headers"),
                         policy) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def granted(issuer, secrets):
    token = issuer.mint("bob@corp.example", ["betas"])
    secrets.add(token)
    return token


def _openai(gw: Gateway, token: str, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=token, max_retries=0, **kwargs)


def _anthropic(gw: Gateway, token: str, **kwargs) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url + "/anthropic", api_key=token, max_retries=0,
                               **kwargs)


EXTRA = {"x-trace-note": "project plan", "traceparent": "00-0af7651916cd43dd8448eb211c80319c-"
         "b7ad6b7169203331-01", "cookie": "sid=abc", "api-key": "sk-client-own-key"}


@pytest.mark.parametrize("stream", [False, True])
def test_the_sdks_pass_with_their_own_headers_and_nothing_else(gw, llm, token, stream):
    before = len(llm.requests)
    client = _openai(gw, token, default_headers=EXTRA)
    if stream:
        text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            stream=True, **CHAT) if c.choices)
    else:
        text = client.chat.completions.create(**CHAT).choices[0].message.content
    assert text
    message = _anthropic(gw, token, default_headers=EXTRA).messages.create(stream=stream,
                                                                           **MESSAGE)
    if stream:
        assert [e for e in message]
    else:
        assert message.content
    for seen in llm.requests[before:]:
        headers = seen.headers
        assert headers.get("authorization") == f"Bearer {UPSTREAM_KEY}" or \
            headers.get("x-api-key") == UPSTREAM_KEY
        assert headers["user-agent"] and headers["x-stainless-lang"] == "python"
        assert not set(EXTRA) & set(headers), headers  # dropped, as on an MCP upstream
    assert "anthropic-version" in llm.requests[-1].headers


@pytest.mark.parametrize("name, value, rule", [
    ("OpenAI-Organization", "org-someone-else", "route.header"),
    ("OpenAI-Project", "proj_finance", "route.header"),
    ("OpenAI-Beta", "assistants=v2, responses experimental", "route.header"),  # not a name
    ("OpenAI-Future-Switch", "on", "route.header"),
])
def test_an_openai_header_with_authority_is_refused(gw, llm, token, name, value, rule):
    before = len(llm.requests)
    with pytest.raises(openai.PermissionDeniedError) as err:
        _openai(gw, token, default_headers={name: value}).chat.completions.create(**CHAT)
    resp = err.value.response
    record = assert_refused(gw, llm, before, resp, 403)
    assert resp.json()["error"]["code"] == "header_refused"
    reason = record["reasons"][0]
    assert reason["rule"] == rule and reason["field"] == f"headers.{name.lower()}", reason


@pytest.mark.parametrize("value, rule", [
    ("mcp-client-2025-04-04", "grant.beta"),  # the MCP connector: Anthropic calls remote servers
    ("code-execution-2025-05-22", "grant.beta"),
    ("computer-use-2025-01-24", "grant.beta"),
    ("files-api-2025-04-14,mcp-client-2025-04-04", "grant.beta"),
    ("files-api-2025-04-14 mcp-client-2025-04-04", "route.header"),  # not a list of names
])
def test_a_beta_no_grant_lists_is_refused(gw, llm, granted, value, rule):
    before = len(llm.requests)
    with pytest.raises(anthropic.PermissionDeniedError) as err:
        _anthropic(gw, granted, default_headers={"anthropic-beta": value}).messages.create(
            **MESSAGE)
    record = assert_refused(gw, llm, before, err.value.response, 403)
    reason = record["reasons"][0]
    assert reason["rule"] == rule and reason["field"] == "headers.anthropic-beta", reason
    if rule == "grant.beta":
        assert "mcp-client" in reason["message"] or value in reason["message"], reason


def test_a_beta_is_the_grants_only(gw, llm, token, granted):
    """The group listing `files-api-*` sends it (the SDK's `betas=`, `?beta=true`); the default
    grant, listing none, may not."""
    before = len(llm.requests)
    answer = _anthropic(gw, granted).beta.messages.create(betas=["files-api-2025-04-14"],
                                                          **MESSAGE)
    assert answer.content
    seen = llm.requests[before]
    assert seen.headers["anthropic-beta"] == "files-api-2025-04-14"
    assert seen.path.endswith("?beta=true") or "anthropic-beta" in seen.headers
    before = len(llm.requests)
    with pytest.raises(anthropic.PermissionDeniedError) as err:
        _anthropic(gw, token).beta.messages.create(betas=["files-api-2025-04-14"], **MESSAGE)
    assert assert_refused(gw, llm, before, err.value.response, 403)["reasons"][0]["rule"] == \
        "grant.beta"


def test_an_openai_beta_is_the_grants_only(gw, llm, token, granted):
    """`OpenAI-Beta` values beyond the SDK's API versions (`assistants=v2`) are betas a grant
    lists, as Anthropic's are."""
    beta = {"OpenAI-Beta": "assistants=v2, responses=experimental"}
    before = len(llm.requests)
    assert _openai(gw, granted, default_headers=beta).chat.completions.create(**CHAT).choices
    assert llm.requests[before].headers["openai-beta"] == beta["OpenAI-Beta"]
    before = len(llm.requests)
    with pytest.raises(openai.PermissionDeniedError) as err:
        _openai(gw, token, default_headers=beta).chat.completions.create(**CHAT)
    reason = assert_refused(gw, llm, before, err.value.response, 403)["reasons"][0]
    assert reason["rule"] == "grant.beta" and reason["field"] == "headers.openai-beta", reason
    assert "responses=experimental" in reason["message"]
    before = len(llm.requests)
    assert _openai(gw, token, default_headers={"OpenAI-Beta": "assistants=v2"}
                   ).chat.completions.create(**CHAT).choices  # the SDK's own: no grant needed
    assert llm.requests[before].headers["openai-beta"] == "assistants=v2"


@pytest.mark.parametrize("name, value", [("anthropic-version", "latest"),
                                         ("anthropic-future-switch", "1")])
def test_an_anthropic_header_douane_does_not_know_is_refused(gw, llm, token, name, value):
    before = len(llm.requests)
    resp = httpx.post(gw.url + "/anthropic/v1/messages", json=MESSAGE, headers={
        "x-api-key": token, "anthropic-version": "2023-06-01"} | {name: value})
    record = assert_refused(gw, llm, before, resp, 403)
    assert resp.json()["error"]["type"] == "permission_error"  # Anthropic's shape
    assert record["reasons"][0]["field"] == f"headers.{name}", record


@pytest.mark.parametrize("path", [
    "/v1/chat/completions?store=true",
    "/v1/chat/completions?api-version=2024-10-21&user=x",
    "/v1/models?limit=1",  # granted, and documents no parameter
    "/v1/files?limit=1&limit=2",
    "/v1/files?limit=1;purpose=batch",
    "/v1/files?purpose=batch&include_deleted=true",
    "/anthropic/v1/messages?beta=false",
    "/anthropic/v1/messages?beta=true&debug=1",
])
def test_a_query_parameter_the_operation_does_not_document_is_refused(gw, llm, granted, path):
    before = len(llm.requests)
    headers = {"authorization": f"Bearer {granted}"}
    if "/chat/" in path or "/messages" in path:
        resp = httpx.post(gw.url + path, json=MESSAGE if "/messages" in path else CHAT,
                          headers=headers)
    else:
        resp = httpx.get(gw.url + path, headers=headers)
    record = assert_refused(gw, llm, before, resp, 400)
    assert resp.json()["error"]["type"] in ("invalid_request_error",), resp.text
    reason = record["reasons"][0]
    assert reason["rule"] == "route.query" and reason["field"] == "query", reason


def test_documented_parameters_pass(gw, llm, granted):
    before = len(llm.requests)
    with contextlib.suppress(openai.NotFoundError):  # the fake upstream keeps no files
        # (a cursor, `after=`, names the caller's own file or is refused: test_sec30_owners)
        _openai(gw, granted).files.list(limit=2, purpose="batch", order="asc")
    assert llm.requests[before].path == "/v1/files?limit=2&order=asc&purpose=batch"
    resp = httpx.post(gw.url + "/anthropic/v1/messages?beta=true", json=MESSAGE,
                      headers={"x-api-key": granted})
    assert resp.status_code == 200, resp.text
    assert llm.requests[-1].path == "/anthropic/v1/messages?beta=true"


HEADER_KEY = "sk-proj-" + "Hv3nQ8wLr5Tz" * 3


@pytest.mark.parametrize("name, value", [
    ("User-Agent", f"OpenAI/Python 1.99.1 {HEADER_KEY}"),
    ("X-Stainless-Arch", HEADER_KEY),
    ("Accept", f"application/json; k={HEADER_KEY}"),
    ("X-Stainless-Note", "AKIAQX7RZ2LMN4TB5KWD"),
])
def test_a_secret_in_a_forwarded_header_is_refused(gw, llm, token, secrets, name, value):
    """Red team, stop 29: the headers that go on to the provider were read by no detector, so a
    key the body's detectors refuse reached the provider beside the org's key in a user-agent,
    an x-stainless-* value or a media type's parameter (an idempotency key goes on as a digest:
    test_redteam30_secrets)."""
    secrets.update({HEADER_KEY, "AKIAQX7RZ2LMN4TB5KWD"})
    before = len(llm.requests)
    resp = httpx.post(gw.url + "/v1/chat/completions", json=CHAT,
                      headers={"authorization": f"Bearer {token}", name: value})
    record = assert_refused(gw, llm, before, resp, 403)
    assert resp.json()["error"]["code"] == "header_refused"
    reason = record["reasons"][0]
    assert reason["rule"] == "route.header" and "detector.secret." in reason["message"], reason
    assert reason["field"] == f"headers.{name.lower()}", reason
    assert HEADER_KEY not in json.dumps(record) and "AKIAQX7RZ2LMN4TB5KWD" not in json.dumps(record)
