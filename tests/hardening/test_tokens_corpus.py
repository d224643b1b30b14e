"""Hardening: a corpus of forged, broken and misused tokens against a real gateway.

Every one must be refused with 401, never reach the upstream, and leave exactly one audit record.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import httpx
import pytest

from tests.conftest import UPSTREAM_KEY
from tests.support.gateway import Gateway, base_config
from tests.support.issuer import SigningKey, TestIssuer
from tests.support.upstream import FakeUpstream


def b64(data: bytes | dict) -> str:
    raw = json.dumps(data).encode() if isinstance(data, dict) else data
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def hs(alg: str, claims: dict, secret: bytes, kid: str) -> str:
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    signing_input = f"{b64({'alg': alg, 'kid': kid, 'typ': 'JWT'})}.{b64(claims)}"
    return f"{signing_input}.{b64(hmac.new(secret, signing_input.encode(), digest).digest())}"


def resign(issuer: TestIssuer, header: dict, claims: dict, key: SigningKey | None = None) -> str:
    """Sign arbitrary header/claims with RS256 (a valid signature over a hostile header)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    key = key or issuer.key
    signing_input = f"{b64(header)}.{b64(claims)}"
    signature = key.private.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{b64(signature)}"


def corpus(issuer: TestIssuer) -> dict[str, str]:
    now = int(time.time())
    claims = issuer.claims("mallory@corp.example")
    kid = issuer.key.kid
    good = issuer.mint("mallory@corp.example")
    h, p, s = good.split(".")
    attacker = SigningKey()
    pub = issuer.key.public_pem.encode()
    header = {"alg": "RS256", "kid": kid, "typ": "JWT"}
    return {
        "alg_none": f"{b64({'alg': 'none'})}.{b64(claims)}.",
        "alg_None": f"{b64({'alg': 'None'})}.{b64(claims)}.",
        "alg_NONE": f"{b64({'alg': 'NONE'})}.{b64(claims)}.",
        "alg_nOnE_with_signature": f"{b64({'alg': 'nOnE', 'kid': kid})}.{b64(claims)}.{s}",
        "alg_missing": f"{b64({'kid': kid})}.{b64(claims)}.{s}",
        "hs256_public_pem": hs("HS256", claims, pub, kid),
        "hs384_public_pem": hs("HS384", claims, pub, kid),
        "hs512_public_pem": hs("HS512", claims, pub, kid),
        "hs256_public_jwk": hs("HS256", claims, json.dumps(issuer.key.jwk()).encode(), kid),
        "rs512_not_allowed": resign(issuer, {**header, "alg": "RS512"}, claims),
        "es256_header_rsa_signature": f"{b64({**header, 'alg': 'ES256'})}.{p}.{s}",
        "unknown_kid": issuer.mint("mallory@corp.example", key=attacker),
        "jku_attacker": resign(issuer, {**header, "jku": "http://127.0.0.1:1/jwks"}, claims,
                               attacker),
        "x5u_attacker": resign(issuer, {**header, "x5u": "http://127.0.0.1:1/cert"}, claims,
                               attacker),
        "embedded_jwk": resign(issuer, {**header, "jwk": attacker.jwk()}, claims, attacker),
        "x5c_header": resign(issuer, {**header, "x5c": ["MIIB"]}, claims),
        "crit_header": resign(issuer, {**header, "crit": ["exp"]}, claims),
        "kid_traversal": resign(issuer, {**header, "kid": "../../../../dev/null"}, claims,
                                attacker),
        "kid_injection": resign(issuer, {**header, "kid": "' OR '1'='1"}, claims, attacker),
        "expired": issuer.mint("m@x", iat=now - 7200, nbf=now - 7200, exp=now - 3600),
        "not_yet_valid": issuer.mint("m@x", nbf=now + 3600),
        "issued_in_future": issuer.mint("m@x", iat=now + 3600),
        "wrong_issuer": issuer.mint("m@x", iss="https://evil.example"),
        "issuer_trailing_slash": issuer.mint("m@x", iss=issuer.url + "/"),
        "wrong_audience": issuer.mint("m@x", aud="another-service"),
        "audience_list_without_ours": issuer.mint("m@x", aud=["a", "b"]),
        "missing_exp": issuer.mint("m@x", exp=None),
        "missing_iss": issuer.mint("m@x", iss=None),
        "missing_aud": issuer.mint("m@x", aud=None),
        "missing_user_claim": issuer.mint("m@x", email=None),
        "exp_as_string": issuer.mint("m@x", exp=str(now + 600)),
        "tampered_payload": f"{h}.{b64(dict(claims, email='admin@corp.example'))}.{s}",
        "tampered_signature": f"{h}.{p}.{s[:-6]}AAAAAA",
        "signature_stripped": f"{h}.{p}.",
        "truncated_two_parts": f"{h}.{p}",
        "truncated_half": good[: len(good) // 2],
        "oversized": issuer.mint("m@x", padding="A" * 40000),
        "non_base64_header": f"%%%.{p}.{s}",
        "non_json_payload": f"{h}.{b64(b'not json at all')}.{s}",
        "nested_jwe": f"{b64({'alg': 'RSA-OAEP', 'enc': 'A256GCM', 'cty': 'JWT'})}.a.b.c.d",
        "provider_api_key": "sk-proj-" + "A" * 48,
        "spaces_not_a_token": "not a token at all",
    }


@pytest.fixture(scope="module")
def target(issuer, tmp_path_factory):
    upstream = FakeUpstream()
    with Gateway(base_config(issuer.url, upstream.url), mode=f"reverse:{upstream.url}",
                 env={"DOUANE_TEST_UPSTREAM_KEY": UPSTREAM_KEY},
                 workdir=tmp_path_factory.mktemp("tokens")) as gw:
        yield gw, upstream
    upstream.close()


@pytest.fixture(scope="module")
def tokens(issuer) -> dict[str, str]:
    return corpus(issuer)


def test_the_corpus_is_large_enough(tokens):
    assert len(tokens) >= 40


@pytest.mark.parametrize("case", [
    "alg_none", "alg_None", "alg_NONE", "alg_nOnE_with_signature", "alg_missing",
    "hs256_public_pem", "hs384_public_pem", "hs512_public_pem", "hs256_public_jwk",
    "rs512_not_allowed", "es256_header_rsa_signature", "unknown_kid", "jku_attacker",
    "x5u_attacker", "embedded_jwk", "x5c_header", "crit_header", "kid_traversal",
    "kid_injection", "expired", "not_yet_valid", "issued_in_future", "wrong_issuer",
    "issuer_trailing_slash", "wrong_audience", "audience_list_without_ours", "missing_exp",
    "missing_iss", "missing_aud", "missing_user_claim", "exp_as_string", "tampered_payload",
    "tampered_signature", "signature_stripped", "truncated_two_parts", "truncated_half",
    "oversized", "non_base64_header", "non_json_payload", "nested_jwe", "provider_api_key",
    "spaces_not_a_token"])
def test_bad_token_is_refused(case, target, tokens):
    gw, upstream = target
    token = tokens[case]
    before = len(upstream.requests)
    resp = httpx.post(gw.url + "/v1/chat/completions", headers={"authorization": f"Bearer {token}"},
                      json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status_code == 401, resp.text
    assert len(upstream.requests) == before
    decision_id = resp.headers["x-douane-decision-id"]
    assert decision_id in resp.json()["error"]["message"]
    gw.audit_record(decision_id)
    records = [r for r in gw.audit_records() if r.get("decision_id") == decision_id]
    assert len(records) == 1 and records[0]["action"] == "refuse"
    if len(token) > 40:
        assert token not in gw.audit_file().read_text()
        assert token not in gw.log_text()
