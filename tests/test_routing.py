"""Routing, credential brokering and fail-closed hooks, in mitmproxy's addon test style."""

from __future__ import annotations

import pytest
from mitmproxy.test import taddons, tflow, tutils

from douane.flowstate import Identity, state
from douane.refusals import guarded
from douane.routing import Broker, InjectCredential, Route
from douane.settings import Settings

CONFIG = """\
version: 1
identity: {dev_issuer: {enabled: true, key_file: %(dir)s/dev.pem}}
upstreams:
  openai: {url: "https://api.openai.com/v1", protocol: openai, credential: {env: T_OPENAI_KEY}}
  anthropic: {url: "https://api.anthropic.com", protocol: anthropic,
              credential: {env: T_MISSING_KEY, optional: true}}
passthrough: {hosts: ["*.example.org"]}
"""


@pytest.fixture
def gateway(tmp_path, monkeypatch):
    monkeypatch.setenv("T_OPENAI_KEY", "sk-upstream")
    monkeypatch.delenv("T_MISSING_KEY", raising=False)
    path = tmp_path / "douane.yaml"
    path.write_text(CONFIG % {"dir": tmp_path})
    settings = Settings()
    route, broker, inject = Route(settings), Broker(settings), InjectCredential()
    with taddons.context(settings, route, broker, inject) as tctx:
        tctx.configure(settings, douane_config=str(path))
        yield route, broker, inject


def flow_to(host: str, path: str, port: int = 443, **headers: str):
    f = tflow.tflow(req=tutils.treq(host=host, port=port, path=path.encode(), scheme=b"https"))
    f.request.headers.clear()
    f.request.headers.update(headers)
    state(f).identity = Identity("alice", ("eng",), "dev", "alice", "bearer")
    return f


def run(gateway, f) -> None:
    route, broker, inject = gateway
    for hook in (route.requestheaders, broker.requestheaders, inject.request):
        hook(f)


def test_declared_upstream_gets_the_credential_and_loses_the_client_token(gateway):
    f = flow_to("api.openai.com", "/v1/chat/completions", authorization="Bearer client.jwt.x",
                **{"x-api-key": "k", "proxy-authorization": "Basic x"})
    gateway[0].requestheaders(f)
    gateway[1].requestheaders(f)
    # only the last step adds it: a held or displayed request does not carry the key
    assert "authorization" not in f.request.headers
    gateway[2].request(f)
    assert f.response is None
    assert state(f).upstream.name == "openai"
    assert f.request.headers["authorization"] == "Bearer sk-upstream"
    assert "x-api-key" not in f.request.headers and "proxy-authorization" not in f.request.headers


def test_credential_is_forgotten_once_sent(gateway):
    f = flow_to("api.openai.com", "/v1/chat/completions")
    run(gateway, f)
    f.response = tutils.tresp()
    gateway[1].responseheaders(f)
    assert "authorization" not in f.request.headers


@pytest.mark.parametrize(("host", "path", "port"), [
    ("api.openai.com", "/v2/models", 443),  # outside the declared path prefix
    ("api.openai.com", "/v1/models", 8443),  # another port
    ("evil.example.com", "/v1/chat/completions", 443),
    ("127.0.0.1", "/v1/chat/completions", 443),
])
def test_undeclared_targets_are_refused(gateway, host, path, port):
    f = flow_to(host, path, port)
    run(gateway, f)
    assert f.response.status_code == 403
    assert b"undeclared_upstream" in f.response.content
    assert state(f).decision.action == "refuse"


def test_passthrough_hosts_are_allowed_and_untouched(gateway):
    f = flow_to("docs.example.org", "/x", authorization="Bearer theirs")
    run(gateway, f)
    assert f.response is None and state(f).upstream is None
    assert f.request.headers["authorization"] == "Bearer theirs"
    assert state(f).decision.reasons[0].rule == "route.passthrough"


def test_missing_optional_credential_refuses_in_the_upstream_shape(gateway):
    f = flow_to("api.anthropic.com", "/v1/messages")
    run(gateway, f)
    assert f.response.status_code == 503
    assert f.response.json()["type"] == "error"
    assert "T_MISSING_KEY" in f.response.json()["error"]["message"]


def test_connect_to_an_undeclared_host_is_refused(gateway):
    f = tflow.tflow(req=tutils.treq(method=b"CONNECT", host="evil.example.com", port=443,
                                    path=b""))
    gateway[1].http_connect(f)
    assert f.response.status_code == 403
    ok = tflow.tflow(req=tutils.treq(method=b"CONNECT", host="api.openai.com", port=443, path=b""))
    gateway[1].http_connect(ok)
    assert ok.response is None


class Exploding:
    @guarded
    def request(self, flow):
        raise ValueError("policy bug")


def test_an_exception_in_a_hook_refuses_the_flow():
    f = flow_to("api.openai.com", "/v1/chat/completions")
    with taddons.context():
        Exploding().request(f)
    assert f.response.status_code == 500
    assert state(f).decision.action == "error"
    assert state(f).decision_id.encode() in f.response.content
