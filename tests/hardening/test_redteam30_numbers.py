"""Red team, stop 30: a grant's numeric bound read as the provider reads the number. Through a
real gateway under the hardening policy (`capped`: max_tokens 100)."""

from __future__ import annotations

import httpx
import pytest

from tests.hardening.conftest import POLICY, assert_refused, reverse_gateway


@pytest.fixture(scope="module")
def gw(issuer, llm, tmp_path_factory):
    with reverse_gateway(issuer, llm, tmp_path_factory.mktemp("redteam30_numbers"),
                         POLICY) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def capped(issuer, secrets):
    token = issuer.mint("cora@corp.example", ["capped"])
    secrets.add(token)
    return token


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_a_fraction_above_the_cap_is_refused(field, gw, llm, capped):
    """`max_tokens: 100.5` was checked as `int(100.5)`, 100, under a cap of 100, and went on: a
    server rounding it (or reading it as a float bound) grants more than the cap."""
    before = len(llm.requests)
    resp = httpx.post(gw.url + "/v1/chat/completions", json={
        "model": "m", field: 100.5, "messages": [{"role": "user", "content": "hi"}]},
        headers={"authorization": f"Bearer {capped}"})
    record = assert_refused(gw, llm, before, resp, 403)
    assert record["reasons"][0]["rule"] == "grant.max_tokens", record


def test_the_cap_itself_passes(gw, llm, capped):
    resp = httpx.post(gw.url + "/v1/chat/completions", json={
        "model": "m", "max_tokens": 100.0, "messages": [{"role": "user", "content": "hi"}]},
        headers={"authorization": f"Bearer {capped}"})
    assert resp.status_code == 200, resp.text
