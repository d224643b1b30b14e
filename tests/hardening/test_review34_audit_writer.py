"""Review of the audit writer process (stop 34): its death is seen before any record is sent."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time

import httpx

from douane import audit
from douane.config import AuditConfig
from tests.support.gateway import base_config
from tests.support.waiting import until
from tests.test_audit import KEY, _children, _dead, _open_by


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


def test_a_message_cut_by_the_gateway_s_death_loses_only_itself(tmp_path):
    """Killed while a window's message was half in the pipe (a message past PIPE_BUF is written in
    parts), the gateway left whole messages before it: the writer read them into its burst, then
    met EOF inside the cut one, which `recv` raises as OSError, not EOFError. `serve` caught only
    EOFError: the burst was never written and the process died on the error. What arrived whole
    is written; the cut message alone is lost."""
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    healthy = context.RawValue("b", audit.STARTING)
    config = AuditConfig(tmp_path / "audit.jsonl", 10**9, 5)
    writer = context.Process(target=audit.serve, args=(receiver, config, KEY, None, healthy))
    writer.start()
    receiver.close()
    assert until(lambda: healthy.value != audit.STARTING)
    whole = [audit._framed([{"event": "decision", "decision_id": f"dcn_{m}_{i}"}
                            for i in range(3)]) for m in range(2)]
    cut = audit._framed([{"event": "decision", "decision_id": "dcn_cut", "pad": "x" * 9000}])
    os.write(sender.fileno(), b"".join(whole) + cut[:len(cut) // 2])
    sender.close()  # the gateway's death: EOF inside the cut message
    writer.join(30)
    records = [json.loads(line) for line in config.path.read_text().splitlines()]
    assert [r["decision_id"] for r in records] == [f"dcn_{m}_{i}" for m in range(2)
                                                   for i in range(3)]
    assert audit.verify(config.path, KEY).ok
