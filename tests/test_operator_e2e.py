"""What a new operator meets through a real gateway: several upstreams on one gateway, a stand-in
for a provider's host, refusals inside Responses streams the SDK raises, errors that name the API's
own parameters, and what a proxy-mode identity failure looks like."""

from __future__ import annotations

import os
import signal
import subprocess

import anthropic
import openai
import pytest
import yaml

from tests.conftest import UPSTREAM_KEY
from tests.support.gateway import REPO, base_config, free_port
from tests.support.upstream import DEFAULT_REPLY, FakeUpstream

CREDENTIAL = {"env": "DOUANE_TEST_UPSTREAM_KEY"}


@pytest.fixture
def second() -> FakeUpstream:
    upstream = FakeUpstream()
    yield upstream
    upstream.close()


def test_one_gateway_serves_openai_and_anthropic_on_two_listeners(make_gateway, issuer, upstream,
                                                                  second):
    # README: `scripts/run --mode reverse:https://api.openai.com@8080
    #                       --mode reverse:https://api.anthropic.com@8081`
    config = base_config(issuer.url, upstream.url)
    config["upstreams"] = {
        "openai": {"url": upstream.url + "/v1", "protocol": "openai", "credential": CREDENTIAL},
        "anthropic": {"url": second.url + "/v1", "protocol": "anthropic",
                      "credential": CREDENTIAL}}
    port = free_port()
    gw = make_gateway(config, mode=f"reverse:{upstream.url}",
                      args=["--mode", f"reverse:{second.url}@{port}"])
    token = issuer.mint("alice@corp.example", ["engineering"])
    chat = openai.OpenAI(base_url=gw.url + "/v1", api_key=token, max_retries=0)
    reply = chat.chat.completions.create(model="gpt-4o-mini", max_tokens=20,
                                         messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content == DEFAULT_REPLY
    claude = anthropic.Anthropic(base_url=f"http://127.0.0.1:{port}", api_key=token,
                                 max_retries=0)
    message = claude.messages.create(model="claude-test", max_tokens=20,
                                     messages=[{"role": "user", "content": "hi"}])
    assert message.content[0].text == DEFAULT_REPLY
    assert [r.path for r in upstream.requests] == ["/v1/chat/completions"]
    assert [r.path for r in second.requests] == ["/v1/messages"]
    assert second.requests[0].headers["x-api-key"] == UPSTREAM_KEY
    assert token not in second.received_bytes().decode()


def test_connect_to_sends_a_declared_host_to_a_stand_in(make_gateway, issuer, upstream):
    # Proxy mode as clients use it (HTTPS_PROXY, the SDK's own base URL), answered by a local
    # server that speaks the OpenAI API.
    config = base_config(issuer.url, upstream.url)
    config["upstreams"] = {"openai": {"url": "https://api.openai.com/v1", "protocol": "openai",
                                      "credential": CREDENTIAL, "connect_to": upstream.url}}
    gw = make_gateway(config)
    token = issuer.mint("alice@corp.example", ["engineering"])
    client = openai.OpenAI(api_key="unused", max_retries=0, http_client=openai.DefaultHttpxClient(
        proxy=gw.proxy_url("alice", token), verify=str(gw.ca_file)))
    reply = client.chat.completions.create(model="gpt-4o-mini", max_tokens=20,
                                           messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content == DEFAULT_REPLY
    received = upstream.requests[-1]
    assert received.path == "/v1/chat/completions"
    assert received.headers["host"] == "api.openai.com"
    assert received.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    record = gw.audit_records(wait_for=1)[-1]
    assert record["upstream"] == "openai" and record["action"] == "allow"


GRANTS = """\
version: 1
default:
  upstreams:
    llm: {models: ["gpt-*"], max_tokens: 500}
rules:
  - {id: deny.answer, literal: "fake upstream", in: [completion], score: 90}
"""


@pytest.fixture
def policed(make_gateway, issuer, upstream, tmp_path):
    (tmp_path / "grants.yaml").write_text(GRANTS)
    config = base_config(issuer.url, upstream.url,
                         policy={"files": [str(tmp_path / "grants.yaml")]})
    gw = make_gateway(config, mode=f"reverse:{upstream.url}")
    token = issuer.mint("alice@corp.example", [])
    return gw, openai.OpenAI(base_url=gw.url + "/v1", api_key=token, max_retries=0)


def test_a_refusal_inside_a_responses_stream_raises_with_douanes_reason(policed):
    gw, client = policed
    stream = client.responses.create(model="gpt-4.1", input="hi", max_output_tokens=100,
                                     stream=True)
    with pytest.raises(openai.APIError) as err:
        for _ in stream:
            pass
    message = str(err.value)
    assert "deny rule deny.answer" in message and "douane decision dcn_" in message
    with pytest.raises(openai.APIError) as err, \
            client.responses.stream(model="gpt-4.1", input="hi", max_output_tokens=100) as helper:
        helper.get_final_response()
    assert "deny rule deny.answer" in str(err.value)
    decision_id = message.split("douane decision ")[1].split(")")[0]
    record = gw.audit_record(decision_id)
    assert record["action"] == "block"


def test_the_output_ceiling_is_named_as_each_api_names_it(policed):
    _, client = policed
    with pytest.raises(openai.PermissionDeniedError) as err:
        client.responses.create(model="gpt-4.1", input="hi")
    assert "set max_output_tokens (at most 500)" in str(err.value)
    with pytest.raises(openai.PermissionDeniedError) as err:
        client.responses.create(model="gpt-4.1", input="hi", max_output_tokens=900)
    assert "the requested max_output_tokens 900 is above the granted 500" in str(err.value)
    with pytest.raises(openai.PermissionDeniedError) as err:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert "set max_completion_tokens (or max_tokens) (at most 500)" in str(err.value)


def test_a_proxy_mode_identity_failure_and_where_its_reason_is(make_gateway, issuer, upstream):
    # README, troubleshooting: over HTTPS the SDK says "Connection error." (the gateway answered
    # CONNECT with 407, in __cause__); the reason is in the audit log. Over plain HTTP the SDK
    # shows the 407 and its reason.
    config = base_config(issuer.url, upstream.url)
    config["upstreams"]["openai"] = {"url": "https://api.openai.com/v1", "protocol": "openai",
                                     "credential": CREDENTIAL, "connect_to": upstream.url}
    gw = make_gateway(config)

    def client(base_url: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0,
                             http_client=openai.DefaultHttpxClient(
                                 proxy=gw.proxy_url("alice", "not-a-token"), verify=False))

    with pytest.raises(openai.APIConnectionError) as err:
        client("https://api.openai.com/v1").chat.completions.create(
            model="gpt-4o-mini", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert "407" in str(err.value.__cause__)
    record = gw.audit_records(wait_for=1)[-1]
    assert record["status"] == 407 and record["method"] == "CONNECT"
    assert "not a provider API key or password" in record["reasons"][0]["message"]
    with pytest.raises(openai.APIStatusError) as err:
        client(upstream.url + "/v1").chat.completions.create(
            model="gpt-4o-mini", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code == 407 and "douane decision dcn_" in str(err.value)
    assert not upstream.requests


@pytest.mark.parametrize("dev_issuer", [True, False])
def test_the_start_banner_suggests_a_token_this_config_accepts(issuer, upstream, tmp_path,
                                                               dev_issuer):
    config = base_config(None if dev_issuer else issuer.url, upstream.url)
    config["gateway"] = {"state_dir": str(tmp_path / "state")}
    (tmp_path / "douane.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "DOUANE_CONFIG": str(tmp_path / "douane.yaml"),
           "DOUANE_PORT": str(free_port()), "DOUANE_TEST_UPSTREAM_KEY": UPSTREAM_KEY}
    run = subprocess.Popen([REPO / "scripts" / "run"], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        banner = ""
        for line in run.stderr:
            banner += line
            if line.startswith("  Proxy mode:"):
                break
    finally:
        os.killpg(run.pid, signal.SIGTERM)
        run.wait(timeout=60)
    if dev_issuer:
        assert "douane token alice@example.com" in banner and "local dev issuer" in banner
    else:
        assert "douane token" not in banner
        assert f"an access token from your identity provider: {issuer.url}" in banner
