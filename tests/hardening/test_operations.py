"""Operations: only what a protocol parses or a grant names reaches an upstream, on the path douane
routed, in origin form. Through a real gateway in reverse mode (SDK clients) and raw sockets
where the attack is in the request line; the regular-mode cases are in test_bypass.py."""

from __future__ import annotations

import base64
import socket
import ssl
import time

import h2.connection
import h2.events
import httpx
import openai
import pytest
import yaml

from douane.recording import index
from tests.conftest import UPSTREAM_KEY
from tests.hardening.conftest import DENIED, POLICY, assert_refused, with_claude
from tests.hardening.test_evasion import H2Only
from tests.support.gateway import Gateway, base_config
from tests.support.upstream import DEFAULT_REPLY, FakeUpstream

# the stored objects' operations (test_a_conversation_is_its_users_only)
STORED = ["POST /v1/conversations", "GET /v1/conversations/*", "POST /v1/conversations/*",
          "DELETE /v1/conversations/*", "GET /v1/conversations/*/items",
          "POST /v1/conversations/*/items", "GET /v1/conversations/*/items/*",
          "DELETE /v1/conversations/*/items/*", "GET /v1/responses/*", "DELETE /v1/responses/*",
          "GET /v1/responses/*/input_items", "POST /v1/responses/input_tokens",
          "GET /v1/chat/completions/*", "GET /v1/chat/completions/*/messages"]
ADMINS = {"upstreams": {"llm": {"operations": ["GET /v1/models", "GET /v1/files/*/content",
                                               *STORED]}}}
CHAT = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'


@pytest.fixture(scope="module")
def gw(issuer, llm, tmp_path_factory):
    work = tmp_path_factory.mktemp("operations")
    policy = yaml.safe_load(POLICY)
    policy.setdefault("groups", {})["admins"] = ADMINS
    (work / "policy.yaml").write_text(yaml.safe_dump(policy))
    config = base_config(issuer.url, llm.url + "/v1", policy={"files": [str(work / "policy.yaml")]},
                         recording={})
    with_claude(config, llm.url)
    with Gateway(config, mode=f"reverse:{llm.url}", env={"DOUANE_TEST_UPSTREAM_KEY": UPSTREAM_KEY},
                 workdir=work) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def admin(issuer, secrets):
    token = issuer.mint("ada@corp.example", ["admins"])
    secrets.add(token)
    return token


@pytest.fixture(scope="module")
def other_admin(issuer, secrets):
    token = issuer.mint("grace@corp.example", ["admins"])
    secrets.add(token)
    return token


def raw(gw: Gateway, request_line: bytes, token: str, body: bytes = CHAT,
        host: bytes = b"localhost") -> tuple[int, dict[str, str], bytes]:
    """One request sent as bytes (no client library tidies the target): status, headers, body."""
    data = (request_line + b"\r\nHost: " + host + b"\r\nAuthorization: Bearer " + token.encode()
            + b"\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body)
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        sock.sendall(data)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
    head, _, content = out.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (h.split(":", 1) for h in lines[1:])}
    return int(lines[0].split(" ")[1]), headers, content


def assert_raw_refused(gw, llm, before, status, headers, content, expected: int) -> dict:
    assert status == expected, content[:300]
    assert len(llm.requests) == before, "the upstream received a refused request"
    decision_id = headers["x-douane-decision-id"]
    assert decision_id.encode() in content
    record = gw.audit_record(decision_id)
    assert record["action"] == "refuse", record
    return record


UNGOVERNED = [
    ("DELETE", "/v1/models/ft:gpt-4o:acme:prod"),
    ("GET", "/v1/chat/completions?limit=100"),  # the org's stored completions
    ("GET", "/v1/files/file-abc/content"),
    ("GET", "/v1/organization/admin_api_keys"),
    ("GET", "/v1/models"),
    ("HEAD", "/v1/models"),
    ("OPTIONS", "/v1/chat/completions"),
    ("PUT", "/v1/chat/completions"),
    ("POST", "/v1/assistants"),
    ("GET", "/anthropic/v1/models"),
    ("POST", "/anthropic/v1/messages/batches"),
]


@pytest.mark.parametrize(("method", "path"), UNGOVERNED)
def test_operations_nobody_granted_are_refused_before_the_credential(gw, llm, token, method,
                                                                     path):
    before = len(llm.requests)
    resp = httpx.request(method, gw.url + path, headers={"authorization": f"Bearer {token}"})
    if method == "HEAD":  # no body to carry the decision id: the header and the record do
        assert resp.status_code == 403 and len(llm.requests) == before
        record = gw.audit_record(resp.headers["x-douane-decision-id"])
    else:
        record = assert_refused(gw, llm, before, resp, 403)
        body = resp.json()
        if path.startswith("/anthropic"):  # each API's own error shape
            assert body["type"] == "error" and body["error"]["type"] == "permission_error"
        else:
            assert body["error"]["code"] == "endpoint_not_governed"
    assert record["action"] == "refuse" and record["reasons"][0]["rule"] == "route.operation"
    assert record["interaction"]["operation"] == f"{method} {path.split('?')[0]}"
    assert record["user"] == "mallory@corp.example"


def test_the_sdk_gets_its_usual_error(gw, llm, token):
    before = len(llm.requests)
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=token, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as err:
        client.models.list()
    with pytest.raises(openai.PermissionDeniedError):
        client.files.content("file-abc")
    assert err.value.body["code"] == "endpoint_not_governed"
    assert len(llm.requests) == before


AMBIGUOUS = [
    b"/v1/../admin/keys", b"/v1/%2e%2e/admin/keys", b"/v1/%2E%2E/admin/keys",
    b"/v1/.%2e/admin/keys", b"/v1/%252e%252e/admin/keys", b"/v1/chat%2fcompletions",
    b"/v1/chat%2Fcompletions", b"/v1/chat%5ccompletions", b"/v1\\..\\admin",
    b"/v1//chat/completions", b"/v1/./chat/completions", b"/v1/chat/completions%00",
    b"/anthropic/../v2/secret", b"/anthropic/%2e%2e/v1/messages", b"/v1/chat/completions/..",
    b"/v1/%EF%BC%8E%EF%BC%8E/admin/keys",  # full-width dots, folded to ASCII by some servers
]


@pytest.mark.parametrize("target", AMBIGUOUS)
def test_ambiguous_paths_are_refused(gw, llm, token, target):
    before = len(llm.requests)
    status, headers, content = raw(gw, b"POST " + target + b" HTTP/1.1", token)
    record = assert_raw_refused(gw, llm, before, status, headers, content, 400)
    assert record["reasons"][0]["rule"] == "route.path"
    assert record["user"] == "mallory@corp.example"  # refused once the caller is known


def test_a_method_override_header_is_refused(gw, llm, token):
    before = len(llm.requests)
    resp = httpx.post(gw.url + "/v1/chat/completions", content=CHAT, headers={
        "authorization": f"Bearer {token}", "content-type": "application/json",
        "x-http-method-override": "DELETE"})
    record = assert_refused(gw, llm, before, resp, 400)
    assert record["reasons"][0]["rule"] == "route.method_override"


def test_unreserved_escapes_reach_the_upstream_decoded(gw, llm, token):
    before = len(llm.requests)
    status, headers, _ = raw(gw, b"POST /v1/chat/%63ompletions HTTP/1.1", token)
    assert status == 200 and len(llm.requests) == before + 1
    assert llm.requests[-1].path == "/v1/chat/completions"
    assert gw.audit_record(headers["x-douane-decision-id"])["path"] == "/v1/chat/completions"


@pytest.mark.parametrize("authority", [b"127.0.0.1:{port}", b"evil.example", b"localhost:1"])
def test_absolute_form_reaches_the_upstream_in_origin_form(gw, llm, token, authority):
    authority = authority.replace(b"{port}", str(llm.port).encode())
    before = len(llm.requests)
    status, headers, _ = raw(gw, b"POST http://" + authority + b"/v1/chat/completions HTTP/1.1",
                             token, host=b"evil.example")
    assert status == 200 and len(llm.requests) == before + 1
    seen = llm.requests[-1]
    assert seen.path == "/v1/chat/completions"  # what the audit records, in origin form
    assert seen.headers["host"] == f"127.0.0.1:{llm.port}"
    record = gw.audit_record(headers["x-douane-decision-id"])
    assert (record["host"], record["path"]) == ("127.0.0.1", "/v1/chat/completions")


def test_absolute_form_is_checked_like_any_path(gw, llm, token):
    before = len(llm.requests)
    status, headers, content = raw(
        gw, f"GET http://127.0.0.1:{llm.port}/v1/organization/admin_api_keys HTTP/1.1".encode(),
        token, body=b"")
    assert_raw_refused(gw, llm, before, status, headers, content, 403)


def test_a_granted_operation_passes_with_identity_audit_and_inspection(gw, llm, admin):
    before = len(llm.requests)
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=admin, max_retries=0)
    page = client.models.with_raw_response.list()
    assert [m.id for m in page.parse().data] == ["fake-model"]
    assert len(llm.requests) == before + 1
    seen = llm.requests[-1]
    assert (seen.method, seen.path) == ("GET", "/v1/models")
    assert seen.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"  # the org key, not the JWT
    record = gw.audit_record(page.headers["x-douane-decision-id"])
    assert record["action"] == "allow" and record["user"] == "ada@corp.example"
    assert record["interaction"] == {"protocol": "openai", "operation": "GET /v1/models",
                                     "granted_operation": True,
                                     "inspected": ["request", "response"]}
    assert any(r["rule"] == "grant.operation" and "group admins" in r["message"]
               for r in record["reasons"])
    deadline = time.monotonic() + 20  # and recorded, under the admin's name, like any flow
    while time.monotonic() < deadline:
        flows = [f for p in (gw.state_dir / "recordings").rglob("*.mitm")
                 for _, f in index.read_flows(p)]
        recorded = [f for f in flows if f.metadata.get("douane", {}).get("decision_id")
                    == record["decision_id"]]
        if recorded:
            break
        time.sleep(0.2)
    assert recorded and recorded[0].metadata["user"] == "ada@corp.example"
    assert recorded[0].request.path == "/v1/models"
    assert UPSTREAM_KEY not in recorded[0].request.headers.get("authorization", "")


def test_a_granted_operations_answer_is_policed(gw, llm, admin):
    llm.reply = f"the {DENIED} team"
    try:
        resp = httpx.get(gw.url + "/v1/models", headers={"authorization": f"Bearer {admin}"})
    finally:
        llm.reply = DEFAULT_REPLY
    assert resp.status_code == 403 and DENIED not in resp.text
    record = gw.audit_record(resp.headers["x-douane-decision-id"])
    assert record["action"] == "block"
    assert any(r["rule"] == "deny.codename" for r in record["reasons"])


def test_a_granted_operations_request_body_is_inspected(gw, llm, admin):
    before = len(llm.requests)
    resp = httpx.request("GET", gw.url + "/v1/models", json={"note": [DENIED]},
                         headers={"authorization": f"Bearer {admin}"})
    assert_refused(gw, llm, before, resp, 403)


def test_a_grant_names_no_more_than_it_says(gw, llm, admin):
    for method, path in [("DELETE", "/v1/models/ft:x"), ("GET", "/v1/files/f/content/x"),
                         ("GET", "/v1/models/x"), ("GET", "/anthropic/v1/models")]:
        before = len(llm.requests)
        resp = httpx.request(method, gw.url + path, headers={"authorization": f"Bearer {admin}"})
        assert_refused(gw, llm, before, resp, 403)


def test_a_granted_download_is_delivered_and_audited_as_uninspected(gw, llm, admin):
    llm.canned["/v1/files/file-abc/content"] = ("application/octet-stream", b"\x00raw bytes")
    try:
        before = len(llm.requests)
        resp = httpx.get(gw.url + "/v1/files/file-abc/content",
                         headers={"authorization": f"Bearer {admin}"})
    finally:
        del llm.canned["/v1/files/file-abc/content"]
    assert resp.status_code == 200 and resp.content == b"\x00raw bytes"
    assert len(llm.requests) == before + 1
    record = gw.audit_record(resp.headers["x-douane-decision-id"])
    assert record["action"] == "allow"
    assert record["interaction"]["inspected"] == ["request"]  # the answer was not read: said so


def test_a_granted_operation_with_a_body_douane_cannot_read_is_refused(gw, llm, admin):
    before = len(llm.requests)
    resp = httpx.request("GET", gw.url + "/v1/models", content=b"note=project+nightingale",
                         headers={"authorization": f"Bearer {admin}",
                                  "content-type": "application/x-www-form-urlencoded"})
    assert_refused(gw, llm, before, resp, 415)


@pytest.fixture(scope="module")
def tls_llm():
    upstream = FakeUpstream(tls=True)
    yield upstream
    upstream.close()


def test_over_http2_in_a_tunnel_the_same_rules_hold(issuer, tls_llm, token, tmp_path_factory):
    work = tmp_path_factory.mktemp("operations-h2")
    config = base_config(issuer.url, tls_llm.url + "/v1")
    with Gateway(config, mode="regular", env={"DOUANE_TEST_UPSTREAM_KEY": UPSTREAM_KEY},
                 args=["--set", "ssl_insecure=true", "--set", "connection_strategy=lazy"],
                 workdir=work / "gw") as gw:
        verify = H2Only(ssl.PROTOCOL_TLS_CLIENT)
        verify.load_verify_locations(cafile=gw.ca_file)
        with httpx.Client(http2=True, proxy=gw.proxy_url("m", token), verify=verify) as client:
            ok = client.post(tls_llm.url + "/v1/chat/%63ompletions", content=CHAT,
                             headers={"content-type": "application/json"})
            assert ok.http_version == "HTTP/2" and ok.status_code == 200, ok.text
            seen = tls_llm.requests[-1]
            assert seen.path == "/v1/chat/completions"
            assert seen.headers["host"] == f"127.0.0.1:{tls_llm.port}"
            before = len(tls_llm.requests)
            for method, path, status in [("GET", "/v1/organization/admin_api_keys", 403),
                                         ("DELETE", "/v1/models/ft:x", 403),
                                         ("POST", "/v1/%2e%2e/admin/keys", 400)]:
                resp = client.request(method, tls_llm.url + path, content=CHAT,
                                      headers={"content-type": "application/json"})
                assert resp.http_version == "HTTP/2"
                assert_refused(gw, tls_llm, before, resp, status)
            status, headers = h2_with_trailers(gw, token, tls_llm.port)
            assert status == 400 and headers["x-douane-decision-id"]
            assert len(tls_llm.requests) == before  # the trailers went nowhere
            record = gw.audit_record(headers["x-douane-decision-id"])
            assert record["action"] == "refuse" and record["status"] == 400


def h2_with_trailers(gw: Gateway, token: str, port: int) -> tuple[int, dict[str, str]]:
    """A chat request over HTTP/2 through the proxy whose trailer fields carry a credential-like
    header (no client library sends trailers): the status and headers of the answer."""
    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    auth = base64.b64encode(f"m:{token}".encode())
    sock.sendall(b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                 b"Proxy-Authorization: Basic %s\r\n\r\n" % (port, port, auth))
    assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    context = ssl.create_default_context(cafile=gw.ca_file)
    context.set_alpn_protocols(["h2"])
    with context.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
        conn = h2.connection.H2Connection()
        conn.initiate_connection()
        conn.send_headers(1, [(":method", "POST"), (":scheme", "https"),
                              (":authority", f"127.0.0.1:{port}"),
                              (":path", "/v1/chat/completions"),
                              ("content-type", "application/json")])
        conn.send_data(1, CHAT)
        conn.send_headers(1, [("x-api-key", "sk-trailer-0000"), ("x-note", DENIED)],
                          end_stream=True)
        tls.sendall(conn.data_to_send())
        while True:
            data = tls.recv(65536)
            assert data, "the gateway closed the connection without an answer"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    headers = {k.decode(): v.decode() for k, v in event.headers}
                    return int(headers.pop(":status")), headers
            tls.sendall(conn.data_to_send())


def test_the_client_chooses_no_organization_or_project_for_the_orgs_key(gw, llm, token):
    """`OpenAI-Organization` / `OpenAI-Project` pick what a key acts on (a user key reaches every
    organization and project its owner may): they went upstream beside the org's key. Stripped
    first, refused now (`douane.forwarding`; more in test_provider_headers.py)."""
    for name, value in (("openai-organization", "org-someone-else"),
                        ("OpenAI-Project", "proj_finance")):
        before = len(llm.requests)
        resp = httpx.post(gw.url + "/v1/chat/completions", content=CHAT, headers={
            "authorization": f"Bearer {token}", "content-type": "application/json", name: value})
        record = assert_refused(gw, llm, before, resp, 403)
        assert record["reasons"][0]["rule"] == "route.header", record


def test_a_stored_answer_is_continued_by_its_user_only(gw, llm, token, admin):
    """Responses are stored upstream under ids of the organisation's: with the one org key, a
    user holding another's `previous_response_id` continued that conversation (the model reads
    all of it). Refused now as the API refuses an id it does not know; the owner continues it."""
    def responses(who: str, stream: bool = False, **doc) -> httpx.Response:
        return httpx.post(gw.url + "/v1/responses", timeout=60, json={
            "model": "m", "input": "hi", "stream": stream, **doc},
            headers={"authorization": f"Bearer {who}"})

    for stream in (False, True):
        first = responses(token, stream)  # the fake upstream answers every one as `resp_fake`
        assert first.status_code == 200 and "resp_fake" in first.text, first.text
        before = len(llm.requests)
        resp = responses(admin, stream, previous_response_id="resp_fake")
        record = assert_refused(gw, llm, before, resp, 404)
        assert record["reasons"][0]["rule"] == "owner.response"
        ok = responses(token, stream, previous_response_id="resp_fake")
        assert ok.status_code == 200, ok.text
    # an id douane never saw issued (from before douane) goes to the first user it is answered
    # for, and is theirs from then on
    assert responses(admin, previous_response_id="resp_elsewhere").status_code == 200
    before = len(llm.requests)
    record = assert_refused(gw, llm, before,
                            responses(token, previous_response_id="resp_elsewhere"), 404)
    assert record["reasons"][0]["rule"] == "owner.response"
    assert responses(admin, previous_response_id="resp_elsewhere").status_code == 200


def test_a_conversation_is_its_users_only(gw, llm, admin, other_admin, token):
    """Conversations, stored answers and stored chat completions are kept upstream under ids of
    the organisation's: with the one org key, another user holding an id read, continued,
    changed or deleted them. Each is now unknown (404, as the API answers an id it does not know)
    to all but the user it was issued to; an id douane did not see issued (from before douane)
    is adopted by the first user the upstream answers it for."""
    ada, grace, mallory = (openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)
                           for key in (admin, other_admin, token))
    assert ada.conversations.create().id == "conv_fake"
    assert ada.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                       store=True).id == "chatcmpl-fake"
    uses = {  # each way to name one, and the rule refusing it to another user
        "owner.conversation": [
            lambda c, i: c.responses.create(model="m", input="hi", conversation=i),
            lambda c, i: c.responses.create(model="m", input="hi", conversation={"id": i}),
            lambda c, i: list(c.responses.create(model="m", input="hi", conversation=i,
                                                 stream=True)),
            lambda c, i: c.conversations.retrieve(i),
            lambda c, i: c.conversations.update(i, metadata={"k": "v"}),
            lambda c, i: c.conversations.items.list(i),
            lambda c, i: c.conversations.items.create(i, items=[
                {"type": "message", "role": "user", "content": "hi"}]),
            lambda c, i: c.conversations.items.retrieve("msg_1", conversation_id=i),
            lambda c, i: c.conversations.items.delete("msg_1", conversation_id=i),
            lambda c, i: c.conversations.delete(i)],
        "owner.response": [
            lambda c, i: c.responses.retrieve(i),
            lambda c, i: c.responses.input_items.list(i),
            lambda c, i: c.responses.delete(i)],
        "owner.chat_completion": [
            lambda c, i: c.chat.completions.retrieve(i),
            lambda c, i: c.chat.completions.messages.list(i)]}
    ids = {"owner.conversation": ("conv_fake", "conv_elsewhere"),  # (issued, not seen issued)
           "owner.response": ("resp_fake", "resp_elsewhere"),
           "owner.chat_completion": ("chatcmpl-fake", "chatcmpl-elsewhere")}
    for rule, calls in uses.items():
        issued, unseen = ids[rule]
        for use in calls:
            before = len(llm.requests)
            with pytest.raises(openai.NotFoundError) as err:
                use(grace, issued)
            record = assert_refused(gw, llm, before, err.value.response, 404)
            assert any(r["rule"] == rule for r in record["reasons"]), record
            use(ada, issued)  # the user it was issued to keeps it
            # not seen issued: passes, adopted by ada (ada: the fake upstream issues every answer
            # as resp_fake, which would become grace's)
            use(ada, unseen)
        before = len(llm.requests)
        with pytest.raises(openai.NotFoundError) as err:  # adopted: ada's from then on
            calls[0](grace, unseen)
        record = assert_refused(gw, llm, before, err.value.response, 404)
        assert any(r["rule"] == rule for r in record["reasons"]), record
    with pytest.raises(openai.NotFoundError):  # without the Conversations API's grant too
        mallory.responses.create(model="m", input="hi", conversation="conv_fake")
    # a named endpoint under the same path is no id; a granted operation's body names them too
    for field, value, rule in (("conversation", "conv_fake", "owner.conversation"),
                               ("previous_response_id", "resp_fake", "owner.response")):
        body = {"model": "m", "input": "hi", field: value}
        before = len(llm.requests)
        resp = httpx.post(gw.url + "/v1/responses/input_tokens", json=body,
                          headers={"authorization": f"Bearer {other_admin}"})
        record = assert_refused(gw, llm, before, resp, 404)
        assert any(r["rule"] == rule for r in record["reasons"]), record
        assert httpx.post(gw.url + "/v1/responses/input_tokens", json=body,
                          headers={"authorization": f"Bearer {admin}"}).status_code == 200


def test_an_upgrade_answered_as_a_plain_get_is_not_delivered(issuer, tmp_path):
    """On an upstream allowing WebSockets an upgrade passes on any path (its messages are
    policed): an upstream ignoring `Upgrade` answered it as the GET nobody granted, with the org's
    key (another user's conversation, an admin listing). Only a 101 or an error is delivered."""
    llm = FakeUpstream()
    config = base_config(issuer.url, llm.url + "/v1")
    config["upstreams"]["llm"]["allow_websocket"] = True
    token = issuer.mint("bob@corp.example", ["engineering"])
    upgrade = {"authorization": f"Bearer {token}", "upgrade": "websocket",
               "connection": "Upgrade", "sec-websocket-version": "13",
               "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ=="}
    try:
        with Gateway(config, mode=f"reverse:{llm.url}", workdir=tmp_path,
                     env={"DOUANE_TEST_UPSTREAM_KEY": UPSTREAM_KEY}) as gateway:
            resp = httpx.get(gateway.url + "/v1/conversations/conv_alice", headers=upgrade)
            assert resp.status_code == 502 and "conv_alice" not in resp.text, resp.text
            record = gateway.audit_record(resp.headers["x-douane-decision-id"])
            assert record["action"] == "refuse"
            assert record["reasons"][-1]["rule"] == "protocol.websocket_not_upgraded"
            resp = httpx.get(gateway.url + "/v1/no/such/route", headers=upgrade)
            assert resp.status_code == 404  # the upstream's error is its own
    finally:
        llm.close()
