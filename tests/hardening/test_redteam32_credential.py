"""Red team, stop 32: an upstream that echoes the credential douane sent it. A provider (or a
proxy in front of one, or a generic upstream such as an echo service) that reflects the request's
key in an error message, a header or an answer handed the org's key to the caller, who could then
call the provider without douane; a key the secrets catalogue does not know by its shape (Azure
OpenAI's 32 hex digits) was recorded as sent too. An answer carrying the credential, in a header
or in its (decoded) body, is refused 502 in the upstream's shape with a record."""

from __future__ import annotations

import gzip
import json

import httpx
import pytest

from tests.conftest import UPSTREAM_KEY
from tests.hardening.conftest import POLICY, token_of, with_claude
from tests.hardening.test_evasion import chat
from tests.support.gateway import Gateway, base_config

AZURE_KEY = "3f9a7c01" * 4  # Azure OpenAI's shape: 32 hex digits, no catalogue pattern


@pytest.fixture(scope="module")
def gw(issuer, llm, tmp_path_factory):
    work = tmp_path_factory.mktemp("redteam32_credential")
    (work / "policy.yaml").write_text(POLICY.replace(
        '    claude: {models: ["*"]}\n', '    claude: {models: ["*"]}\n    az: {models: ["*"]}\n', 1))
    config = base_config(issuer.url, llm.url + "/v1", policy={"files": [str(work / "policy.yaml")]},
                         recording={})
    with_claude(config, llm.url)
    config["upstreams"]["az"] = {"url": llm.url + "/az", "protocol": "openai", "credential": {
        "env": "DOUANE_TEST_AZURE_KEY", "header": "api-key", "format": "{secret}"}}
    with Gateway(config, mode=f"reverse:{llm.url}", workdir=work / "gw",
                 env={"DOUANE_TEST_UPSTREAM_KEY": UPSTREAM_KEY,
                      "DOUANE_TEST_AZURE_KEY": AZURE_KEY}) as gateway:
        yield gateway
    llm.answer = None


def _sent_key(handler) -> str:
    value = handler.headers.get("api-key") or handler.headers.get("authorization", "")
    return value.removeprefix("Bearer ")


def _answer(status: int, where: str):
    """An upstream answer echoing the key it received `where`: an error's message, a header,
    a gzip-compressed answer's text."""
    def answer(handler, _req) -> None:
        key = _sent_key(handler)
        text = f"Incorrect API key provided: {key}" if where != "header" else "ok"
        doc = {"error": {"message": text, "type": "invalid_request_error"}} if status >= 400 else \
            {"id": "c1", "object": "chat.completion", "model": "m", "choices": [{
                "index": 0, "message": {"role": "assistant", "content": text},
                "finish_reason": "stop"}]}
        data = json.dumps(doc).encode()
        handler.send_response(status)
        handler.send_header("content-type", "application/json")
        if where == "header":
            handler.send_header("x-request-echo", f"api-key={key}")
        if where == "gzip":
            data = gzip.compress(data)
            handler.send_header("content-encoding", "gzip")
        handler.send_header("content-length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)
    return answer


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/az/chat/completions"])
@pytest.mark.parametrize("status,where", [(401, "body"), (200, "header"), (200, "gzip")])
def test_an_answer_echoing_the_credential_never_reaches_the_caller(gw, llm, issuer, secrets,
                                                                   path, status, where):
    """Before: the caller read the org's key (401 body, header, decoded gzip answer)."""
    key = AZURE_KEY if path.startswith("/az") else UPSTREAM_KEY
    token = token_of(issuer, secrets, "echo@corp.example", ["engineering"])
    llm.answer = _answer(status, where)
    try:
        before = len(llm.requests)
        resp = httpx.post(gw.url + path, json=chat("hello"),
                          headers={"authorization": f"Bearer {token}"}, timeout=30)
    finally:
        llm.answer = None
    assert len(llm.requests) == before + 1  # the upstream was asked: its answer is what leaks
    assert key not in resp.text and key not in json.dumps(dict(resp.headers)), resp.headers
    assert resp.status_code == 502, resp.text
    record = gw.audit_record(resp.headers["x-douane-decision-id"])
    assert resp.headers["x-douane-decision-id"] in resp.text
    assert record["reasons"][0]["rule"] == "upstream.credential_echo", record
    assert key not in json.dumps(record)


def test_the_echoed_key_is_in_no_recording(gw, llm):
    """Before: the Azure key an upstream echoed was in the recording (no catalogue pattern)."""
    gw.audit_records()  # (the writer's files are flushed per flow; read after the cases above)
    leaks = [p.name for p in gw.state_dir.rglob("*") if p.is_file()
             and AZURE_KEY.encode() in p.read_bytes()]
    assert not leaks, leaks


def test_an_ordinary_answer_passes(gw, llm, issuer, secrets):
    token = token_of(issuer, secrets, "echo@corp.example", ["engineering"])
    for path in ("/v1/chat/completions", "/az/chat/completions"):
        resp = httpx.post(gw.url + path, json=chat("hello"),
                          headers={"authorization": f"Bearer {token}"}, timeout=30)
        assert resp.status_code == 200, resp.text
