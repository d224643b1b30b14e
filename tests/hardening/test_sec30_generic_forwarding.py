"""A client's headers and query on a generic (operator-described) upstream: default-deny, as on
the model routes (`douane.forwarding.generic_screen`). Framing and what the upstream's
`forward:` lists go on; every other header is dropped (credentials, hop-by-hop, tracing, a
cookie); an unlisted or repeated query parameter, a folded header, a secret in a forwarded value
are refused before the upstream, audited naming what was refused. Through a real gateway."""

from __future__ import annotations

import json
import urllib.parse

import httpx
import pytest
import yaml

from douane import config
from tests.conftest import UPSTREAM_KEY
from tests.hardening.conftest import POLICY, assert_refused, reverse_gateway
from tests.hardening.test_review_forwarding import raw

PATH = "/internal/generate"
INTERNAL = {"url": None, "protocol": "generic", "request_text_paths": ["prompt"],
            "response_text_paths": ["output.text"],
            "credential": {"env": "DOUANE_TEST_UPSTREAM_KEY", "header": "x-internal-key",
                           "format": "{secret}"},
            "forward": {"headers": ["x-tenant", "X-Request-Id"], "query": ["version"]}}
KEY = "sk-proj-" + "Qm4Zt7Rw2Kx9" * 3
AWS = "AKIAQX7RZ2LMN4TB5KWD"
# what the upstream may see: framing, the listed headers, the credential douane injects
ALLOWED = {"host", "content-length", "content-type", "accept", "accept-encoding", "x-tenant",
           "x-request-id", "x-internal-key"}


@pytest.fixture(scope="module")
def gw(issuer, llm, tmp_path_factory):
    policy = yaml.safe_load(POLICY)
    policy["default"]["upstreams"]["internal"] = {"models": ["*"]}
    llm.canned[PATH] = ("application/json", b'{"output": {"text": "done"}}')
    with reverse_gateway(issuer, llm, tmp_path_factory.mktemp("sec30_generic"), policy,
                         upstreams={"internal": {**INTERNAL, "url": llm.url + "/internal"}}
                         ) as gateway:
        yield gateway


def post(gw, token: str, query: str = "", **headers: str) -> httpx.Response:
    return httpx.post(gw.url + PATH + query, json={"prompt": "hello"}, timeout=30,
                      headers={"authorization": f"Bearer {token}", **headers})


def test_only_framing_and_the_listed_headers_reach_a_generic_upstream(gw, llm, token, secrets):
    secrets.add("oatmeal-7c1f")
    before = len(llm.requests)
    resp = post(gw, token, "?version=2", **{
        "x-tenant": "acme", "x-request-id": "r-1", "cookie": "sid=oatmeal-7c1f",
        "x-api-key": "client-own", "traceparent": "00-0af7651916cd43dd-01", "te": "trailers",
        "keep-alive": "timeout=5", "x-forwarded-for": "10.0.0.1", "x-custom-switch": "on",
        "x-douane-user": "admin@corp.example", "connection": "keep-alive, x-tenant"})
    assert resp.status_code == 200, resp.text[:300]
    assert len(llm.requests) == before + 1
    seen = llm.requests[-1]
    assert set(seen.headers) <= ALLOWED, set(seen.headers) - ALLOWED
    assert seen.headers["x-tenant"] == "acme" and seen.headers["x-request-id"] == "r-1"
    assert seen.headers["x-internal-key"] == UPSTREAM_KEY  # douane's, not the client's
    assert seen.path == PATH + "?version=2"


def test_with_nothing_listed_only_framing_goes_on(tmp_path):
    """No `forward:`: a generic upstream gets no client header beyond framing, no query."""
    loaded = load(tmp_path, {k: v for k, v in INTERNAL.items() if k != "forward"})
    upstream = next(u for u in loaded.upstreams if u.name == "internal")
    assert upstream.forward_headers == frozenset() and upstream.forward_query == frozenset()


@pytest.mark.parametrize("query, named", [
    ("?debug=1", "'debug'"),
    ("?version=2&version=3", "given twice"),
    ("?version[]=2", "not a list or a map"),
    ("?version=2;admin=1", "';'"),
    ("?%76ersion=2&Admin=1", "'Admin'"),  # decoded as a server decodes it
])
def test_a_query_the_upstream_does_not_list_is_refused(gw, llm, token, query, named):
    before = len(llm.requests)
    record = assert_refused(gw, llm, before, post(gw, token, query), 400)
    reason = record["reasons"][0]
    assert reason["rule"] == "route.query" and named in reason["message"], reason


@pytest.mark.parametrize("where", ["header", "query"])
@pytest.mark.parametrize("secret", [KEY, AWS], ids=["openai", "aws"])
def test_a_secret_in_a_forwarded_value_is_refused(gw, llm, token, secrets, where, secret):
    secrets.add(secret)
    before = len(llm.requests)
    resp = post(gw, token, "?version=" + urllib.parse.quote(f"v2 {secret}")) if where == "query" \
        else post(gw, token, **{"x-tenant": f"acme {secret}"})
    record = assert_refused(gw, llm, before, resp, 403)
    reason = record["reasons"][0]
    assert reason["rule"] == f"route.{where}" and "detector.secret." in reason["message"], reason
    assert secret not in json.dumps(record) and secret not in resp.text


def test_a_folded_forwarded_header_is_refused(gw, llm, token):
    before = len(llm.requests)
    body = json.dumps({"prompt": "hello"}).encode()
    resp = raw(gw, b"POST " + PATH.encode() + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
               b"Authorization: Bearer " + token.encode() + b"\r\nContent-Type: application/json"
               b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n"
               b"X-Tenant: acme\r\n X-Admin: yes\r\n", body)
    record = assert_refused(gw, llm, before, resp, 403)
    reason = record["reasons"][0]
    assert reason["rule"] == "route.header" and "x-tenant" in reason["message"] and \
        "folded" in reason["message"], reason


def load(tmp_path, internal: dict, identity: dict | None = None) -> config.Config:
    doc = {"version": 1, "identity": identity or {"dev_issuer": {"enabled": True}},
           "upstreams": {"internal": {**internal, "url": "http://llm.internal:8000"}}}
    path = tmp_path / "douane.yaml"
    path.write_text(yaml.safe_dump(doc))
    return config.load(path, gateway=False)


@pytest.mark.parametrize("forward, says", [
    ({"headers": ["authorization"]}, "carries a credential"),
    ({"headers": ["Cookie"]}, "carries a credential"),
    ({"headers": ["X-Internal-Key"]}, "carries a credential"),  # the upstream's own
    ({"headers": ["x-douane-user"]}, "carries a credential"),
    ({"headers": ["X-Auth-Token"]}, "carries a credential"),
    ({"headers": ["x-goog-api-key"]}, "carries a credential"),
    ({"headers": ["ocp-apim-subscription-key"]}, "carries a credential"),
    ({"headers": ["x-client-secret"]}, "carries a credential"),
    ({"headers": ["connection"]}, "hop-by-hop"),
    ({"headers": ["TE"]}, "hop-by-hop"),
    ({"headers": ["proxy-anything"]}, "hop-by-hop"),
    ({"headers": ["x tenant"]}, "not a header name"),
    ({"query": ["a=b"]}, "not a query parameter name"),
    ({"headers": [f"x-{i}" for i in range(65)]}, "at most 64"),
    ({"cookies": ["sid"]}, "unknown key"),
])
def test_a_forward_list_naming_what_never_goes_on_is_a_config_error(tmp_path, forward, says):
    with pytest.raises(config.ConfigError, match=says) as e:
        load(tmp_path, {**INTERNAL, "forward": forward})
    assert "upstreams.internal.forward" in str(e.value)


def test_ordinary_names_may_be_listed(tmp_path):
    names = ["x-tenant", "idempotency-key", "x-request-id", "traceparent", "x-keyboard-layout"]
    loaded = load(tmp_path, {**INTERNAL, "forward": {"headers": names, "query": ["v", "a.b"]}})
    upstream = next(u for u in loaded.upstreams if u.name == "internal")
    assert upstream.forward_headers == {n.encode() for n in names}
    assert upstream.forward_query == {"v", "a.b"}


def test_a_trusted_identity_header_is_never_forwarded(tmp_path):
    identity = {"dev_issuer": {"enabled": True},
                "trusted_headers": {"sources": ["10.0.0.0/8"], "user": "X-Remote-User"}}
    with pytest.raises(config.ConfigError, match="names the caller"):
        load(tmp_path, {**INTERNAL, "forward": {"headers": ["x-remote-user"]}}, identity)


def test_forward_is_for_generic_upstreams_only(tmp_path):
    with pytest.raises(config.ConfigError, match="generic upstreams"):
        load(tmp_path, {"protocol": "openai", "forward": {"headers": ["x-tenant"]}})
