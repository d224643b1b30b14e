"""Two real mitmdump replicas sharing one real PostgreSQL (`database:`): a limit of N allows exactly
N across both; a request held on A is approved through B's API (or denied through the CLI on B)
and A lets it go at once, once; grants pass on either replica, one-shot ones once; with the
database down what needs it is refused clearly, and service resumes by itself."""

from __future__ import annotations

import concurrent.futures
import re
import subprocess
import time

import openai
import pytest

from tests.conftest import UPSTREAM_KEY
from tests.support.gateway import Gateway, base_config
from tests.support.postgres import PASSWORD
from tests.support.upstream import DEFAULT_REPLY, FakeUpstream
from tests.test_approvals_e2e import (
    DOUANE,
    HELD,
    Background,
    api_url,
    ask,
    call,
    client,
    pending_for,
)

LIMIT = 10
GRANTS = f"""\
version: 1
groups:
  engineering:
    upstreams:
      llm: {{models: ["gpt-*"], max_tokens: 1000}}
      quick: {{models: ["gpt-*"], max_tokens: 1000}}
  limited:
    upstreams:
      llm: {{models: ["gpt-*"], max_tokens: 1000}}
    limits: {{requests_per_minute: {LIMIT}}}
rules:
  - {{id: hold.kestrel, literal: "kestrel", score: 60}}
thresholds: {{hold: 50, block: 80}}
"""


@pytest.fixture(scope="module")
def fleet(issuer, postgres, tmp_path_factory):
    """Replicas A and B: one configuration, one database, each its own state_dir and API."""
    url = postgres.new_database().replace(f":{PASSWORD}@", "@")
    llm = FakeUpstream()
    work = tmp_path_factory.mktemp("fleet")
    (work / "grants.yaml").write_text(GRANTS)
    config = base_config(issuer.url, llm.url + "/v1",
                         policy={"files": [str(work / "grants.yaml")]},
                         approvals={"listen": "127.0.0.1:0", "approver_groups": ["approvers"],
                                    "upstreams": {"quick": {"mode": "answer"}}},
                         database={"url": url, "password": {"env": "DOUANE_TEST_DB_PASSWORD"},
                                   "timeout": 2})
    config["upstreams"]["quick"] = {"url": llm.url + "/v1/quick", "protocol": "openai",
                                    "credential": {"env": "DOUANE_TEST_UPSTREAM_KEY"}}
    env = {"DOUANE_TEST_UPSTREAM_KEY": UPSTREAM_KEY, "DOUANE_TEST_DB_PASSWORD": PASSWORD}
    with Gateway(config, env=env, workdir=work / "a") as a, \
            Gateway(config, env=env, workdir=work / "b") as b:
        for gw in (a, b):
            wait_for_log(gw, "store .* ready")
        yield a, b, llm, api_url(a), api_url(b)
    llm.close()
    for gw in (a, b):
        assert PASSWORD not in gw.log_text()


def wait_for_log(gw: Gateway, pattern: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not re.search(pattern, gw.log_text()):
        assert time.monotonic() < deadline, f"no {pattern!r} in the log:\n{gw.log_text()}"
        time.sleep(0.05)


def refusal(e: openai.APIStatusError) -> tuple[int, str, str]:
    err = e.response.json()["error"]
    return e.status_code, err["code"], err["decision_id"]


def test_a_limit_of_n_allows_exactly_n_across_replicas(fleet, issuer):
    a, b, llm, _, _ = fleet
    token = issuer.mint("lim@corp", ["limited"])
    clients = [client(gw, llm, token) for gw in (a, b)]
    before = len(llm.requests)

    def one(i: int) -> str:
        try:
            return ask(clients[i % 2], f"question {i}")
        except openai.RateLimitError as e:
            status, code, decision_id = refusal(e)
            assert (status, code) == (429, "rate_limited")
            return decision_id

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(LIMIT + 6)))
    assert results.count(DEFAULT_REPLY) == LIMIT
    assert len(llm.requests) == before + LIMIT  # the refused ones never reached it
    gateways = [(a, b)[i % 2] for i in range(len(results))]  # the one each request went to
    records = [gw.audit_record(r) for gw, r in zip(gateways, results, strict=True)
               if r != DEFAULT_REPLY]
    assert len(records) == 6 and {r["reasons"][0]["rule"] for r in records} == \
        {"limit.requests_per_minute"}
    assert {r.get("user") for r in records} == {"lim@corp"}
    served = [gw.audit_where(lambda r: r.get("user") == "lim@corp" and r.get("event") ==
                             "decision" and r["action"] == "allow", count=n)
              for gw in (a, b) if (n := sum(g is gw and r == DEFAULT_REPLY
                                             for g, r in zip(gateways, results, strict=True)))]
    assert len(served) == 2 and sum(map(len, served)) == LIMIT  # both served some


def test_held_on_a_approved_through_b_goes_upstream_once(fleet, issuer):
    a, b, llm, api_a, api_b = fleet
    bob = issuer.mint("bob@corp", ["approvers"])
    before = len(llm.requests)
    held = Background(lambda: ask(client(a, llm, issuer.mint("alice@corp", ["engineering"])),
                                  HELD))
    pending = pending_for(api_b, bob, "alice@corp")  # B lists what A holds
    assert pending["preview"][-1]["text"] == HELD and pending["status"] == "pending"
    assert len(llm.requests) == before
    started = time.monotonic()
    status, doc = call(api_b, bob, "POST", f"/approvals/{pending['id']}/approve",
                       {"reason": "fine"})
    assert status == 200 and doc["status"] == "approved" and doc["approver"] == "bob@corp"
    assert held.result() == DEFAULT_REPLY
    released = time.monotonic() - started
    print(f"\napproved on B -> answered on A in {released * 1000:.0f} ms")
    assert len(llm.requests) == before + 1
    # single use: neither replica decides it again
    for api in (api_a, api_b):
        status, doc = call(api, bob, "POST", f"/approvals/{pending['id']}/deny",
                           {"reason": "late"})
        assert status == 409 and "already approved" in doc["error"]
    assert len(llm.requests) == before + 1
    # the decision is audited where it was taken; A's flow record says who approved it
    assert b.audit_where(lambda r: r.get("approval_id") == pending["id"]
                         and r["event"] == "approval.approved")
    (record,) = a.audit_where(lambda r: r.get("decision_id") == pending["decision_id"]
                              and r["event"] == "decision")
    assert record["action"] == "allow" and "approved by bob@corp" in \
        record["reasons"][-1]["message"]
    assert "approved elsewhere by bob@corp" in a.log_text()


def test_held_on_b_denied_through_the_cli_on_a(fleet, issuer):
    a, b, llm, api_a, _ = fleet
    bob = issuer.mint("bob@corp", ["approvers"])
    before = len(llm.requests)
    held = Background(lambda: ask(client(b, llm, issuer.mint("carol@corp", ["engineering"])),
                                  HELD))
    pending = pending_for(api_a, bob, "carol@corp")
    denied = subprocess.run([str(DOUANE), "approvals", "--url", api_a, "--token", bob, "deny",
                             pending["id"], "--reason", "not today"],
                            capture_output=True, text=True, timeout=30)
    assert denied.returncode == 0 and f"{pending['id']} denied" in denied.stdout
    with pytest.raises(openai.PermissionDeniedError) as e:
        held.result()
    assert "denied by bob@corp: not today" in str(e.value)
    assert len(llm.requests) == before
    # nobody decides their own request, on any replica
    held = Background(lambda: ask(client(b, llm, issuer.mint("dan@corp", ["engineering",
                                                                          "approvers"])), HELD))
    dan = issuer.mint("dan@corp", ["engineering", "approvers"])
    mine = pending_for(api_a, dan, "dan@corp")
    status, doc = call(api_a, dan, "POST", f"/approvals/{mine['id']}/approve", {})
    assert status == 403 and "own request" in doc["error"]
    call(api_a, bob, "POST", f"/approvals/{mine['id']}/deny", {"reason": "cleanup"})
    with pytest.raises(openai.PermissionDeniedError):
        held.result()


def test_grants_pass_on_every_replica_and_a_one_shot_grant_once(fleet, issuer):
    a, b, llm, api_a, api_b = fleet
    bob = issuer.mint("bob@corp", ["approvers"])
    erin = issuer.mint("erin@corp", ["engineering"])
    # answer mode: refused at once with the approval id; "this request only" on B
    with pytest.raises(openai.PermissionDeniedError) as e:
        ask(client(a, llm, erin, "/v1/quick"), HELD)
    assert refusal(e.value)[1] == "approval_pending"
    pending = pending_for(api_b, bob, "erin@corp")
    # the retry on the other replica gets the same request, not a new one
    with pytest.raises(openai.PermissionDeniedError) as e:
        ask(client(b, llm, erin, "/v1/quick"), HELD)
    assert pending["id"] in str(e.value)
    assert call(api_b, bob, "POST", f"/approvals/{pending['id']}/approve", {})[0] == 200
    before = len(llm.requests)
    replies = []
    for gw in (b, a):  # the one-shot grant passes once, whichever replica the retry reaches
        try:
            replies.append(ask(client(gw, llm, erin, "/v1/quick"), HELD))
        except openai.PermissionDeniedError as e:
            replies.append(refusal(e)[1])
    assert replies == [DEFAULT_REPLY, "approval_pending"]
    assert len(llm.requests) == before + 1
    # denied on A: a retry on B gets the denial and its reason, not a new approval request
    again = pending_for(api_a, bob, "erin@corp", besides=(pending["id"],))
    assert call(api_a, bob, "POST", f"/approvals/{again['id']}/deny",
                {"reason": "not this week"})[0] == 200
    with pytest.raises(openai.PermissionDeniedError) as e:
        ask(client(b, llm, erin, "/v1/quick"), HELD)
    assert refusal(e.value)[1] == "approval_denied" and "not this week" in str(e.value)
    assert not [p for p in call(api_b, bob, "GET", "/approvals")[1]["approvals"]
                if p["user"] == "erin@corp"]
    assert len(llm.requests) == before + 1
    # a time-boxed grant given on A lets the held request pass on B without an approver
    frank = issuer.mint("frank@corp", ["engineering"])
    held = Background(lambda: ask(client(b, llm, frank), HELD))
    pending = pending_for(api_a, bob, "frank@corp")
    assert call(api_a, bob, "POST", f"/approvals/{pending['id']}/approve",
                {"for": "1h", "reason": "kestrel week"})[0] == 200
    assert held.result() == DEFAULT_REPLY
    assert ask(client(a, llm, frank), HELD) == DEFAULT_REPLY
    assert ask(client(b, llm, frank), HELD) == DEFAULT_REPLY
    assert len(a.audit_where(lambda r: r.get("event") == "approval.grant_used"
                             and r.get("user") == "frank@corp")) == 1


def test_outage_refuses_clearly_then_recovers_by_itself(fleet, issuer, postgres):
    a, b, llm, api_a, _ = fleet
    bob = issuer.mint("bob@corp", ["approvers"])
    limited = issuer.mint("out@corp", ["limited"])
    assert ask(client(a, llm, limited), "before") == DEFAULT_REPLY
    before = len(llm.requests)
    with postgres.outage():
        ids: list[str] = []
        for gw, token, text in ((a, limited, "during"), (b, limited, "during"),
                                (a, issuer.mint("gil@corp", ["engineering"]), HELD)):
            with pytest.raises(openai.InternalServerError) as e:
                ask(client(gw, llm, token), text)
            status, code, decision_id = refusal(e.value)
            assert (status, code) == (503, "store_unavailable")
            assert "shared store" in str(e.value) and decision_id in str(e.value)
            ids.append(decision_id)
        status, doc = call(api_a, bob, "GET", "/approvals")
        assert status == 503 and "unavailable" in doc["error"]
        assert len(llm.requests) == before
    for gw, decision_id in zip((a, b, a), ids, strict=True):
        record = gw.audit_record(decision_id)
        assert record["action"] == "refuse" and record["status"] == 503
        assert record["reasons"][0]["rule"] == "store.unavailable"
    # back by itself: no restart of either replica
    for gw in (a, b):
        deadline = time.monotonic() + 60
        while True:
            try:
                assert ask(client(gw, llm, limited), "after") == DEFAULT_REPLY
                break
            except openai.InternalServerError:
                assert time.monotonic() < deadline, "the replica did not recover"
                time.sleep(0.2)
    assert call(api_a, bob, "GET", "/approvals")[0] == 200


def test_a_request_held_through_an_outage_is_released_once_approved_after_it(
        fleet, issuer, postgres):
    """The holder's notifications connection is cut by the outage; it reconnects by itself and
    the approval given on B after the database is back still releases the flow on A at once."""
    a, b, llm, _, api_b = fleet
    bob = issuer.mint("bob@corp", ["approvers"])
    before = len(llm.requests)
    held = Background(lambda: ask(client(a, llm, issuer.mint("hal@corp", ["engineering"])),
                                  HELD))
    pending = pending_for(api_b, bob, "hal@corp")
    with postgres.outage():
        wait_for_log(a, "store notifications interrupted")
        assert not held.future.done()
    deadline = time.monotonic() + 30
    while (status := call(api_b, bob, "POST", f"/approvals/{pending['id']}/approve",
                          {"reason": "after the outage"})[0]) == 503:
        assert time.monotonic() < deadline, "B's API did not recover"
        time.sleep(0.2)
    assert status == 200
    assert held.result() == DEFAULT_REPLY
    assert len(llm.requests) == before + 1


def test_a_replica_shutting_down_denies_its_held_requests_for_the_fleet(fleet, issuer):
    """Its held client gets a refusal, and the other replicas see the request denied, not
    pending forever."""
    _, b, llm, _, api_b = fleet
    bob = issuer.mint("bob@corp", ["approvers"])
    c = Gateway(b.config_file.read_text().replace(str(b.state_dir), str(b.dir / "state-c")),
                env=b.env, workdir=b.dir.parent / "c")
    try:
        wait_for_log(c, "store .* ready")
        held = Background(lambda: ask(client(c, llm, issuer.mint("ida@corp", ["engineering"])),
                                      HELD))
        pending = pending_for(api_b, bob, "ida@corp")
    finally:
        c.stop()
    with pytest.raises(openai.PermissionDeniedError) as e:
        held.result()
    assert "douane shut down before an approver answered" in str(e.value)
    status, doc = call(api_b, bob, "GET", f"/approvals/{pending['id']}")
    assert status == 200 and doc["status"] == "denied"
    assert pending["id"] not in [p["id"] for p in call(api_b, bob, "GET", "/approvals")[1]
                                 ["approvals"]]
