"""Routing, credential brokering and fail-closed hooks, in mitmproxy's addon test style."""

from __future__ import annotations

import pytest
from mitmproxy.test import taddons, tflow, tutils

from douane import config, forwarding, operations, protocols
from douane.commands import explain
from douane.config import ConfigError, Upstream
from douane.flowstate import Identity, state
from douane.policy import model
from douane.routing import Broker, InjectCredential, Route
from douane.settings import Settings

CONFIG = """\
version: 1
identity: {dev_issuer: {enabled: true, key_file: %(dir)s/dev.pem}}
upstreams:
  openai: {url: "https://api.openai.com/v1", protocol: openai, credential: {env: T_OPENAI_KEY}}
  anthropic: {url: "https://api.anthropic.com", protocol: anthropic,
              credential: {env: T_MISSING_KEY, optional: true}}
  claude: {url: "https://llm.internal/anthropic", protocol: anthropic,
           credential: {env: T_OPENAI_KEY}}
  crm: {url: "https://crm.internal/mcp", protocol: mcp, credential: {env: T_OPENAI_KEY}}
passthrough: {hosts: ["*.example.org"]}
"""


POLICY = """\
version: 1
groups:
  admins:
    upstreams:
      openai:
        operations: ["GET /v1/models", "GET /v1/files/*/content", "DELETE /v1/models/ft:*"]
      crm: {operations: ["GET /mcp/health/**"]}
"""


@pytest.fixture
def gateway(tmp_path, monkeypatch):
    monkeypatch.setenv("T_OPENAI_KEY", "sk-upstream")
    monkeypatch.delenv("T_MISSING_KEY", raising=False)
    path = tmp_path / "douane.yaml"
    path.write_text(CONFIG % {"dir": tmp_path})
    (tmp_path / "grants.yaml").write_text(POLICY)
    policy = model.load([tmp_path / "grants.yaml"])
    settings = Settings()
    route, broker, inject = Route(settings), Broker(settings, lambda: policy), InjectCredential()
    with taddons.context(settings, route, broker, inject) as tctx:
        tctx.configure(settings, douane_config=str(path))
        yield route, broker, inject


def flow_to(host: str, path: str, port: int = 443, method: str = "POST",
            groups: tuple[str, ...] = ("eng",), authority: str = "", **headers: str):
    f = tflow.tflow(req=tutils.treq(host=host, port=port, path=path.encode(), scheme=b"https",
                                    method=method.encode(), authority=authority.encode()))
    f.request.headers.clear()
    f.request.headers.update(headers)
    state(f).identity = Identity("alice", groups, "dev", "alice", "bearer")
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


def test_a_pass_through_host_keeps_its_paths(gateway):
    f = flow_to("docs.example.org", "/a%2Fb/../c")
    run(gateway, f)
    assert f.response is None and f.request.path == "/a%2Fb/../c"


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


@pytest.mark.parametrize("path", [
    "/v1/../admin/keys", "/v1/./chat/completions", "/v1/chat/completions/..",
    "/v1/%2e%2e/admin/keys", "/v1/%2E%2e/admin/keys", "/v1/.%2e/admin/keys",
    "/v1/chat%2fcompletions", "/v1/chat%2Fcompletions", "/v1/chat%5ccompletions",
    "/v1/%252e%252e/admin/keys", "/v1/%25/x", "/v1\\..\\admin", "/v1/chat\\completions",
    "/v1//chat/completions", "//v1/chat/completions", "/v1/chat/completions%00",
    "/v1/chat/completions%0a", "/v1/chat\x00/completions", "/v1/chat completions",
    "/v1/chat\tcompletions", "/v1/chat/completions#frag", "/v1/%zz", "/v1/caf\u00e9",
    "*", "v1/chat/completions", "/v1/files/%EF%BC%8E%EF%BC%8E/content", "/v1/%C3%A9",
])
def test_ambiguous_paths_are_refused_before_routing(gateway, path):
    f = flow_to("api.openai.com", path, authorization="Bearer client.jwt.x")
    run(gateway, f)
    assert f.response.status_code == 400
    body = f.response.json()
    assert body["error"]["code"] == "ambiguous_path"  # in the OpenAI shape: routed on the raw path
    assert "sk-upstream" not in f.request.headers.get("authorization", "")
    assert state(f).decision.action == "refuse"


@pytest.mark.parametrize("header", ["X-HTTP-Method-Override", "x-http-method",
                                    "X-Method-Override"])
def test_a_method_override_header_is_refused(gateway, header):
    f = flow_to("api.openai.com", "/v1/chat/completions", **{header: "DELETE"})
    run(gateway, f)
    assert f.response.status_code == 400
    assert f.response.json()["error"]["code"] == "method_override"
    assert "authorization" not in f.request.headers


def test_a_dot_segment_cannot_leave_a_path_prefix(gateway):
    f = flow_to("llm.internal", "/anthropic/../v2/secret")
    run(gateway, f)
    assert f.response.status_code == 400 and f.response.json()["type"] == "error"
    assert "x-api-key" not in f.request.headers


def test_unreserved_escapes_are_decoded_and_sent_decoded(gateway):
    f = flow_to("api.openai.com", "/v1/chat/%63ompletions?api-version=%3a1")
    run(gateway, f)
    assert f.response is None
    assert f.request.path == "/v1/chat/completions?api-version=%3a1"  # the query is left as is
    assert f.request.headers["authorization"] == "Bearer sk-upstream"


@pytest.mark.parametrize(("method", "path"), [
    ("DELETE", "/v1/models/ft:gpt-4o:acme:prod"),
    ("GET", "/v1/chat/completions?limit=100"),  # stored completions of the whole org
    ("GET", "/v1/files/file-abc/content"),
    ("GET", "/v1/organization/admin_api_keys"),
    ("GET", "/v1/models"),
    ("HEAD", "/v1/models"),
    ("OPTIONS", "/v1/chat/completions"),
    ("PUT", "/v1/chat/completions"),
    ("POST", "/v1/assistants"),
    ("POST", "/v1/chat/completions/x"),
    ("get", "/v1/chat/completions"),
])
def test_operations_no_parser_reads_are_refused_before_the_credential(gateway, method, path):
    f = flow_to("api.openai.com", path, method=method, authorization="Bearer client.jwt.x")
    run(gateway, f)
    assert f.response.status_code == 403
    assert f.response.json()["error"]["code"] == "endpoint_not_governed"
    assert f.request.headers["authorization"] == "Bearer client.jwt.x"  # nothing injected
    assert state(f).decision.reasons[0].rule == "route.operation"
    assert state(f).interaction.operation == f"{method.upper()} {path.split('?')[0]}"


@pytest.mark.parametrize(("host", "method", "path"), [
    ("api.anthropic.com", "GET", "/v1/models"),
    ("api.anthropic.com", "POST", "/v1/messages/batches"),
    ("llm.internal", "POST", "/anthropic/v1/complete"),
    ("crm.internal", "PUT", "/mcp"),
    ("crm.internal", "POST", "/mcp/other"),
    ("crm.internal", "GET", "/mcp/health/x"),  # granted to admins only
])
def test_each_protocol_declares_its_operations(gateway, host, method, path):
    f = flow_to(host, path, method=method)
    run(gateway, f)
    assert f.response.status_code == 403, f.response.content


@pytest.mark.parametrize(("host", "method", "path"), [
    ("api.openai.com", "POST", "/v1/embeddings"),
    ("api.anthropic.com", "POST", "/v1/messages/count_tokens"),
    ("llm.internal", "POST", "/anthropic/v1/messages"),
    ("crm.internal", "POST", "/mcp"), ("crm.internal", "GET", "/mcp"),
    ("crm.internal", "DELETE", "/mcp/"),
])
def test_declared_operations_pass(gateway, host, method, path, monkeypatch):
    monkeypatch.setenv("T_MISSING_KEY", "x")
    f = flow_to(host, path, method=method)
    run(gateway, f)
    assert f.response is None or f.response.status_code == 503  # anthropic: no key configured


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/v1/models"), ("GET", "/v1/files/file-abc/content"),
    ("DELETE", "/v1/models/ft:gpt-4o:acme:prod"),
])
def test_a_grant_names_extra_operations(gateway, method, path):
    f = flow_to("api.openai.com", path, method=method, groups=("admins",))
    run(gateway, f)
    assert f.response is None
    assert f.request.headers["authorization"] == "Bearer sk-upstream"
    assert state(f).granted_operation
    assert state(f).decision.reasons[0].rule == "grant.operation"


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/v1/files/file-abc/content/x"),  # * stays within one segment
    ("GET", "/v1/files/content"),
    ("GET", "/v1/files/f/content/"),
    ("DELETE", "/v1/models/ft:x/y"),
    ("DELETE", "/v1/models/gpt-4o"),
    ("HEAD", "/v1/models"),
    ("GET", "/v1/models/x"),
])
def test_a_grant_names_no_more_than_it_says(gateway, method, path):
    f = flow_to("api.openai.com", path, method=method, groups=("admins",))
    run(gateway, f)
    assert f.response.status_code == 403


def test_mcp_grant_with_double_star(gateway):
    f = flow_to("crm.internal", "/mcp/health/a/b", method="GET", groups=("admins",))
    run(gateway, f)
    assert f.response is None and state(f).granted_operation


def test_absolute_form_and_host_header_name_the_routed_upstream(gateway):
    # reverse mode keeps an absolute-form request line; in a tunnel the Host header is the
    # client's: the upstream gets origin form and its own name
    f = flow_to("api.openai.com", "/v1/chat/completions", authority="evil.example:80")
    f.request.headers["host"] = "other.internal:8443"
    run(gateway, f)
    assert f.response is None
    assert f.request.authority == "" and f.request.host_header == "api.openai.com"
    assert f.request.data.authority == b""


def test_the_method_is_sent_as_audited(gateway):
    f = flow_to("api.openai.com", "/v1/chat/completions", method="post")
    run(gateway, f)
    assert f.response is None and f.request.data.method == b"POST"


@pytest.mark.parametrize(("text", "error"), [
    ("GET", "origin form"),
    ("FETCH /v1/models", "expected METHOD /path"),
    ("get /v1/models", "expected METHOD /path"),
    ("GET v1/models", "origin form"),
    ("GET /v1/models?limit=1", "without a query"),
    ("GET /v1/../admin", "dot segment"),
    ("GET /v1/%2e%2e/admin", "encoded"),
    ("GET /v1//models", "empty segment"),
    ("GET /v1/%6dodels", "write the path decoded: /v1/models"),
    ("GET /v1/a**b", "whole segment"),
])
def test_operation_patterns_are_validated(text, error):
    with pytest.raises(ValueError, match=error):
        operations.parse(text)


def test_an_invalid_grant_operation_names_file_and_line(tmp_path):
    path = tmp_path / "grants.yaml"
    path.write_text("version: 1\ngroups:\n  a:\n    upstreams:\n      openai:\n"
                    "        operations:\n          - GET /v1/models\n          - GET /v1/../x\n")
    with pytest.raises(ConfigError) as err:
        model.load([path])
    assert str(err.value).startswith(f"{path}:8 groups.a.upstreams.openai.operations.1: ")
    assert "dot segment" in str(err.value)


@pytest.mark.parametrize("url", ["https://h/v1/../admin", "https://h/v1/%2e%2e", "https://h//v1",
                                 "https://h/v1?x=1"])
def test_an_upstream_url_path_must_be_plain(tmp_path, url):
    path = tmp_path / "douane.yaml"
    path.write_text((CONFIG % {"dir": tmp_path}).replace("https://api.openai.com/v1", url))
    with pytest.raises(ConfigError, match="upstreams.openai.url: the URL's path must be plain"):
        config.load(path, gateway=False)


@pytest.mark.parametrize(("protocol", "prefix", "path"), [
    ("openai", "/v1", "/v1/chat/completions"), ("openai", "/", "/v1/chat/completions"),
    ("openai", "/v1/quick", "/v1/quick/chat/completions"), ("anthropic", "/v1", "/v1/messages"),
    ("anthropic", "/anthropic", "/anthropic/v1/messages"), ("mcp", "/rpc", "/rpc"),
    ("generic", "/api", "/api"),
])
def test_explain_reads_a_request_at_a_declared_operation(protocol, prefix, path):
    upstream = Upstream("x", "https", "h", 443, prefix, protocol, None)
    assert explain.default_path(upstream) == path
    assert protocols.declared(upstream, "POST", path) is not None


def _outcome(f, *args):
    try:
        return f(*args)
    except operations.PathError as e:
        return ("PathError", str(e))


TARGET_ALPHABET = ["/", "a", "Z", "0", ".", "..", "%", "%2e", "%2F", "%41", "%7e", "%3a", "~",
                   "-", "_", "?", "q=1", "#", "\\", " ", "\u00e9", "//", "%zz", "v1"]


def test_the_plain_path_shortcut_normalises_as_the_full_check(monkeypatch):
    """`normalize_target` takes plain paths as they are without its full check: for every target
    (random pieces of what makes a path ambiguous), the shortcut's answer is the full check's."""
    import random
    import re
    rng = random.Random(18)
    targets = ["/", "/v1/chat/completions", "/v1/", "/.well-known/x", "/a.b/c..d", "/a/./b",
               "/a/../b", "/a//b", "/a/", "/%41", "//"]
    targets += ["/" + "".join(rng.choice(TARGET_ALPHABET) for _ in range(rng.randint(0, 6)))
                for _ in range(3000)]
    fast = [_outcome(operations.normalize_target, t) for t in targets]
    monkeypatch.setattr(operations, "_PLAIN", re.compile(r"(?!)"))  # never plain: full check
    assert fast == [_outcome(operations.normalize_target, t) for t in targets]


@pytest.mark.parametrize("protocol", list(protocols.DECLARED))
def test_the_literal_operation_lookup_answers_as_the_scan(monkeypatch, protocol):
    upstream = Upstream("u", "https", "api.example", 443, "/", protocol, None)
    paths = ["/", "/chat/completions", "/v1/chat/completions", "/v1/messages",
             "/v1/messages/count_tokens", "/messages", "/deployments/d/chat/completions",
             "/v1/responses", "/v1/embeddings", "/v1/chat/completions/", "/v1/models", "/x/y"]
    cases = [(m, p) for m in ("GET", "POST", "DELETE", "PUT") for p in paths]
    looked_up = [protocols.declared(upstream, m, p) for m, p in cases]
    monkeypatch.setattr(protocols, "_LITERAL", {k: {} for k in protocols.DECLARED})
    assert looked_up == [protocols.declared(upstream, m, p) for m, p in cases]
    assert any(looked_up)


def test_without_a_policy_no_beta_passes(gateway):
    """`anthropic-beta` values pass only as a grant lists them: with no policy, none does."""
    gateway[1].policy = lambda: None
    f = flow_to("llm.internal", "/anthropic/v1/messages",
                **{"anthropic-beta": "mcp-client-2025-04-04", "anthropic-version": "2023-06-01"})
    run(gateway, f)
    assert f.response is not None and f.response.status_code == 403
    assert state(f).decision.reasons[0].rule == "route.header"
    beta = flow_to("api.openai.com", "/v1/chat/completions",
                   **{"openai-beta": "responses=experimental"})
    run(gateway, beta)
    assert beta.response is not None and beta.response.status_code == 403
    plain = flow_to("llm.internal", "/anthropic/v1/messages", **{"anthropic-version": "2023-06-01",
                                                                  "x-note": "n"})
    run(gateway, plain)
    assert plain.response is None and "x-note" not in plain.request.headers


@pytest.mark.parametrize(("protocol", "method", "path", "query", "ok"), [
    ("openai", "GET", "/v1/files", "limit=2&after=f&order=asc&purpose=batch", True),
    ("openai", "GET", "/openai/deployments/d/files", "api-version=2024-10-21&limit=1", True),
    ("openai", "GET", "/v1/responses/resp_1", "include[]=a&include[]=b", True),
    ("openai", "GET", "/v1/chat/completions", "metadata[k]=v&limit=1", True),
    ("openai", "GET", "/v1/realtime", "model=gpt-realtime", True),
    ("openai", "GET", "/v1/files", "li%6dit=2", True),  # read decoded, as the server reads it
    ("openai", "GET", "/v1/files", "limit=1&limit=2", False),
    ("openai", "GET", "/v1/files", "purpose=batch;x=1", False),
    ("openai", "GET", "/v1/files/file-1/content", "limit=1", False),
    ("openai", "POST", "/v1/chat/completions", "stream=true", False),
    ("openai", "POST", "/v1/files", "purpose=batch", False),  # a GET's parameter, not a POST's
    ("anthropic", "POST", "/v1/messages", "beta=true", True),
    ("anthropic", "GET", "/v1/models", "after_id=m&limit=5&beta=true", True),
    ("anthropic", "GET", "/v1/models", "after=m", False),
    ("anthropic", "POST", "/v1/messages", "beta=1", False),
])
def test_a_query_holds_what_its_operation_documents(protocol, method, path, query, ok):
    assert (forwarding.query_problem(protocol, method, path, query) is None) is ok


def test_douane_sets_the_organization_and_project_its_key_bills(tmp_path, monkeypatch):
    """A credential may name the OpenAI organization and project it acts on (a team's credential
    its own project); they are sent with it, and a client's are refused."""
    monkeypatch.setenv("T_OPENAI_KEY", "sk-upstream")
    path = tmp_path / "douane.yaml"
    path.write_text(CONFIG.replace(
        "credential: {env: T_OPENAI_KEY}}",
        "credential: {env: T_OPENAI_KEY, organization: org-acme, project: proj_all},\n"
        "          credentials: {by_group: {finance: {env: T_OPENAI_KEY, project: proj_fin}}}}",
        1) % {"dir": tmp_path})
    settings = Settings()
    route, broker, inject = Route(settings), Broker(settings), InjectCredential()
    with taddons.context(settings, route, broker, inject) as tctx:
        tctx.configure(settings, douane_config=str(path))
        sent = {}
        for groups in (("eng",), ("finance",)):
            f = flow_to("api.openai.com", "/v1/chat/completions", groups=groups)
            run((route, broker, inject), f)
            assert f.response is None
            sent[groups[0]] = (f.request.headers.get("openai-organization"),
                               f.request.headers.get("openai-project"))
        assert sent == {"eng": ("org-acme", "proj_all"), "finance": (None, "proj_fin")}
        f = flow_to("api.openai.com", "/v1/chat/completions", **{"openai-project": "proj_all"})
        run((route, broker, inject), f)
        assert f.response is not None and f.response.status_code == 403
    path.write_text(CONFIG.replace("credential: {env: T_OPENAI_KEY}}",
                                   "credential: {env: T_OPENAI_KEY, project: 'a b'}}", 1)
                    % {"dir": tmp_path})
    with pytest.raises(ConfigError, match="project"):
        config.load(path)


@pytest.mark.parametrize(("offered", "ok"), [
    ("realtime", True), ("realtime, openai-beta.realtime-v1", True),
    ("realtime, openai-organization.org-other", False), ("openai-project.proj_x", False),
    ("realtime, openai-insecure-api-key.sk-abc", False), ("chat", False)])
def test_a_realtime_subprotocol_names_no_account_or_key(offered, ok):
    """A browser's Realtime client names its key, organization and project as subprotocols."""
    headers = tutils.treq().headers
    headers.clear()
    headers.update({"sec-websocket-protocol": offered, "upgrade": "websocket"})
    refused, _ = forwarding.screen("openai", headers)
    assert (refused is None) is ok
