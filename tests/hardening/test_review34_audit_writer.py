"""Review of the audit writer process (stop 34): its death is seen before any record is sent."""

from __future__ import annotations

import os
import signal
import time

import httpx

from tests.support.gateway import base_config
from tests.support.waiting import until
from tests.test_audit import _children, _dead, _open_by


def test_a_writer_killed_before_the_first_request_refuses_it(issuer, llm, make_gateway):
    """The gateway watched its writer's death only from the first record it appended: a writer
    killed before any request (its log open, healthy) left `ready` true, and the first request
    went upstream and was answered 200; its record then met a pipe nobody read (EPIPE) and was
    lost, unaudited. The death is watched from the first `ready` too."""
    gw = make_gateway(base_config(issuer.url, llm.url), mode=f"reverse:{llm.url}")
    path = gw.audit_file().resolve()
    assert until(lambda: [p for p in _children(gw.proc.pid) if _open_by(p, path)])
    [writer] = [pid for pid in _children(gw.proc.pid) if _open_by(pid, path)]
    os.kill(writer, signal.SIGKILL)
    assert until(lambda: _dead(writer))
    time.sleep(0.2)
    token = issuer.mint("alice@corp.example", ["engineering"])
    resp = httpx.post(gw.url + "/v1/chat/completions", timeout=30,
                      headers={"authorization": f"Bearer {token}"},
                      json={"model": "gpt-4o-mini", "messages": [{"role": "user",
                                                                  "content": "hi"}]})
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "audit_unavailable"
    assert resp.headers["x-douane-decision-id"]
    assert not llm.requests
