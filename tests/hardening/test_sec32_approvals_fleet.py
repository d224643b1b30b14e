"""Security, stop 32: the bound on one user's open approval requests (OPEN_PER_USER) was counted
per replica: with N replicas behind a balancer a user opened 32·N, every approver's inbox (which
lists the fleet's) showing each. With a shared store the fleet's count decides, under a lock on
the user's name (two replicas opening at once cannot both take the last slot). Two real mitmdump
replicas on one real PostgreSQL."""

from __future__ import annotations

import concurrent.futures

import httpx
import pytest

from douane.approvals.addon import OPEN_PER_USER
from tests.conftest import UPSTREAM_KEY
from tests.hardening.conftest import token_of, with_claude
from tests.hardening.test_evasion import chat
from tests.hardening.test_redteam31_approvals import HELD_POLICY
from tests.support.gateway import Gateway, base_config
from tests.support.postgres import PASSWORD
from tests.test_shared_store_e2e import wait_for_log


@pytest.fixture(scope="module")
def replicas(issuer, llm, postgres, tmp_path_factory):
    work = tmp_path_factory.mktemp("sec32_approvals")
    (work / "policy.yaml").write_text(HELD_POLICY)
    url = postgres.new_database().replace(f":{PASSWORD}@", "@")
    config = base_config(issuer.url, llm.url + "/v1", policy={"files": [str(work / "policy.yaml")]},
                         approvals={"listen": "127.0.0.1:0", "approver_groups": ["approvers"],
                                    "upstreams": {"llm": {"mode": "answer"}}},
                         database={"url": url, "password": {"env": "DOUANE_TEST_DB_PASSWORD"},
                                   "timeout": 5})
    with_claude(config, llm.url)
    env = {"DOUANE_TEST_UPSTREAM_KEY": UPSTREAM_KEY, "DOUANE_TEST_DB_PASSWORD": PASSWORD}
    with Gateway(config, mode=f"reverse:{llm.url}", env=env, workdir=work / "a") as a, \
            Gateway(config, mode=f"reverse:{llm.url}", env=env, workdir=work / "b") as b:
        for gw in (a, b):
            wait_for_log(gw, "store .* ready")
        yield a, b


def _ask(gw: Gateway, token: str, text: str) -> httpx.Response:
    return httpx.post(gw.url + "/v1/chat/completions", json=chat(text),
                      headers={"authorization": f"Bearer {token}"}, timeout=60)


def test_one_user_opens_at_most_the_bound_across_the_fleet(replicas, llm, issuer, secrets):
    """Before (0ba8e27): all 48 opened (24 on each replica, each under its own 32)."""
    a, b = replicas
    flooder = token_of(issuer, secrets, "fleetflo@corp.example", ["engineering"])
    before = len(llm.requests)
    asked = OPEN_PER_USER + 16

    def one(n: int) -> tuple[Gateway, httpx.Response]:
        gw = (a, b)[n % 2]
        return gw, _ask(gw, flooder, f"what about kestrel {n}?")

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(asked)))
    pending = [r for _, r in answers if r.status_code == 403 and "approval_pending" in r.text]
    refused = [(gw, r) for gw, r in answers if r.status_code == 429]
    assert len(pending) == OPEN_PER_USER and len(refused) == asked - OPEN_PER_USER, \
        [(r.status_code, r.text[:120]) for _, r in answers]
    assert len(llm.requests) == before
    for gw, resp in refused:  # provider-shaped, each decision id found in that replica's audit
        error = resp.json()["error"]
        assert error["code"] == "too_many_approvals", error
        decision_id = resp.headers["x-douane-decision-id"]
        assert decision_id in resp.text
        record = gw.audit_record(decision_id)
        assert record["action"] == "refuse" and \
            record["reasons"][0]["rule"] == "approval.too_many", record
    # a retry of a request still pending gets that request's answer, on either replica
    for gw in (a, b):
        resp = _ask(gw, flooder, "what about kestrel 0?")
        assert resp.status_code == 403 and "approval_pending" in resp.text, resp.text
    # another user still opens one
    other = token_of(issuer, secrets, "fleetolga@corp.example", ["engineering"])
    resp = _ask(b, other, "what about kestrel 0?")
    assert resp.status_code == 403 and "approval_pending" in resp.text, resp.text
