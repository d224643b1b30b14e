"""Refusals before authentication, through a real mitmdump: each was one audit record, so a client
nobody authenticated grew the log as fast as it could send (`douane.preauth`). Past a bound per
peer and window they are counted into a summary record; an authenticated user's are never."""

from __future__ import annotations

import re
import time

import httpx
import pytest

from tests.conftest import UPSTREAM_KEY
from tests.hardening.conftest import with_claude, write_policy
from tests.hardening.test_bounds import pre_flow_answer
from tests.support.gateway import Gateway, base_config

PER_PEER, WINDOW = 5, 4
UNAUTHENTICATED, BAD_HEADS, AUTHENTICATED = 40, 5, 25


@pytest.fixture(scope="module")
def gw(issuer, llm, tmp_path_factory):
    work = tmp_path_factory.mktemp("preauth")
    config = base_config(issuer.url, llm.url, policy={"files": [write_policy(work)]},
                         audit={"unauthenticated": {"per_peer": PER_PEER, "total": 100,
                                                    "window_seconds": WINDOW}})
    with_claude(config, llm.url)
    with Gateway(config, mode=f"reverse:{llm.url}", workdir=work / "gw",
                 env={"DOUANE_TEST_UPSTREAM_KEY": UPSTREAM_KEY}) as gateway:
        yield gateway


def summaries(gw: Gateway) -> list[dict]:
    return [r for r in gw.audit_records() if r.get("event") == "refusals.summarised"]


def test_a_burst_of_unauthenticated_refusals_is_summarised(gw, llm, issuer, secrets):
    before = len(llm.requests)
    sent: list[str] = []
    with httpx.Client(base_url=gw.url, timeout=60) as c:
        for _ in range(UNAUTHENTICATED):
            resp = c.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": []})
            assert resp.status_code == 401, resp.text[:200]
            sent.append(resp.headers["x-douane-decision-id"])
    for _ in range(BAD_HEADS):
        answer = pre_flow_answer(gw, b"NOT HTTP AT ALL\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
        sent.append(re.search(rb"x-douane-decision-id: (\w+)", answer, re.I)[1].decode())
    # an authenticated user's refusals, in the same windows, from the same address
    token = issuer.mint("ann@corp.example", ["staff"])
    secrets.add(token)
    theirs = []
    with httpx.Client(base_url=gw.url, timeout=60,
                      headers={"authorization": f"Bearer {token}"}) as c:
        for _ in range(AUTHENTICATED):
            resp = c.post("/v1/not-governed", json={})
            assert resp.status_code == 403, resp.text[:200]
            theirs.append(resp.headers["x-douane-decision-id"])
    assert len(llm.requests) == before and len(set(sent)) == len(sent)

    # every refusal is in the log, one by one or counted in a summary written at its window's end
    deadline = time.monotonic() + WINDOW + 30
    while True:
        records = gw.audit_records()
        alone = [r["decision_id"] for r in records if r.get("decision_id") in sent]
        counted = summaries(gw)
        if len(alone) + sum(s["counted"] for s in counted) == len(sent) or \
                time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert counted, "no summary record"
    assert len(alone) + sum(s["counted"] for s in counted) == len(sent), (len(alone), counted)
    assert len(alone) <= PER_PEER * (len(counted) + 1)  # a window's summary, or none yet
    for s in counted:
        assert s["client"] == "127.0.0.1" and not s["untracked_peers"], s
        assert s["recorded"] == PER_PEER and s["window"]["seconds"] == WINDOW, s
        assert set(s["rules"]) <= {"identity.missing", "protocol.bad_head"}, s
        ids = s["decision_ids"]
        assert {ids["first"], ids["last"], *ids["sample"]} <= set(sent) - set(alone), s
        assert len(ids["sample"]) <= min(10, s["counted"] - 1) and s["first"] <= s["last"]
    # an authenticated user's refusals are each recorded, never summarised
    for decision_id in theirs:
        record = gw.audit_record(decision_id)
        assert record["user"] == "ann@corp.example" and record["action"] == "refuse", record
