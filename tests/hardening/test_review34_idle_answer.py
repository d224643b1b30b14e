"""A connection whose answer is still being checked is not idle (stop 34).

The client timeouts' idle clock started at the second step of the response chain, before the
policy's matching of the answer and its masking: an answer that took longer than the idle timeout
to check was cut as an idle connection ("Server disconnected") after the upstream had answered,
its masking done for nothing. Real gateway, real masking worker, a 1 s idle timeout and an answer
whose analysis takes longer than that."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.conftest import UPSTREAM_KEY
from tests.support.gateway import Gateway, base_config
from tests.support.upstream import FakeUpstream

PII = "Your account manager is Maria Garcia. Reach her at maria.garcia@example.com today. "


@pytest.fixture(scope="module")
def gw(issuer, tmp_path_factory):
    llm = FakeUpstream()
    config = base_config(issuer.url, llm.url, masking={"workers": 1, "timeout_seconds": 120})
    config["gateway"] = {"timeouts": {"idle": 1}}
    with Gateway(config, mode=f"reverse:{llm.url}", env={"DOUANE_TEST_UPSTREAM_KEY": UPSTREAM_KEY},
                 workdir=tmp_path_factory.mktemp("idle-answer")) as gateway:
        gateway.llm = llm  # type: ignore[attr-defined]
        yield gateway
    llm.close()


@pytest.mark.slow
def test_an_answer_checked_longer_than_the_idle_timeout_is_delivered(gw, issuer):
    token = issuer.mint("alice@corp", ["engineering"])
    gw.llm.reply = PII * 12000  # ~1 MB: its analysis takes seconds, the idle timeout is 1 s
    with httpx.Client(timeout=300) as client:
        started = time.monotonic()
        resp = client.post(gw.url + "/v1/chat/completions",
                           headers={"authorization": f"Bearer {token}"},
                           json={"model": "gpt-4o", "messages": [{"role": "user", "content": "?"}]})
        took = time.monotonic() - started
        assert resp.status_code == 200, resp.text[:300]
        text = resp.json()["choices"][0]["message"]["content"]
        assert "maria.garcia@example.com" not in text and "<EMAIL_ADDRESS>" in text
        assert took > 2.5, f"the analysis took {took:.1f} s: too short to have tested the idle clock"
        # and once the answer has left, the idle clock runs: the connection is closed
        time.sleep(3)
        assert "closing client connection 127.0.0.1: idle" in gw.log_text()
