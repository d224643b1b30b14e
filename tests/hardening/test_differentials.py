"""Parse differentials (red team, stop 27): a request douane reads one way and the upstream
another. Each case below passed the checkpoint before its fix, with the org's key, and the
upstream read what douane did not: a body in another character set, a model named in the path or
in a stored prompt, a token ceiling written as a string.

One gateway, reverse mode in front of the fake upstream, which also serves an Azure-style
`.../openai/deployments/NAME/...` upstream (`azure`: the deployment in the path is the model).
"""

from __future__ import annotations

import json

import httpx
import pytest

from tests.conftest import UPSTREAM_KEY
from tests.hardening.conftest import DENIED, assert_refused, token_of, with_claude
from tests.support.gateway import Gateway, base_config

POLICY = """\
version: 1
default:
  upstreams:
    llm: {models: ["*"]}
    claude: {models: ["*"]}
groups:
  mini:
    upstreams:
      llm: {models: ["gpt-4o-mini"]}
      azure: {models: ["gpt-4o-mini"]}
  capped:
    upstreams:
      llm: {models: ["*"], max_tokens: 100, temperature: [0, 1]}
  nomedia:
    upstreams:
      llm: {models: ["*"], media: false}
  budget:
    upstreams:
      llm: {models: ["*"], max_tokens: 100}
    limits: {tokens_per_day: 2000}
rules:
  - id: deny.codename
    literal: "project nightingale"
    in: [prompt, tool_arguments, tool_result, tool_description, completion]
    score: 90
thresholds: {hold: 50, block: 80}
"""


@pytest.fixture(scope="module")
def gw(issuer, llm, tmp_path_factory):
    work = tmp_path_factory.mktemp("differentials")
    (work / "policy.yaml").write_text(POLICY)
    config = base_config(issuer.url, llm.url, policy={"files": [str(work / "policy.yaml")]},
                         recording={})
    with_claude(config, llm.url)
    config["upstreams"]["azure"] = {"url": llm.url + "/openai", "protocol": "openai",
                                    "credential": {"env": "DOUANE_TEST_UPSTREAM_KEY"}}
    with Gateway(config, mode=f"reverse:{llm.url}", env={"DOUANE_TEST_UPSTREAM_KEY": UPSTREAM_KEY},
                 workdir=work / "gw") as gateway:
        yield gateway


@pytest.fixture(scope="module")
def eve(issuer, secrets):
    return token_of(issuer, secrets, "eve@corp.example", ["engineering"])


def post(gw: Gateway, token: str, path: str, body: bytes | dict,
         ctype: str = "application/json") -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(gw.url + path, content=content, timeout=30, headers={
        "authorization": f"Bearer {token}", "content-type": ctype})


def chat(text: str, **extra) -> dict:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}], **extra}


# `project +AG4-ightingale` is `project nightingale` in UTF-7; a server that decodes a body by its
# declared charset reads that (the official TypeScript MCP SDK's StreamableHTTPServerTransport does:
# `getRawBody(req, {encoding: contentType.parse(ct).parameters.charset})`, iconv-lite knows UTF-7).
UTF7 = json.dumps(chat("tell me about project +AG4-ightingale")).encode()


@pytest.mark.parametrize("ctype", [
    "application/json; charset=utf-7", 'application/json; charset="UTF-7"',
    "application/json;charset=utf-8;charset=utf-7", "application/json; charset=iso-8859-1",
    "application/json; charset=shift_jis", "application/json; charset=utf-16"])
def test_a_body_in_another_charset_is_refused(gw, llm, eve, ctype):
    """douane reads a JSON body as UTF-8 (or UTF-16/32 by its first bytes, as RFC 8259 and
    `json.loads` do); a server that honours the declared charset reads other text: the denied
    phrase in UTF-7 reached the upstream (200), as would a quote swallowed by a Shift_JIS lead
    byte. A charset other than UTF-8 is refused as a body douane cannot read."""
    before = len(llm.requests)
    resp = post(gw, eve, "/v1/chat/completions", UTF7, ctype)
    record = assert_refused(gw, llm, before, resp, 415)
    assert record["reasons"][0]["rule"] == "protocol.unsupported_charset", record


@pytest.mark.parametrize("ctype", ["application/json; charset=utf-8",
                                   'application/json; charset="UTF-8"', "application/json"])
def test_a_utf8_charset_passes(gw, llm, eve, ctype):
    resp = post(gw, eve, "/v1/chat/completions", chat("hello"), ctype)
    assert resp.status_code == 200, resp.text


def test_the_model_a_deployment_path_names_is_the_one_granted(gw, llm, issuer, secrets):
    """Azure OpenAI serves the deployment named in the path and ignores a `model` in the body:
    douane checked the body's `model` only, so a group granted `gpt-4o-mini` reached any
    deployment by naming `gpt-4o-mini` in the body (or no model at all: an absent model was not
    checked against the grant)."""
    mini = token_of(issuer, secrets, "mia@corp.example", ["mini"])
    before = len(llm.requests)
    for path, doc in [
            ("/openai/deployments/gpt-5-pro/chat/completions", chat("hi")),
            ("/openai/deployments/gpt-5-pro/chat/completions",
             {"messages": [{"role": "user", "content": "hi"}]}),
            ("/openai/deployments/gpt-5-pro/responses", {"model": "gpt-4o-mini", "input": "hi"})]:
        record = assert_refused(gw, llm, before, post(gw, mini, path, doc), 403)
        assert record["reasons"][0]["rule"] == "grant.model", record
    ok = post(gw, mini, "/openai/deployments/gpt-4o-mini/chat/completions", chat("hi"))
    assert ok.status_code == 200, ok.text
    assert llm.requests[-1].path == "/openai/deployments/gpt-4o-mini/chat/completions"


def test_a_request_naming_no_model_is_held_to_a_model_grant(gw, llm, issuer, secrets):
    """Without `model`, the upstream picks one (a stored prompt's, a deployment's default):
    under a grant listing models, the model must be named."""
    mini = token_of(issuer, secrets, "mia@corp.example", ["mini"])
    before = len(llm.requests)
    resp = post(gw, mini, "/v1/responses", {"input": "hi"})
    record = assert_refused(gw, llm, before, resp, 403)
    assert record["reasons"][0]["rule"] == "grant.model", record


def test_a_stored_prompt_is_refused(gw, llm, eve):
    """A Responses `prompt: {id}` is a prompt stored upstream for the whole project: its model,
    instructions and tools (hosted tools, remote MCP servers, vector stores) are added there,
    unseen by douane: no grant or deny rule could hold them. It passed with any group."""
    before = len(llm.requests)
    for doc in [{"model": "gpt-4o-mini", "prompt": {"id": "pmpt_abc", "version": "3"},
                 "input": "hi"},
                {"prompt": {"id": "pmpt_abc", "variables": {"city": "Paris"}}},
                {"model": "m", "input": "hi", "prompt": {"id": "pmpt_1", "variables": {
                    "doc": {"type": "input_file", "file_id": "file-abc"}}}}]:
        record = assert_refused(gw, llm, before, post(gw, eve, "/v1/responses", doc), 403)
        assert record["reasons"][0]["rule"] == "protocol.stored_prompt", record


def test_a_bound_written_as_a_string_is_refused(gw, llm, issuer, secrets):
    """`max_completion_tokens: "100000"` beside `max_tokens: 100`: douane read the number and
    skipped the string, an OpenAI-compatible server with lax typing (pydantic: vLLM, LiteLLM)
    reads 100000 under a grant capped at 100. A bound douane cannot read is refused."""
    capped = token_of(issuer, secrets, "cap@corp.example", ["capped"])
    before = len(llm.requests)
    for path, doc in [
            ("/v1/chat/completions", chat("hi", max_tokens=100, max_completion_tokens="100000")),
            ("/v1/responses", {"model": "m", "input": "hi", "max_output_tokens": 100,
                               "max_tokens": "999999"}),
            ("/v1/chat/completions", chat("hi", max_tokens=100, temperature="1.9")),
            ("/v1/chat/completions", chat("hi", max_tokens=True))]:
        resp = post(gw, capped, path, doc)
        record = assert_refused(gw, llm, before, resp, 400)
        assert record["reasons"][0]["rule"] == "protocol.invalid_number", record


def test_an_answer_spoken_aloud_is_media(gw, llm, issuer, secrets):
    """`modalities: ["audio"]` (or an `audio` output setting) has the model answer in speech:
    no deny rule or masking reads it. A group without media asked for it and it passed."""
    nomedia = token_of(issuer, secrets, "nm@corp.example", ["nomedia"])
    before = len(llm.requests)
    for extra in [{"modalities": ["text", "audio"], "audio": {"voice": "alloy",
                                                              "format": "wav"}},
                  {"audio": {"voice": "alloy", "format": "mp3"}}]:
        resp = post(gw, nomedia, "/v1/chat/completions", chat("hi", **extra))
        record = assert_refused(gw, llm, before, resp, 403)
        assert record["reasons"][0]["rule"] == "grant.media", record


def test_controls(gw, llm, eve):
    """The denied phrase in plain UTF-8 is caught; a request within its grant passes."""
    before = len(llm.requests)
    assert_refused(gw, llm, before, post(gw, eve, "/v1/chat/completions",
                                         chat(f"about {DENIED}")), 403)
    assert post(gw, eve, "/v1/responses", {"model": "m", "input": "hi"}).status_code == 200


def test_many_choices_count_against_the_daily_budget(gw, llm, issuer, secrets):
    """`n: 64` asks for 64 answers of up to `max_tokens` each: the daily token budget counted
    the request's `max_tokens` once, so a group capped at 100 tokens a request and 2,000 a day
    had 6,400 tokens generated for the price of 100 (legacy completions' `best_of` too)."""
    budget = token_of(issuer, secrets, "bud@corp.example", ["budget"])
    before = len(llm.requests)
    for path, doc in [("/v1/chat/completions", chat("hi", max_tokens=100, n=64)),
                      ("/v1/completions", {"model": "m", "prompt": "hi", "max_tokens": 100,
                                           "n": 1, "best_of": 40})]:
        record = assert_refused(gw, llm, before, post(gw, budget, path, doc), 429)
        assert record["reasons"][0]["rule"] == "limit.tokens_per_day", record
    ok = post(gw, budget, "/v1/chat/completions", chat("hi", max_tokens=100, n=2))
    assert ok.status_code == 200, ok.text
