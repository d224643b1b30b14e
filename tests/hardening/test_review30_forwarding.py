"""Review, stop 30: what a client's query carries on to an upstream beside douane's credential
(16f2e9c's generic forwarding, the model routes' documented parameters), and how its body is
framed there (fc34089). Through a real gateway: refused before the upstream, audited naming the
query; a body sent whole with its length."""

from __future__ import annotations

import base64
import json
import urllib.parse

import httpx
import pytest
import yaml

from tests.hardening.conftest import POLICY, assert_refused, reverse_gateway
from tests.hardening.test_review_forwarding import raw
from tests.hardening.test_sec30_generic_forwarding import INTERNAL, PATH

KEY = "sk-proj-" + "Lp8Vd3Xc6Qn1" * 3
WRITTEN = {  # a key in a query value, written so that no catalogue hint shows decoded
    "base64": base64.b64encode(KEY.encode()).decode(),
    "a zero-width space in the prefix": "s\u200bk-" + KEY[3:],
    "hex bytes apart": " ".join(f"{b:02x}" for b in KEY.encode()),
}


@pytest.fixture(scope="module")
def gw(issuer, llm, tmp_path_factory):
    policy = yaml.safe_load(POLICY)
    policy["default"]["upstreams"]["internal"] = {"models": ["*"]}
    policy["default"]["upstreams"]["llm"]["operations"] = ["GET /v1/models"]
    llm.canned[PATH] = ("application/json", b'{"output": {"text": "done"}}')
    with reverse_gateway(issuer, llm, tmp_path_factory.mktemp("review30_forwarding"), policy,
                         upstreams={"internal": {**INTERNAL, "url": llm.url + "/internal"}}
                         ) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def token(issuer, secrets):
    token = issuer.mint("rhea@corp.example", ["engineering"])
    secrets.add(token)
    return token


def _assert_query_refused(gw, llm, before: int, resp: httpx.Response) -> None:
    record = assert_refused(gw, llm, before, resp, 403)
    reason = record["reasons"][0]
    assert reason["rule"] == "route.query" and "detector.secret.api_key" in reason["message"]
    assert KEY not in json.dumps(record) and KEY not in resp.text


@pytest.mark.parametrize("case", list(WRITTEN))
def test_a_disguised_key_in_a_generic_upstreams_query_is_refused(case, gw, llm, token, secrets):
    """16f2e9c tested a forwarded parameter's value for a catalogue hint as written: a base64
    key, or one whose `sk-` a zero-width space cuts, went on to the upstream (200)."""
    secrets.add(KEY)
    before = len(llm.requests)
    resp = httpx.post(gw.url + PATH + "?version=" + urllib.parse.quote(WRITTEN[case]),
                      json={"prompt": "hello"}, headers={"authorization": f"Bearer {token}"})
    _assert_query_refused(gw, llm, before, resp)


@pytest.mark.parametrize("written", [KEY, WRITTEN["base64"]], ids=["plain", "base64"])
def test_a_key_in_a_model_apis_documented_parameter_is_refused(written, gw, llm, token, secrets):
    """The model routes checked a query's parameter names only: `api-version` (read on every
    OpenAI path) holding a key went on to the provider beside the org's key (200)."""
    secrets.add(KEY)
    before = len(llm.requests)
    resp = httpx.get(gw.url + "/v1/models?api-version=" + urllib.parse.quote(written),
                     headers={"authorization": f"Bearer {token}"})
    _assert_query_refused(gw, llm, before, resp)


def test_ordinary_query_values_pass(gw, llm, token):
    before = len(llm.requests)
    resp = httpx.get(gw.url + "/v1/models?api-version=2024-10-21",
                     headers={"authorization": f"Bearer {token}"})
    assert resp.status_code != 403, resp.text
    assert len(llm.requests) == before + 1
    resp = httpx.post(gw.url + PATH + "?version=" + "2026-11-30.preview-Zq7Lm2Pz9Kd4",
                      json={"prompt": "hello"}, headers={"authorization": f"Bearer {token}"})
    assert resp.status_code == 200, resp.text


@pytest.mark.parametrize("spelling", [b"chunked", b"Chunked"])
def test_a_chunked_body_reaches_the_upstream_with_its_length(spelling, gw, llm, token):
    """Review of fc34089 (an HTTP/2 body sent with its length): an HTTP/1 chunked body went on
    chunked under the client's spelling of Transfer-Encoding, which an upstream reading only
    `chunked` takes for no body, then reads the chunks as the next request on its connection (the
    fake upstream, which reads Content-Length only, received b""). douane holds the whole body:
    it goes with its length."""
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
    before = len(llm.requests)
    resp = raw(gw, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
               + token.encode() + b"\r\nContent-Type: application/json\r\nTransfer-Encoding: "
               + spelling + b"\r\nConnection: close\r\n",
               b"%x\r\n" % 20 + body[:20] + b"\r\n%x\r\n" % (len(body) - 20) + body[20:]
               + b"\r\n0\r\n\r\n")
    assert resp.status_code == 200, resp.text
    seen = llm.requests[before]
    assert "transfer-encoding" not in seen.headers and seen.headers["content-length"] == \
        str(len(body)) and seen.body == body, (seen.headers, seen.body[:80])
