"""Identity and credential brokering through a real mitmdump, driven by the official SDKs."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import ssl
import time

import anthropic
import httpx
import openai
import pytest

from tests.conftest import UPSTREAM_KEY
from tests.support.gateway import Gateway, base_config
from tests.support.issuer import TestIssuer
from tests.support.upstream import DEFAULT_REPLY, FakeUpstream

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def reverse_gw(issuer: TestIssuer, llm: FakeUpstream, tmp_path_factory) -> Gateway:
    config = base_config(issuer.url, llm.url)
    config["identity"]["jwks_refresh_seconds"] = 1
    with Gateway(config, mode=f"reverse:{llm.url}", env={"DOUANE_TEST_UPSTREAM_KEY": UPSTREAM_KEY},
                 workdir=tmp_path_factory.mktemp("reverse")) as gw:
        yield gw


@pytest.fixture(scope="module")
def tls_llm() -> FakeUpstream:
    upstream = FakeUpstream(tls=True)
    yield upstream
    upstream.close()


@pytest.fixture(scope="module")
def regular_gw(issuer: TestIssuer, llm: FakeUpstream, tls_llm: FakeUpstream,
               tmp_path_factory) -> Gateway:
    """The proxy-mode tests' gateway: `llm` in plain HTTP, `tls_llm` through a CONNECT tunnel
    (ssl_insecure: the fake's certificate is self-signed)."""
    config = base_config(issuer.url, llm.url)
    config["upstreams"]["tls"] = {"url": tls_llm.url, "protocol": "openai",
                                  "credential": {"env": "DOUANE_TEST_UPSTREAM_KEY"}}
    with Gateway(config, mode="regular", args=["--set", "ssl_insecure=true"],
                 env={"DOUANE_TEST_UPSTREAM_KEY": UPSTREAM_KEY},
                 workdir=tmp_path_factory.mktemp("regular")) as gw:
        yield gw


def chat(gw: Gateway, token: str, base_url: str | None = None, **client_args) -> str:
    client = openai.OpenAI(base_url=base_url or gw.url + "/v1", api_key=token, max_retries=0,
                           **client_args)
    reply = client.chat.completions.create(model="gpt-4o-mini",
                                           messages=[{"role": "user", "content": "hi"}])
    return reply.choices[0].message.content


def _b64(doc: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()


def test_valid_token_passes_and_upstream_sees_only_the_injected_key(reverse_gw, issuer, llm):
    llm.requests.clear()
    token = issuer.mint("alice@corp.example", ["engineering"])
    assert chat(reverse_gw, token) == DEFAULT_REPLY
    (received,) = llm.requests
    assert received.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert token.encode() not in llm.received_bytes()
    (record,) = reverse_gw.audit_where(lambda r: r.get("user") == "alice@corp.example")
    assert record["groups"] == ["engineering"]
    assert record["action"] == "allow" and record["status"] == 200


def test_decision_id_header_names_the_audit_record(reverse_gw, issuer):
    token = issuer.mint("bob@corp.example")
    resp = httpx.post(reverse_gw.url + "/v1/chat/completions",
                      headers={"authorization": f"Bearer {token}"},
                      json={"model": "m", "messages": [{"role": "user", "content": "x"}]})
    decision_id = resp.headers["x-douane-decision-id"]
    reverse_gw.audit_record(decision_id)
    records = [r for r in reverse_gw.audit_records() if r.get("decision_id") == decision_id]
    assert len(records) == 1 and records[0]["user"] == "bob@corp.example"


def hs256(claims: dict, secret: str, kid: str) -> str:
    """The classic algorithm-confusion forgery: HMAC keyed with the issuer's public key."""
    signing_input = f"{_b64({'alg': 'HS256', 'typ': 'JWT', 'kid': kid})}.{_b64(claims)}"
    mac = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def bad_tokens(issuer: TestIssuer) -> dict[str, str]:
    good = issuer.mint("mallory@corp.example")
    header, payload, signature = good.split(".")
    claims = issuer.claims("mallory@corp.example")
    forged = dict(claims, email="admin@corp.example")
    return {
        "expired": issuer.mint("mallory@corp.example", iat=int(time.time()) - 7200,
                               nbf=int(time.time()) - 7200, exp=int(time.time()) - 3600),
        "not_yet_valid": issuer.mint("mallory@corp.example", nbf=int(time.time()) + 3600),
        "wrong_audience": issuer.mint("mallory@corp.example", aud="someone-else"),
        "wrong_issuer": issuer.mint("mallory@corp.example", iss="https://evil.example"),
        "no_expiry": issuer.mint("mallory@corp.example", exp=None),
        "alg_none": f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(claims)}.",
        "alg_none_signed": f"{_b64({'alg': 'none', 'kid': issuer.key.kid})}.{_b64(claims)}.xyz",
        "hs256_with_public_key": hs256(claims, issuer.key.public_pem, issuer.key.kid),
        "tampered_payload": f"{header}.{_b64(forged)}.{signature}",
        "tampered_signature": f"{header}.{payload}.{signature[:-4]}AAAA",
        "unknown_kid": issuer.mint("mallory@corp.example", key=type(issuer.key)()),
        "jku_header": issuer.mint("mallory@corp.example", headers={"jku": "https://evil/jwks"}),
        "truncated": good[: len(good) // 2],
        "provider_key": "sk-proj-" + "a" * 40,
        "jwe": "eyJhbGciOiJSU0EtT0FFUCJ9.a.b.c.d",
    }


BAD = ["expired", "not_yet_valid", "wrong_audience", "wrong_issuer", "no_expiry", "alg_none",
       "alg_none_signed", "hs256_with_public_key", "tampered_payload", "tampered_signature",
       "unknown_kid", "jku_header", "truncated", "provider_key", "jwe"]


@pytest.mark.parametrize("case", BAD)
def test_bad_token_is_refused_audited_and_never_reaches_upstream(case, reverse_gw, issuer, llm):
    llm.requests.clear()
    token = bad_tokens(issuer)[case]
    with pytest.raises(openai.AuthenticationError) as err:
        chat(reverse_gw, token)
    assert llm.requests == []
    assert err.value.status_code == 401
    decision_id = err.value.response.headers["x-douane-decision-id"]
    assert decision_id in str(err.value)
    assert "invalid_token" in err.value.response.headers["www-authenticate"]
    record = reverse_gw.audit_record(decision_id)
    assert record["action"] == "refuse" and record["reasons"][0]["rule"].startswith("identity.")
    assert token not in reverse_gw.audit_file().read_text()


def test_missing_token_is_refused(reverse_gw, llm):
    llm.requests.clear()
    resp = httpx.post(reverse_gw.url + "/v1/chat/completions", json={"model": "m"})
    assert resp.status_code == 401
    assert resp.json()["error"]["code"] == "identity_missing"
    assert llm.requests == []


def test_jwks_rotation_needs_no_restart(reverse_gw, issuer):
    assert chat(reverse_gw, issuer.mint("carol@corp.example")) == DEFAULT_REPLY
    issuer.rotate()
    time.sleep(1.1)  # the test config refreshes at most every second on an unknown kid
    assert chat(reverse_gw, issuer.mint("carol@corp.example")) == DEFAULT_REPLY


def test_anthropic_sdk_sends_the_token_as_x_api_key(issuer, make_gateway):
    llm = FakeUpstream()
    try:
        config = base_config(issuer.url, llm.url, protocol="anthropic")
        gw = make_gateway(config, mode=f"reverse:{llm.url}")
        token = issuer.mint("dave@corp.example", ["support"])
        client = anthropic.Anthropic(base_url=gw.url, api_key=token, max_retries=0)
        reply = client.messages.create(model="claude-test-model", max_tokens=50,
                                       messages=[{"role": "user", "content": "hi"}])
        assert reply.content[0].text == DEFAULT_REPLY
        (received,) = llm.requests
        assert received.headers["x-api-key"] == UPSTREAM_KEY
        assert token.encode() not in llm.received_bytes()
        with pytest.raises(anthropic.AuthenticationError) as err:
            anthropic.Anthropic(base_url=gw.url, api_key="sk-ant-not-a-token-" + "x" * 30,
                                max_retries=0).messages.create(
                model="claude-test-model", max_tokens=5,
                messages=[{"role": "user", "content": "hi"}])
        assert "douane decision dcn_" in str(err.value)
        assert len(llm.requests) == 1
    finally:
        llm.close()


def test_regular_proxy_mode_plain_http(issuer, regular_gw, llm):
    llm.requests.clear()
    gw = regular_gw
    token = issuer.mint("erin@corp.example")
    proxied = openai.DefaultHttpxClient(proxy=gw.proxy_url("erin", token))
    assert chat(gw, token="unused-by-proxy-mode", http_client=proxied,
                base_url=llm.url + "/v1") == DEFAULT_REPLY
    assert llm.requests[0].headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert "proxy-authorization" not in llm.requests[0].headers
    bare = openai.DefaultHttpxClient(proxy=gw.proxy_url())
    with pytest.raises(openai.APIStatusError) as err:
        chat(gw, token="unused", http_client=bare, base_url=llm.url + "/v1")
    assert err.value.status_code == 407
    assert len(llm.requests) == 1


def test_regular_proxy_mode_connect_tunnel_with_tls(issuer, regular_gw, tls_llm):
    gw, llm = regular_gw, tls_llm
    llm.requests.clear()
    token = issuer.mint("frank@corp.example", ["engineering"])
    tunnel = openai.DefaultHttpxClient(proxy=gw.proxy_url("frank", token),
                                       verify=ssl.create_default_context(cafile=gw.ca_file))
    assert chat(gw, token="unused", http_client=tunnel,
                base_url=llm.url + "/v1") == DEFAULT_REPLY
    assert llm.requests[0].headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    gw.audit_where(lambda r: r.get("user") == "frank@corp.example" and r.get("status") == 200)
    # a CONNECT with a bad token is refused before any TLS is set up
    refusals = len([r for r in gw.audit_records() if r.get("status") == 407])
    bad = openai.DefaultHttpxClient(proxy=gw.proxy_url("frank", token[:-5] + "AAAAA"),
                                    verify=ssl.create_default_context(cafile=gw.ca_file))
    with pytest.raises(openai.APIConnectionError):
        chat(gw, token="unused", http_client=bad, base_url=llm.url + "/v1")
    assert len(llm.requests) == 1
    gw.audit_where(lambda r: r.get("status") == 407, count=refusals + 1)


def test_undeclared_host_is_refused(issuer, regular_gw):
    token = issuer.mint("gina@corp.example")
    other = FakeUpstream()
    try:
        with httpx.Client(proxy=regular_gw.proxy_url("gina", token)) as client:
            resp = client.post(other.url + "/v1/chat/completions", json={})
        assert resp.status_code == 403
        assert resp.json()["error"]["code"] == "undeclared_upstream"
        assert other.requests == []
    finally:
        other.close()


def test_trusted_identity_headers_only_from_trusted_sources(issuer, make_gateway, upstream):
    trusted = base_config(issuer.url, upstream.url)
    trusted["identity"]["trusted_headers"] = {"sources": ["127.0.0.1/32"]}
    gw = make_gateway(trusted, mode=f"reverse:{upstream.url}")
    headers = {"x-forwarded-email": "hank@corp.example", "x-auth-request-groups": "ops,oncall"}
    resp = httpx.post(gw.url + "/v1/chat/completions", headers=headers, json=CHAT)
    assert resp.status_code == 200
    assert "x-forwarded-email" not in upstream.requests[0].headers
    assert gw.audit_records(wait_for=1)[-1]["groups"] == ["ops", "oncall"]

    untrusted = base_config(issuer.url, upstream.url)
    untrusted["identity"]["trusted_headers"] = {"sources": ["10.0.0.0/8"]}
    gw2 = make_gateway(untrusted, mode=f"reverse:{upstream.url}")
    resp = httpx.post(gw2.url + "/v1/chat/completions", headers=headers, json=CHAT)
    assert resp.status_code == 401
    assert len(upstream.requests) == 1
