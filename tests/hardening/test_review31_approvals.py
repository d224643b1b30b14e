"""Review, stop 31: the per-user bound on open approval requests (e200952, OPEN_PER_USER) was
checked before the request was opened, with awaits between (the approver's preview is masked in
a worker): held requests of one user sent at once all passed the check, and opened as many
approval requests as were sent at once."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from douane.approvals.addon import OPEN_PER_USER
from tests.hardening.conftest import token_of
from tests.hardening.test_evasion import chat
from tests.hardening.test_redteam31_approvals import held_gateway


@pytest.fixture(scope="module")
def gw(issuer, llm, tmp_path_factory):
    with held_gateway(issuer, llm, tmp_path_factory.mktemp("review31_approvals"),
                      masking={"workers": 1, "timeout_seconds": 120}) as gateway:
        yield gateway


def test_held_requests_sent_at_once_open_at_most_the_bound(gw, llm, issuer, secrets):
    token = token_of(issuer, secrets, "flo@corp.example", ["engineering"])
    before = len(llm.requests)

    def ask(n: int) -> httpx.Response:
        return httpx.post(gw.url + "/v1/chat/completions",
                          json=chat(f"John Smith asks about kestrel {n}"),
                          headers={"authorization": f"Bearer {token}"}, timeout=120)

    with ThreadPoolExecutor(OPEN_PER_USER * 2) as pool:
        answers = list(pool.map(ask, range(OPEN_PER_USER * 3)))
    opened = [r for r in answers if r.status_code == 403 and "approval_pending" in r.text]
    refused = [r for r in answers if r.status_code == 429 and "too_many_approvals" in r.text]
    assert len(opened) + len(refused) == len(answers), [r.text for r in answers]
    assert len(opened) == OPEN_PER_USER, len(opened)
    assert len(llm.requests) == before
