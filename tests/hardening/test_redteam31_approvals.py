"""Red team, stop 31: one user opening approval requests without bound. Each distinct held
request opened one (answer mode: refused at once, the request kept for its timeout; hold mode:
the flow and its body kept too), every approver's inbox listing it: 300 distinct held prompts of
400 KB from one user grew the gateway 170 MB within 15 s (hold mode, one-off probe), and a
loop of small ones in answer mode fills the inbox. Past OPEN_PER_USER open requests a user's
next held request is refused 429 with a record; other users, and a retry of a request still
pending, are not."""

from __future__ import annotations

import httpx
import pytest

from douane.approvals.addon import OPEN_PER_USER
from tests.conftest import UPSTREAM_KEY
from tests.hardening.conftest import POLICY, assert_refused, token_of, with_claude
from tests.hardening.test_evasion import chat
from tests.support.gateway import Gateway, base_config

HELD_POLICY = POLICY.replace("rules:\n", 'rules:\n  - {id: hold.kestrel, literal: "kestrel", score: 60}\n')


def held_gateway(issuer, llm, work, **config: object) -> Gateway:
    """A gateway whose requests naming a kestrel wait for an approver (answer mode)."""
    (work / "policy.yaml").write_text(HELD_POLICY)
    config = base_config(issuer.url, llm.url + "/v1", policy={"files": [str(work / "policy.yaml")]},
                         approvals={"listen": "127.0.0.1:0", "approver_groups": ["approvers"],
                                    "upstreams": {"llm": {"mode": "answer"}}}, **config)
    with_claude(config, llm.url)
    return Gateway(config, mode=f"reverse:{llm.url}", workdir=work / "gw",
                   env={"DOUANE_TEST_UPSTREAM_KEY": UPSTREAM_KEY})


@pytest.fixture(scope="module")
def gw(issuer, llm, tmp_path_factory):
    with held_gateway(issuer, llm, tmp_path_factory.mktemp("redteam31_approvals")) as gateway:
        yield gateway


def _ask(gw: Gateway, token: str, text: str) -> httpx.Response:
    return httpx.post(gw.url + "/v1/chat/completions", json=chat(text),
                      headers={"authorization": f"Bearer {token}"}, timeout=60)


def test_one_user_cannot_open_approval_requests_without_bound(gw, llm, issuer, secrets):
    """Before: the 33rd distinct held request opened a 33rd approval request (403 pending)."""
    flooder = token_of(issuer, secrets, "flo@corp.example", ["engineering"])
    for n in range(OPEN_PER_USER):
        resp = _ask(gw, flooder, f"what about kestrel {n}?")
        assert resp.status_code == 403 and "approval_pending" in resp.text, resp.text
    before = len(llm.requests)
    resp = _ask(gw, flooder, f"what about kestrel {OPEN_PER_USER}?")
    record = assert_refused(gw, llm, before, resp, 429)
    assert record["reasons"][0]["rule"] == "approval.too_many", record
    # a retry of a request still pending gets that request's answer, not the bound's
    resp = _ask(gw, flooder, "what about kestrel 0?")
    assert resp.status_code == 403 and "approval_pending" in resp.text, resp.text
    # another user's held request still opens one
    other = token_of(issuer, secrets, "olga@corp.example", ["engineering"])
    resp = _ask(gw, other, "what about kestrel 0?")
    assert resp.status_code == 403 and "approval_pending" in resp.text, resp.text
