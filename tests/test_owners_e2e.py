"""Ids an upstream issued stay their user's on every replica and across restarts: two real mitmdump
replicas on one real PostgreSQL (`database:`), a replica replaced by a fresh one (nothing of the
old one's memory or disk), and the embedded default (SQLite under state_dir) restarted. Another
user's MCP session, conversation or stored answer is refused, the upstream receiving nothing and
the audit record saying why; with the store down, what needs it is refused with a decision id."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import UPSTREAM_KEY
from tests.hardening.conftest import assert_refused
from tests.hardening.test_mcp_side_doors import HEADERS, RealServer, call, session
from tests.support.gateway import Gateway, base_config
from tests.support.postgres import PASSWORD
from tests.support.upstream import FakeUpstream
from tests.test_shared_store_e2e import wait_for_log

GRANTS = """\
version: 1
groups:
  staff:
    upstreams:
      llm: {operations: ["POST /v1/conversations", "GET /v1/conversations/*"]}
      crm: {tools: {allow: ["echo"]}}
"""
ENV = {"DOUANE_TEST_UPSTREAM_KEY": UPSTREAM_KEY, "DOUANE_TEST_DB_PASSWORD": PASSWORD}


def config_for(issuer, llm: FakeUpstream, mcp_server: str, work, **sections) -> dict:
    (work / "grants.yaml").write_text(GRANTS)
    config = base_config(issuer.url, llm.url + "/v1",
                         policy={"files": [str(work / "grants.yaml")]}, **sections)
    config["upstreams"]["crm"] = {"url": mcp_server + "/mcp", "protocol": "mcp"}
    return config


@pytest.fixture(scope="module")
def users(issuer):
    return tuple(issuer.mint(f"{name}@corp", ["staff"]) for name in ("alice", "bob"))


def proxied(gw: Gateway, token: str) -> httpx.Client:
    return httpx.Client(proxy=gw.proxy_url("u", token), timeout=120)


def responses(gw: Gateway, llm: FakeUpstream, token: str, **doc) -> httpx.Response:
    with proxied(gw, token) as c:
        return c.post(llm.url + "/v1/responses", json={"model": "m", "input": "hi", **doc})


def only_alice_uses(gw: Gateway, mcp: RealServer, alices: dict[str, str],
                    users: tuple[str, str], n: int) -> None:
    """Bob's call on Alice's MCP session is refused, the real server sees nothing; hers passes
    (JSON-RPC ids `n` and `n + 1`)."""
    alice, bob = users
    with proxied(gw, bob) as c:
        before = len(mcp.requests)
        resp = c.post(mcp.url + "/mcp", headers=alices, json=call("echo", n, text="b"))
        record = assert_refused(gw, mcp, before, resp, 404)
        assert reason(record)["rule"] == "mcp.session_owner"
        assert reason(record)["message"] == "a session issued to another user"
    with proxied(gw, alice) as c:
        ok = c.post(mcp.url + "/mcp", headers=alices, json=call("echo", n + 1, text="hers"))
        assert ok.status_code == 200 and "hers" in ok.text, ok.text


def reason(record: dict) -> dict:
    return record["reasons"][0]


def test_bindings_hold_across_replicas_and_a_replaced_replica(issuer, postgres, mcp_server, llm,
                                                              users, tmp_path):
    alice, bob = users
    mcp = RealServer(mcp_server)
    url = postgres.new_database().replace(f":{PASSWORD}@", "@")
    config = config_for(issuer, llm, mcp_server, tmp_path, database={
        "url": url, "password": {"env": "DOUANE_TEST_DB_PASSWORD"}, "timeout": 2})
    with Gateway(config, env=ENV, workdir=tmp_path / "a") as a, \
            Gateway(config, env=ENV, workdir=tmp_path / "b") as b:
        for gw in (a, b):
            wait_for_log(gw, "store .* ready")
        # issued through A: a conversation, a stored answer, an MCP session
        with proxied(a, alice) as c:
            assert c.post(llm.url + "/v1/conversations", json={}).json()["id"] == "conv_fake"
        assert responses(a, llm, alice).json()["id"] == "resp_fake"
        with proxied(a, alice) as c:
            alices = session(c, mcp_server + "/mcp")
        # named by Bob through B: refused, nothing reaches the upstream, the record says why
        for doc, rule in (({"conversation": "conv_fake"}, "owner.conversation"),
                          ({"previous_response_id": "resp_fake"}, "owner.response")):
            before = len(llm.requests)
            record = assert_refused(b, llm, before, responses(b, llm, bob, **doc), 404)
            assert reason(record)["rule"] == rule
            assert "issued to another user" in reason(record)["message"]
        with proxied(b, bob) as c:
            before = len(llm.requests)
            record = assert_refused(b, llm, before, c.get(llm.url + "/v1/conversations/conv_fake"),
                                    404)
            assert reason(record)["rule"] == "owner.conversation"
        only_alice_uses(b, mcp, alices, users, 1)  # Alice's own, through B
        assert responses(b, llm, alice, previous_response_id="resp_fake").status_code == 200
        # an MCP session douane never saw issued is nobody's: refused, the client starts anew
        with proxied(b, alice) as c:
            before = len(mcp.requests)
            resp = c.post(mcp_server + "/mcp", headers={**HEADERS, "mcp-session-id": "forged"},
                          json=call("echo", 3, text="x"))
            record = assert_refused(b, mcp, before, resp, 404)
            assert reason(record)["message"] == "a session douane did not see issued"
        # A replaced by a fresh replica: no memory, no state_dir of the old one
        a.stop()
        with Gateway(config, env=ENV, workdir=tmp_path / "a2") as a2:
            wait_for_log(a2, "store .* ready")
            before = len(llm.requests)
            record = assert_refused(a2, llm, before,
                                    responses(a2, llm, bob, conversation="conv_fake"), 404)
            assert reason(record)["rule"] == "owner.conversation"
            only_alice_uses(a2, mcp, alices, users, 4)
            assert responses(a2, llm, alice, conversation="conv_fake").status_code == 200
            # an id from before douane: adopted by the first user it is answered for, on any
            # replica; the other's is refused on the other replica
            adopting = responses(a2, llm, alice, conversation="conv_before")
            assert adopting.status_code == 200
            record = a2.audit_record(adopting.headers["x-douane-decision-id"])
            assert any(r["rule"] == "owner.adopted" for r in record["reasons"]), record
            before = len(llm.requests)
            record = assert_refused(b, llm, before,
                                    responses(b, llm, bob, conversation="conv_before"), 404)
            assert reason(record)["rule"] == "owner.conversation"
            # the store down: an id no replica holds in memory cannot be told apart
            with postgres.outage():
                before = len(llm.requests)
                resp = responses(b, llm, bob, conversation="conv_unknown_yet")
                record = assert_refused(b, llm, before, resp, 503)
                assert resp.json()["error"]["code"] == "store_unavailable"
                assert reason(record)["rule"] == "store.unavailable"
                with proxied(a2, alice) as c:  # a new session's binding cannot be written
                    resp = c.post(mcp_server + "/mcp", headers=HEADERS, json={
                        "jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
                            "protocolVersion": "2025-11-25", "capabilities": {},
                            "clientInfo": {"name": "t", "version": "1"}}})
                    # (refused at the JSON-RPC level, as MCP clients expect; the upstream's
                    # session id never reaches the client)
                    assert "mcp-session-id" not in resp.headers
                    assert resp.json()["error"]["data"]["reason"] == "store_unavailable"
                    record = a2.audit_record(resp.headers["x-douane-decision-id"])
                    assert reason(record)["rule"] == "store.unavailable"


def test_the_embedded_store_keeps_bindings_across_a_restart(issuer, mcp_server, llm, users,
                                                            tmp_path):
    alice, bob = users
    mcp = RealServer(mcp_server)
    config = config_for(issuer, llm, mcp_server, tmp_path,
                        gateway={"state_dir": str(tmp_path / "state")})
    with Gateway(config, env=ENV, workdir=tmp_path / "first") as gw, proxied(gw, alice) as c:
        alices = session(c, mcp_server + "/mcp")
        assert responses(gw, llm, alice).json()["id"] == "resp_fake"
    with Gateway(config, env=ENV, workdir=tmp_path / "second") as gw:
        before = len(llm.requests)
        record = assert_refused(gw, llm, before,
                                responses(gw, llm, bob, previous_response_id="resp_fake"), 404)
        assert reason(record)["rule"] == "owner.response"
        only_alice_uses(gw, mcp, alices, users, 1)
        with proxied(gw, alice) as c:  # her own session among many: not looked up one by one
            many = ", ".join([alices["mcp-session-id"], *(f"s{n}" for n in range(9))])
            before = len(mcp.requests)
            resp = c.post(mcp_server + "/mcp", headers={**alices, "mcp-session-id": many},
                          json=call("echo", 3, text="x"))
            assert reason(assert_refused(gw, mcp, before, resp, 404))["message"] == \
                "the Mcp-Session-Id header names too many sessions"
        # an answer not stored (`store: false`) binds nothing: resp_fake stays Alice's
        assert responses(gw, llm, bob, store=False).json()["id"] == "resp_fake"
        assert responses(gw, llm, alice, previous_response_id="resp_fake").status_code == 200


LISTING_GRANTS = """\
version: 1
groups:
  staff:
    upstreams:
      llm:
        operations: &listings ["GET /v1/chat/completions", "GET /v1/files",
                               "GET /v1/chatkit/threads", "GET /v1/models",
                               "GET /v1/conversations/**"]
  auditors:
    upstreams:
      llm: {operations: *listings, org_listings: true}
"""


class Listings:
    """An upstream storing chat completions (`chatcmpl-N`, listed by `GET /v1/chat/completions`)
    and listing files, a vector store's files and models: every user's, as the org key sees."""

    def __init__(self) -> None:
        self.issued: list[str] = []

    def __call__(self, handler, req) -> None:
        path = handler.path.split("?")[0]
        if handler.command == "POST" and path == "/v1/chat/completions":
            self.issued.append(f"chatcmpl-{len(self.issued)}")
            handler._json(200, {"id": self.issued[-1], "object": "chat.completion",
                                "created": 0, "model": "m", "choices": [{
                                    "index": 0, "finish_reason": "stop", "message": {
                                        "role": "assistant", "content": "ok"}}]})
        elif path == "/v1/chat/completions":
            ids = self.issued
            handler._json(200, {"object": "list", "data": [
                {"id": i, "object": "chat.completion", "model": "m", "choices": []} for i in ids],
                "first_id": ids[0], "last_id": ids[-1], "has_more": False})
        else:
            handler._json(200, {"object": "list", "data": [{"id": "x-1", "object": "x"}],
                                "has_more": False})


def test_listings_show_the_callers_own_or_are_refused(issuer, tmp_path):
    llm = FakeUpstream()
    llm.answer = Listings()
    (tmp_path / "grants.yaml").write_text(LISTING_GRANTS)
    config = base_config(issuer.url, llm.url + "/v1",
                         policy={"files": [str(tmp_path / "grants.yaml")]})
    alice, bob = (issuer.mint(f"{n}@corp", ["staff"]) for n in ("alice", "bob"))
    auditor = issuer.mint("audrey@corp", ["auditors"])
    try:
        with Gateway(config, env=ENV, workdir=tmp_path / "gw") as gw:
            def get(token: str, path: str) -> httpx.Response:
                with proxied(gw, token) as c:
                    return c.get(llm.url + path)

            for token in (alice, bob, alice):
                with proxied(gw, token) as c:
                    assert c.post(llm.url + "/v1/chat/completions", json={
                        "model": "m", "store": True,
                        "messages": [{"role": "user", "content": "hi"}]}).status_code == 200
            mine = get(alice, "/v1/chat/completions?limit=20").json()
            assert [i["id"] for i in mine["data"]] == ["chatcmpl-0", "chatcmpl-2"]
            assert (mine["first_id"], mine["last_id"]) == ("chatcmpl-0", "chatcmpl-2")
            assert [i["id"] for i in get(bob, "/v1/chat/completions").json()["data"]] == \
                ["chatcmpl-1"]
            every = get(auditor, "/v1/chat/completions").json()["data"]  # org_listings
            assert [i["id"] for i in every] == ["chatcmpl-0", "chatcmpl-1", "chatcmpl-2"]
            # files are bound too (adopted when first named): a file nobody named is nobody's
            assert get(alice, "/v1/files").json()["data"] == []
            assert get(auditor, "/v1/files").json()["data"] == [{"id": "x-1", "object": "x"}]
            # a listing douane does not name (ChatKit's threads), read from its answer: withheld
            resp = get(bob, "/v1/chatkit/threads")
            assert resp.status_code == 403 and "x-1" not in resp.text
            record = gw.audit_record(resp.headers["x-douane-decision-id"])
            assert reason(record)["rule"] == "owner.listing"
            assert get(auditor, "/v1/chatkit/threads").status_code == 200
            assert get(bob, "/v1/models").status_code == 200  # the org's models: everyone's
            # a path naming ids without end is not looked up id by id
            before = len(llm.requests)
            record = assert_refused(gw, llm, before, get(bob, "/v1" + "/conversations/c" * 17),
                                    404)
            assert reason(record)["message"] == "the request names too many stored objects"
    finally:
        llm.close()
