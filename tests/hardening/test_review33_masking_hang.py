"""A hung masking worker is killed and replaced (review 33).

An analysis that never ends (a text that makes the engine hang, or a worker stuck for any
reason) failed its flow closed at the timeout, but nothing recovered the worker: its batch stayed
counted as out, so with `workers: 1` every later masked flow timed out too, for every user. Now
the worker is killed a moment after the timeout and the pool serves again. Real gateway, real
workers: the hang is the fault script's (tests/hardening/faults.py) or a SIGSTOP.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import UPSTREAM_KEY
from tests.hardening.conftest import (
    FAULT_ENV,
    FAULT_SCRIPT,
    assert_refused,
    with_claude,
    write_policy,
)
from tests.support.gateway import Gateway, base_config

TIMEOUT = 3  # the masking config's timeout_seconds


@pytest.fixture(scope="module")
def gw(issuer, llm, tmp_path_factory):
    work = tmp_path_factory.mktemp("maskhang")
    config = base_config(issuer.url, llm.url, policy={"files": [write_policy(work)]},
                         masking={"workers": 1, "requests": True,
                                  "timeout_seconds": TIMEOUT})
    with_claude(config, llm.url)
    with Gateway(config, mode=f"reverse:{llm.url}", args=["-s", str(FAULT_SCRIPT)],
                 env={"DOUANE_TEST_UPSTREAM_KEY": UPSTREAM_KEY, **FAULT_ENV},
                 workdir=work / "gw") as gateway:
        yield gateway


def post(gw: Gateway, token: str, text: str) -> httpx.Response:
    return httpx.post(gw.url + "/v1/chat/completions", timeout=60,
                      json={"model": "gpt-4o-mini",
                            "messages": [{"role": "user", "content": text}]},
                      headers={"authorization": f"Bearer {token}"})


def assert_masks(gw: Gateway, llm, token: str, name: str) -> None:
    """A masked request is served (a text not sent before: analysed, not remembered)."""
    resp = post(gw, token, f"Please write to {name} about invoice {time.monotonic_ns()}.")
    assert resp.status_code == 200, resp.text
    assert name not in llm.requests[-1].body.decode()


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def workers(gw: Gateway) -> list[int]:
    """The masking workers: the processes the gateway's zygote forked."""
    assert gw.proc
    return [w for child in children(gw.proc.pid) for w in children(child)]


KILLED = "killed, and replaced"


def killed(gw: Gateway, before: int) -> None:
    """Until the watchdog has killed a hung worker since `before` kills were logged (its timer
    runs GRACE after the timeout; on a loaded host later: a fixed sleep raced it)."""
    deadline = time.monotonic() + 60
    while gw.log_text().count(KILLED) <= before:
        assert time.monotonic() < deadline, "the hung worker was never killed"
        time.sleep(0.05)


def refused_in_time(gw: Gateway, llm, token: str, text: str) -> None:
    before = len(llm.requests)
    started = time.monotonic()
    resp = post(gw, token, text)
    assert time.monotonic() - started < TIMEOUT + 2
    record = assert_refused(gw, llm, before, resp, 500)
    assert record["action"] == "error" and resp.json()["error"]["code"] == "gateway_error"


def test_a_hanging_analysis_fails_closed_and_the_next_one_is_served(gw, llm, token):
    assert_masks(gw, llm, token, "Maria Garcia")  # (also waits for the workers)
    kills = gw.log_text().count(KILLED)
    refused_in_time(gw, llm, token, "please FAULT-HANG now, Maria Garcia")
    killed(gw, kills)
    assert_masks(gw, llm, token, "Maria Garcia")
    assert "answered nothing for over 3 s: killed, and replaced" in gw.log_text()


# Each stream ends with its API's error for a stream douane could not inspect (500): for
# Anthropic api_error, not a permission_error that reads as a refusal of the caller's rights.
HUNG_STREAMS = [
    ("/v1/chat/completions", {"model": "gpt-4o-mini"}, "could not inspect this stream"),
    ("/anthropic/v1/messages", {"model": "claude-sonnet-4-5", "max_tokens": 64},
     '"type": "api_error"'),
]


@pytest.mark.parametrize(("path", "fields", "ending"), HUNG_STREAMS, ids=["openai", "anthropic"])
def test_a_hanging_stream_analysis_cuts_the_stream_and_the_next_one_is_served(gw, llm, token,
                                                                              path, fields,
                                                                              ending):
    llm.reply = "Here is the record you asked for: FAULT-HANG belongs to Maria Garcia, done."
    kills = gw.log_text().count(KILLED)
    try:
        with httpx.stream("POST", gw.url + path, timeout=60,
                          json={**fields, "stream": True,
                                "messages": [{"role": "user", "content": "hi"}]},
                          headers={"authorization": f"Bearer {token}"}) as resp:
            body = resp.read().decode()
    finally:
        llm.reply = "Hello from the fake upstream."
    assert "FAULT-HANG" not in body and "Garcia" not in body
    assert ending in body and "permission_error" not in body, body[-400:]
    killed(gw, kills)
    assert_masks(gw, llm, token, "Maria Garcia")


def test_a_stopped_worker_is_killed_and_replaced(gw, llm, token):
    assert_masks(gw, llm, token, "Jane Doe")
    stopped = workers(gw)
    assert stopped
    kills = gw.log_text().count(KILLED)
    for pid in stopped:
        os.kill(pid, signal.SIGSTOP)
    try:
        refused_in_time(gw, llm, token, f"Please write to Jane Doe ({time.monotonic_ns()}).")
        killed(gw, kills)
        assert_masks(gw, llm, token, "Jane Doe")
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):  # (the one killed)
                os.kill(pid, signal.SIGCONT)


def test_restarts_are_bounded(caplog):
    """A real pool, its worker hung twice: killed the first time, not the second (one restart a
    minute here): no fork storm from a text that hangs the analyser, resent. Said in the log."""
    import dataclasses
    from concurrent.futures.process import BrokenProcessPool

    from douane.masking.pool import MaskingPool
    from tests.test_masking import SETTINGS, STARTUP

    pool = MaskingPool(dataclasses.replace(SETTINGS, workers=1, timeout_seconds=1))
    pool.RESTARTS = 1
    pids = []
    try:
        for future in pool.warm_up():
            future.result(timeout=STARTUP)
        for _ in range(2):
            pool.submit(["warm up"]).result(timeout=STARTUP)  # (a set rebuilt after a kill)
            hung = pool.executor().submit(time.sleep, 3600)
            pids.append(pool.executor()._pipes[0].pid)
            time.sleep(1.2)  # past the timeout
            pool.overran()
            with contextlib.suppress(BrokenProcessPool, TimeoutError):
                hung.result(timeout=pool.GRACE + 5)
        assert pids[0] != pids[1]
        assert not Path(f"/proc/{pids[0]}").exists()  # killed (and reaped by the zygote)
        assert Path(f"/proc/{pids[1]}").exists() and not hung.done()  # not killed
        assert "killed, and replaced" in caplog.text
        assert "not restarted (1 restarts in the last minute)" in caplog.text
    finally:
        pool.shutdown()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
