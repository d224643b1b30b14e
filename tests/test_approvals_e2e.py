"""Human approval through a real mitmdump: held requests wait for an approver on the admin API
(or the CLI) without delaying anyone else; deny, timeout and disconnect refuse or close them; MCP
calls are answered at once and pass on retry once granted; grants expire and survive a restart."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import math
import re
import socket
import statistics
import subprocess
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import httpx2
import openai
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.types import ElicitResult

from tests.conftest import UPSTREAM_KEY
from tests.support.gateway import MITMDUMP, Gateway, base_config
from tests.support.upstream import DEFAULT_REPLY, FakeUpstream

DOUANE = MITMDUMP.parent / "douane"
GRANTS = """\
version: 1
groups:
  engineering:
    upstreams:
      llm: {models: ["gpt-*"], max_tokens: 1000}
      quick: {models: ["gpt-*"], max_tokens: 1000}
      crm: {tools: {allow: ["echo", "delete_records"]}}
rules:
  - {id: hold.kestrel, literal: "kestrel", score: 60}
tool_risk:
  - {tools: ["delete_*"], score: 50}
thresholds: {hold: 50, block: 80}
"""
HELD = "What is the status of project kestrel?"


class Receiver:
    """A local webhook receiver: records each JSON POST."""

    def __init__(self) -> None:
        self.posts: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                receiver.posts.append(json.loads(body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def gateway_config(issuer, llm: FakeUpstream, mcp_url: str, work, hook: str) -> dict[str, Any]:
    (work / "grants.yaml").write_text(GRANTS)
    config = base_config(issuer.url, llm.url + "/v1", policy={"files": [str(work / "grants.yaml")]},
                         approvals={"listen": "127.0.0.1:0", "approver_groups": ["approvers"],
                                    "upstreams": {"quick": {"timeout": "2s"}},
                                    "webhook": {"url": hook, "retries": 1}})
    # the same fake upstream under a longer path prefix: an upstream with a 2 s hold
    config["upstreams"]["quick"] = {"url": llm.url + "/v1/quick", "protocol": "openai",
                                    "credential": {"env": "DOUANE_TEST_UPSTREAM_KEY"}}
    config["upstreams"]["crm"] = {"url": mcp_url + "/mcp", "protocol": "mcp"}
    config["gateway"] = {"state_dir": str(work / "state")}
    return config


def api_url(gw: Gateway) -> str:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        m = re.search(r"approvals API serving on (http://\S+)", gw.log_text())
        if m:
            return m.group(1)
        time.sleep(0.05)
    raise AssertionError("the approvals API did not start:\n" + gw.log_text())


@pytest.fixture(scope="module")
def setup(issuer, mcp_server, tmp_path_factory):
    llm, hook = FakeUpstream(), Receiver()
    work = tmp_path_factory.mktemp("approvals")
    with Gateway(gateway_config(issuer, llm, mcp_server, work, hook.url),
                 env={"DOUANE_TEST_UPSTREAM_KEY": UPSTREAM_KEY}, workdir=work / "gw") as gw:
        yield gw, llm, hook, api_url(gw)
    llm.close()
    hook.close()


def call(api: str, token: str | None, method: str, path: str,
         body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(api + path, json.dumps(body).encode() if body else None,
                                     method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def client(gw: Gateway, llm: FakeUpstream, token: str, path: str = "/v1") -> openai.OpenAI:
    return openai.OpenAI(base_url=llm.url + path, api_key="unused", max_retries=0, timeout=60,
                         http_client=openai.DefaultHttpxClient(proxy=gw.proxy_url("u", token)))


def ask(c: openai.OpenAI, text: str) -> str:
    reply = c.chat.completions.create(model="gpt-4o-mini", max_tokens=50,
                                      messages=[{"role": "user", "content": text}])
    return reply.choices[0].message.content


class Background:
    """Runs `fn` on a thread; `.result()` re-raises what it raised."""

    def __init__(self, fn) -> None:
        self.future: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            try:
                self.future.set_result(fn())
            except BaseException as e:
                self.future.set_exception(e)
        threading.Thread(target=run, daemon=True).start()

    def result(self, timeout: float = 30) -> Any:
        return self.future.result(timeout)


def pending_for(api: str, token: str, user: str, subject: str | None = None,
                timeout: float = 15, besides: tuple[str, ...] = ()) -> dict[str, Any]:
    """The open approval request of `user` (waiting until it appears)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, doc = call(api, token, "GET", "/approvals")
        found = [a for a in doc["approvals"] if a["user"] == user and a["id"] not in besides
                 and (subject is None or a["subject"] == subject)]
        if found:
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"no approval request for {user}")


def events(gw: Gateway, approval_id: str, wait_for: str, timeout: float = 10) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        found = [r["event"] for r in gw.audit_records() if r.get("approval_id") == approval_id]
        if wait_for in found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def latencies(clients: list[openai.OpenAI]) -> list[float]:
    def timed(c: openai.OpenAI) -> float:
        start = time.perf_counter()
        assert ask(c, "hello") == DEFAULT_REPLY
        return (time.perf_counter() - start) * 1000
    with concurrent.futures.ThreadPoolExecutor(len(clients)) as pool:
        return list(pool.map(timed, clients))


def figures(ms: list[float]) -> str:
    ms = sorted(ms)
    return (f"p50 {statistics.median(ms):.1f} ms, p95 {ms[int(len(ms) * 0.95) - 1]:.1f} ms, "
            f"max {ms[-1]:.1f} ms")


def test_a_held_request_waits_for_approval_without_delaying_20_others(setup, issuer):
    gw, llm, hook, api = setup
    bob = issuer.mint("bob@corp", ["approvers"])
    others = [client(gw, llm, issuer.mint(f"user{i}@corp", ["engineering"])) for i in range(20)]
    latencies(others)  # warm the connections
    baseline = latencies(others)
    before = len(llm.requests)
    held = Background(lambda: ask(client(gw, llm, issuer.mint("alice@corp", ["engineering"])),
                                  HELD))
    pending = pending_for(api, bob, "alice@corp")
    during = latencies(others)
    print(f"\n20 concurrent allowed requests: baseline {figures(baseline)}; "
          f"while one is held {figures(during)}")
    assert not held.future.done() and max(during) < 10_000
    assert len(llm.requests) == before + 20  # the held one has not gone upstream

    assert pending["upstream"] == "llm" and pending["model"] == "gpt-4o-mini"
    assert pending["mode"] == "hold" and pending["risk"] == 60
    assert pending["reasons"][0]["rule"] == "hold.kestrel"
    assert pending["preview"][-1]["text"] == HELD
    status, doc = call(api, bob, "POST", f"/approvals/{pending['id']}/approve",
                       {"reason": "status questions are fine"})
    assert status == 200 and doc["status"] == "approved" and doc["approver"] == "bob@corp"
    assert held.result() == DEFAULT_REPLY
    assert llm.requests[-1].json()["messages"][0]["content"] == HELD  # unchanged

    events(gw, pending["id"], "approval.notified")  # both written off the loop, either first
    steps = events(gw, pending["id"], "approval.approved")
    assert steps[0] == "approval.requested" and {"approval.notified", "approval.approved"} \
        <= set(steps)
    (record,) = gw.audit_where(lambda r: r.get("decision_id") == pending["decision_id"]
                               and r["event"] == "decision")
    assert record["action"] == "allow" and record["status"] == 200
    assert "approved by bob@corp" in record["reasons"][-1]["message"]
    post = next(p for p in hook.posts if p["approval_id"] == pending["id"])
    assert "alice@corp" in post["text"] and f"douane approvals approve {pending['id']}" \
        in post["text"] and post["url"] == f"{api}/approvals/{pending['id']}"


def test_denied_with_the_approvers_reason(setup, issuer):
    gw, llm, _, api = setup
    bob = issuer.mint("bob@corp", ["approvers"])
    before = len(llm.requests)
    held = Background(lambda: ask(client(gw, llm, issuer.mint("dave@corp", ["engineering"])),
                                  HELD))
    pending = pending_for(api, bob, "dave@corp")
    status, _ = call(api, bob, "POST", f"/approvals/{pending['id']}/deny", {})
    assert status == 400  # a denial needs a reason
    status, _ = call(api, bob, "POST", f"/approvals/{pending['id']}/deny",
                     {"reason": "kestrel is need-to-know"})
    assert status == 200
    with pytest.raises(openai.PermissionDeniedError) as err:
        held.result()
    message = str(err.value)
    assert "denied by bob@corp: kestrel is need-to-know" in message
    assert f"douane decision {pending['decision_id']}" in message
    assert len(llm.requests) == before
    status, doc = call(api, bob, "POST", f"/approvals/{pending['id']}/approve", {})
    assert status == 409 and "already denied" in doc["error"]
    assert "approval.denied" in events(gw, pending["id"], "approval.denied")


def test_timeout_refuses_with_timed_out(setup, issuer):
    gw, llm, _, api = setup
    before = len(llm.requests)
    c = client(gw, llm, issuer.mint("erin@corp", ["engineering"]), "/v1/quick")
    start = time.monotonic()
    with pytest.raises(openai.PermissionDeniedError) as err:
        ask(c, HELD)
    assert 1.5 < time.monotonic() - start < 15
    assert "timed out" in str(err.value) and "douane decision dcn_" in str(err.value)
    assert len(llm.requests) == before
    approval_id = err.value.response.headers["x-douane-approval-id"]
    assert "approval.timed_out" in events(gw, approval_id, "approval.timed_out")


def test_client_disconnect_abandons_the_request(setup, issuer):
    gw, llm, _, api = setup
    bob = issuer.mint("bob@corp", ["approvers"])
    before = len(llm.requests)
    proxy = gw.proxy_url("u", issuer.mint("fred@corp", ["engineering"]))
    with httpx.Client(proxy=proxy, timeout=1.0) as h, pytest.raises(httpx.ReadTimeout):
        h.post(llm.url + "/v1/chat/completions", json={
            "model": "gpt-4o-mini", "max_tokens": 10,
            "messages": [{"role": "user", "content": HELD}]})
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        abandoned = [r for r in gw.audit_records() if r["event"] == "approval.abandoned"
                     and r["user"] == "fred@corp"]
        if abandoned:
            break
        time.sleep(0.1)
    assert abandoned, "no approval.abandoned record"
    assert not [a for a in call(api, bob, "GET", "/approvals")[1]["approvals"]
                if a["user"] == "fred@corp"]
    assert len(llm.requests) == before


def test_self_approval_and_non_approvers_are_refused(setup, issuer):
    gw, llm, _, api = setup
    alice = issuer.mint("alice2@corp", ["engineering", "approvers"])
    carol = issuer.mint("carol@corp", ["engineering"])
    bob = issuer.mint("bob@corp", ["approvers"])
    held = Background(lambda: ask(client(gw, llm, alice), HELD))
    pending = pending_for(api, bob, "alice2@corp")
    path = f"/approvals/{pending['id']}/approve"
    status, doc = call(api, alice, "POST", path, {})
    assert status == 403 and "their own request" in doc["error"]
    status, doc = call(api, carol, "POST", path, {})
    assert status == 403 and "not an approver" in doc["error"]
    assert call(api, carol, "GET", "/approvals")[0] == 403
    assert call(api, None, "GET", "/approvals")[0] == 401
    assert call(api, "not-a-token", "POST", path, {})[0] == 401
    forged = issuer.mint("bob@corp", ["approvers"], aud="someone-else")
    assert call(api, forged, "POST", path, {})[0] == 401
    assert not held.future.done()
    refused = gw.audit_where(lambda r: r["event"] == "approval.refused", count=2)
    assert {"self-approval", "not in an approver group"} <= {r["reason"] for r in refused}
    call(api, bob, "POST", f"/approvals/{pending['id']}/deny", {"reason": "cleanup"})
    with pytest.raises(openai.PermissionDeniedError):
        held.result()


def test_approval_through_the_cli(setup, issuer):
    gw, llm, _, api = setup
    bob = issuer.mint("bob@corp", ["approvers"])
    held = Background(lambda: ask(client(gw, llm, issuer.mint("gina@corp", ["engineering"])),
                                  HELD))
    pending = pending_for(api, bob, "gina@corp")

    def douane(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(DOUANE), "approvals", "--url", api, "--token", bob, *args],
                              capture_output=True, text=True, timeout=30)

    listed = douane("list")
    assert listed.returncode == 0 and pending["id"] in listed.stdout and "gina@corp" in listed.stdout
    shown = douane("show", pending["id"])
    assert "hold.kestrel" in shown.stdout and HELD in shown.stdout
    approved = douane("approve", pending["id"], "--reason", "ok by me")
    assert approved.returncode == 0 and f"{pending['id']} approved" in approved.stdout
    assert held.result() == DEFAULT_REPLY
    again = douane("deny", pending["id"], "--reason", "too late")
    assert again.returncode != 0 and "409 approval" in again.stderr and "already approved" \
        in again.stderr


async def call_tool(gw: Gateway, mcp_url: str, token: str, tool: str, args: dict) -> Any:
    http_client = httpx2.AsyncClient(proxy=gw.proxy_url("u", token))
    async with Client(streamable_http_client(mcp_url + "/mcp", http_client=http_client)) as c:
        return await c.call_tool(tool, args)


def refused_approval(result) -> str:
    assert result.is_error, result
    text = result.content[0].text
    m = re.search(r"approval (apr_[0-9a-f]{16}) is pending; retry after it is approved", text)
    assert m, text
    return m.group(1)


def test_mcp_answers_at_once_and_a_time_boxed_grant_lets_retries_pass_until_it_expires(
        setup, issuer, mcp_server):
    gw, _, hook, api = setup
    bob, hal = issuer.mint("bob@corp", ["approvers"]), issuer.mint("hal@corp", ["engineering"])
    args = {"table": "sessions", "where": "age > 30"}

    def delete(arguments=args):
        return asyncio.run(call_tool(gw, mcp_server, hal, "delete_records", arguments))

    start = time.monotonic()
    approval_id = refused_approval(delete())
    one_call = time.monotonic() - start
    assert one_call < 10  # answered at once, not held
    assert refused_approval(delete()) == approval_id  # a retry before approval: same request
    shown = call(api, bob, "GET", f"/approvals/{approval_id}")[1]
    assert shown["mode"] == "answer" and shown["subject"] == "delete_records"
    assert {p["text"] for p in shown["preview"]} == {"sessions", "age > 30"}
    # a grant two calls fit in with room, as long as a call takes on this host (a fixed 3 s did
    # not hold two MCP sessions at load ~12): 3 s on an idle machine
    grant = max(3, math.ceil(4 * one_call))
    status, doc = call(api, bob, "POST", f"/approvals/{approval_id}/approve",
                       {"for": f"{grant}s", "reason": "cleanup window"})
    assert status == 200 and doc["grant_seconds"] == grant
    granted_at = time.monotonic()
    assert delete().content[0].text == "deleted from sessions where age > 30"
    # a time-boxed grant covers the tool, whatever the arguments
    assert delete({"table": "cache", "where": "1=1"}).content[0].text.startswith("deleted")
    assert time.monotonic() - granted_at < grant, f"two calls outlasted a {grant} s grant"
    time.sleep(max(0.0, grant + 0.2 - (time.monotonic() - granted_at)))
    assert refused_approval(delete()) != approval_id  # expired: a new approval request
    used = gw.audit_where(lambda r: r["event"] == "approval.grant_used"
                          and r["approval_id"] == approval_id, count=2)
    assert len(used) == 2
    assert any(p["approval_id"] == approval_id for p in hook.posts)


def test_answer_mode_approval_for_this_request_only_passes_the_identical_retry_once(
        setup, issuer, mcp_server):
    gw, _, _, api = setup
    bob, ida = issuer.mint("bob@corp", ["approvers"]), issuer.mint("ida@corp", ["engineering"])
    args = {"table": "sessions", "where": "id = 7"}

    def delete(arguments=args):
        return asyncio.run(call_tool(gw, mcp_server, ida, "delete_records", arguments))

    approval_id = refused_approval(delete())
    assert call(api, bob, "POST", f"/approvals/{approval_id}/approve", {})[0] == 200
    refused_approval(delete({"table": "sessions", "where": "1=1"}))  # not what was approved
    assert delete().content[0].text == "deleted from sessions where id = 7"
    assert refused_approval(delete()) != approval_id  # used up


def test_answer_mode_retries_of_a_denied_request_get_the_denial_and_its_reason(
        setup, issuer, mcp_server):
    gw, _, _, api = setup
    bob, una = issuer.mint("bob@corp", ["approvers"]), issuer.mint("una@corp", ["engineering"])
    args = {"table": "customers", "where": "1=1"}

    def delete(token=una, arguments=args):
        return asyncio.run(call_tool(gw, mcp_server, token, "delete_records", arguments))

    approval_id = refused_approval(delete())
    assert call(api, bob, "POST", f"/approvals/{approval_id}/deny",
                {"reason": "not the customers table"})[0] == 200
    for _ in range(2):  # the agent can tell denied from pending, every time it retries
        retried = delete()
        assert retried.is_error, retried
        text = retried.content[0].text
        assert f"approval {approval_id}: denied by bob@corp: not the customers table" in text
        assert "the denial stands until" in text and "pending" not in text
    records = gw.audit_where(lambda r: r.get("user") == "una@corp"
                             and any(x["rule"] == "approval.denied" for x in r.get("reasons", [])),
                             count=2)
    assert all(r["action"] == "block" for r in records)
    # another request, or the same one by someone else, is a new approval request
    assert refused_approval(delete(arguments={"table": "sessions", "where": "1=1"})) != approval_id
    other = issuer.mint("vic@corp", ["engineering"])
    assert refused_approval(delete(token=other)) != approval_id


def test_a_client_taking_url_elicitations_is_shown_the_approval_and_retries_once_approved(
        setup, issuer, mcp_server):
    gw, _, _, api = setup
    bob, kim = issuer.mint("bob@corp", ["approvers"]), issuer.mint("kim@corp", ["engineering"])
    args = {"table": "orders", "where": "id = 3"}
    asked: list[Any] = []

    async def elicit(context, params):
        asked.append(params)
        # the status page: no token, the link is the capability; no request content on it
        status = await asyncio.to_thread(call, "", None, "GET", params.url)
        assert status[0] == 200 and "orders" not in json.dumps(status[1]), status
        if len(asked) == 1:
            assert status[1]["status"] == "pending" and status[1]["subject"] == "delete_records"
            assert await asyncio.to_thread(call, api, bob, "POST",
                                           f"/approvals/{status[1]['id']}/approve", {})
        return ElicitResult(action="accept" if len(asked) < 3 else "decline")

    async def run(arguments):
        http_client = httpx2.AsyncClient(proxy=gw.proxy_url("u", kim))
        async with Client(streamable_http_client(mcp_server + "/mcp", http_client=http_client),
                          elicitation_callback=elicit) as c:
            return await c.call_tool("delete_records", arguments)

    result = asyncio.run(run(args))
    assert result.content[0].text == "deleted from orders where id = 3"
    assert len(asked) == 1 and asked[0].mode == "url" and "is pending" in asked[0].message
    bodies = httpx.get(mcp_server + "/_received").json()["bodies"]
    assert any("orders" in b for b in bodies)
    assert not any("douane_approval" in b for b in bodies)  # douane's own answer stayed here
    # another request: shown the link again, and declining it gets the usual refusal
    refused = asyncio.run(run({"table": "orders", "where": "1=1"}))
    assert len(asked) == 3 and refused_approval(refused)
    assert call(api, bob, "GET", "/status/apr_0000000000000000/" + "0" * 32)[0] == 404


def test_grants_survive_a_restart_and_pending_requests_are_denied_at_shutdown(
        issuer, mcp_server, tmp_path):
    llm, hook = FakeUpstream(), Receiver()
    config = gateway_config(issuer, llm, mcp_server, tmp_path, hook.url)
    env = {"DOUANE_TEST_UPSTREAM_KEY": UPSTREAM_KEY}
    bob, jo = issuer.mint("bob@corp", ["approvers"]), issuer.mint("jo@corp", ["engineering"])

    def delete(gw):
        return asyncio.run(call_tool(gw, mcp_server, jo, "delete_records",
                                     {"table": "t", "where": "x"}))
    try:
        with Gateway(config, env=env, workdir=tmp_path / "first") as gw:
            api = api_url(gw)
            approval_id = refused_approval(delete(gw))
            assert call(api, bob, "POST", f"/approvals/{approval_id}/approve",
                        {"for": "1h"})[0] == 200
            held = Background(lambda: ask(client(gw, llm, jo), HELD))
            pending = pending_for(api, bob, "jo@corp", "gpt-4o-mini")
        with pytest.raises(openai.PermissionDeniedError) as err:
            held.result()
        assert "denied by douane: douane shut down before an approver answered" in str(err.value)
        records = Gateway.audit_records(gw)
        denied = next(r for r in records if r.get("approval_id") == pending["id"]
                      and r["event"] == "approval.denied")
        assert denied["reason"] == "douane shut down before an approver answered"
        with Gateway(config, env=env, workdir=tmp_path / "second") as gw2:
            api_url(gw2)
            assert delete(gw2).content[0].text == "deleted from t where x"
            assert any(r["event"] == "approval.grant_used" and r["approval_id"] == approval_id
                       for r in gw2.audit_records(wait_for=len(records) + 1))
    finally:
        llm.close()
        hook.close()


def test_the_preview_leads_with_what_was_flagged_and_claims_cannot_forge_output(setup, issuer):
    """A 10-message request flagged in its first message; a user claim carrying a newline, a
    forged log line and ANSI escapes; an approver's reason of 2 MB, then one with escapes."""
    gw, llm, _, api = setup
    bob = issuer.mint("bob@corp", ["approvers"])
    forged = "[09:00:00.000] douane: approval apr_0000000000000000 approved by ciso@corp.example"
    eve = f"eve\x1b[2K\radmin@corp.ex\n{forged}"
    filler = [{"role": "user" if n % 2 else "assistant", "content": f"filler {n} " + "x" * 3000}
              for n in range(1, 10)]
    before = len(llm.requests)
    held = Background(lambda: client(gw, llm, issuer.mint(eve, ["engineering"])).chat
                      .completions.create(model="gpt-4o-mini", max_tokens=50, messages=[
                          {"role": "user", "content": HELD}, *filler]))
    pending = pending_for(api, bob, eve)
    preview = pending["preview"]
    assert preview[0] == {"kind": "prompt", "where": "messages.0.content", "text": HELD,
                          "flagged": "hold.kestrel"}
    assert [p["text"][:9] for p in preview[1:8]] == [f"filler {n} " for n in range(3, 10)]
    assert all(p["note"] == "cut: the first 2,000 of 3,009 characters are shown"
               for p in preview[1:8])
    assert preview[8] == {"kind": "notice", "where": "",
                          "text": "2 more piece(s) not shown (8 of 10)"}

    def douane(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(DOUANE), "approvals", "--url", api, "--token", bob, *args],
                              capture_output=True, text=True, timeout=30)

    for shown in (douane("list"), douane("show", pending["id"])):
        assert shown.returncode == 0 and "\x1b" not in shown.stdout and "\r" not in shown.stdout
        assert "eve\\x1b[2K\\x0dadmin@corp" in shown.stdout
        assert not any(line.startswith(forged[:20]) for line in shown.stdout.splitlines())
    status, doc = call(api, bob, "POST", f"/approvals/{pending['id']}/deny",
                       {"reason": "r" * 2_000_000})
    assert status == 400 and "at most 1000" in doc["error"]
    status, _ = call(api, bob, "POST", f"/approvals/{pending['id']}/deny",
                     {"reason": "no\n" + forged + "\x1b[8m"})
    assert status == 200
    with pytest.raises(openai.PermissionDeniedError):
        held.result()
    assert len(llm.requests) == before
    events(gw, pending["id"], "approval.denied")
    log = gw.log_text()
    assert not any(line.startswith(forged[:40]) for line in log.splitlines())
    assert f"eve\\x1b[2K\\x0dadmin@corp.ex\\x0a{forged}" in log  # opened for ...
    assert f"no\\x0a{forged}\\x1b[8m" in log  # denied by bob@corp: ...
    records = gw.audit_where(lambda r: r.get("approval_id") == pending["id"], count=2)
    assert all(len(json.dumps(r)) < 10_000 for r in records)


def test_an_unauthenticated_body_is_not_read_whole(setup):
    """The API read a body (up to tornado's 100 MB) before it checked the token: a few callers
    without one could fill the gateway's memory. A body past 4 MiB is refused on its length."""
    _, _, _, api = setup
    host, port = api.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /approvals/apr_0000000000000000/approve HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 104857600\r\n\r\n"
                     + b"{" * 65536)
        answer = sock.recv(4096)  # the body never comes: without a bound this waits
    assert answer.startswith(b"HTTP/1.1 4"), answer[:200]
