"""Fail closed: real failures inside a real gateway (tests/hardening/faults.py), an identity
provider that is down, a recordings disk that is full. The failing request is refused (the
recording case follows its declared `on_error`), and the gateway keeps serving the next one.

Also proven elsewhere (cited in docs/security.md): an exception in any hook refuses the flow
(tests/test_routing.py), a crashed worker fails the analysis and the pool recovers
(tests/test_masking.py).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from douane import audit
from tests.conftest import UPSTREAM_KEY
from tests.hardening.conftest import (
    FAULT_ENV,
    FAULT_SCRIPT,
    assert_refused,
    with_claude,
    write_policy,
)
from tests.support.gateway import Gateway, base_config
from tests.support.upstream import FakeUpstream

REPLY = "Hello from the fake upstream."


def chat(text: str, **extra) -> dict:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}], **extra}


def closed_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


@pytest.fixture(scope="module")
def dead_issuer() -> str:
    return f"http://127.0.0.1:{closed_port()}/realms/down"


@pytest.fixture(scope="module")
def gw(issuer, llm, dead_issuer, tmp_path_factory):
    work = tmp_path_factory.mktemp("failclosed")
    config = base_config(issuer.url, llm.url, policy={"files": [write_policy(work)]},
                         masking={"workers": 1, "requests": True, "timeout_seconds": 120})
    config["identity"]["issuers"].append({"issuer": dead_issuer, "audience": "douane-tests"})
    with_claude(config, llm.url)
    with Gateway(config, mode=f"reverse:{llm.url}", args=["-s", str(FAULT_SCRIPT)],
                 env={"DOUANE_TEST_UPSTREAM_KEY": UPSTREAM_KEY, **FAULT_ENV},
                 workdir=work / "gw") as gateway:
        yield gateway


@pytest.fixture(scope="module")
def token(issuer, secrets):
    token = issuer.mint("fay@corp.example", ["engineering"])
    secrets.add(token)
    return token


def post(gw: Gateway, token: str, doc: dict, timeout: float = 150) -> httpx.Response:
    return httpx.post(gw.url + "/v1/chat/completions", json=doc, timeout=timeout,
                      headers={"authorization": f"Bearer {token}"})


def assert_serving(gw: Gateway, llm: FakeUpstream, token: str) -> None:
    before = len(llm.requests)
    resp = post(gw, token, chat("hello again"))
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["content"] == REPLY
    assert len(llm.requests) == before + 1


def test_the_gateway_serves_and_masks(gw, llm, token):
    assert_serving(gw, llm, token)  # also waits for the masking worker to load


@pytest.mark.parametrize("trigger", ["FAULT-POLICY", "FAULT-MASK", "FAULT-CRASH"])
def test_a_failing_stage_refuses_the_request_and_the_gateway_goes_on(gw, llm, token, trigger):
    before = len(llm.requests)
    resp = post(gw, token, chat(f"please {trigger} now"))
    record = assert_refused(gw, llm, before, resp, 500)
    assert record["action"] == "error" and resp.json()["error"]["code"] == "gateway_error"
    assert_serving(gw, llm, token)


def test_an_error_quoting_the_request_is_logged_escaped_and_scrubbed(gw, llm, token, secrets):
    """The failure's message was logged as is: a key the client sent reached the log, and an ESC
    or a newline in it could forge or hide log lines."""
    key = "sk-proj-" + "Qm9vTXlLZXlJc0hlcmVBbmRJdElzTG9uZw" * 2
    secrets.add(key)  # test_z_leaks scans the logs for it too
    before = len(llm.requests)
    resp = post(gw, token, chat(f"FAULT-ECHO {key} \x1b[2K\r\n[09:00:00.000] douane: forged"))
    assert_refused(gw, llm, before, resp, 500)
    log = gw.log_text()
    assert "FAULT-ECHO" in log  # the failure is logged...
    assert key not in log and "\x1b[2K" not in log  # ...its quote scrubbed and escaped
    assert not any(line.startswith("[09:00:00.000] douane: forged") for line in log.splitlines())


def test_a_failing_answer_analysis_withholds_the_answer(gw, llm, token):
    llm.reply = "Your FAULT-MASK record is ready, Maria."
    try:
        resp = post(gw, token, chat("hi"))
    finally:
        llm.reply = REPLY
    assert resp.status_code == 500 and "Maria" not in resp.text
    assert gw.audit_record(resp.headers["x-douane-decision-id"])["action"] == "error"
    assert_serving(gw, llm, token)


@pytest.mark.parametrize("trigger", ["FAULT-MASK", "FAULT-CRASH"])
def test_a_failing_stream_analysis_cuts_the_stream(gw, llm, token, trigger):
    llm.reply = f"Here is the record you asked for: {trigger} belongs to Maria Garcia, done."
    try:
        with httpx.stream("POST", gw.url + "/v1/chat/completions", json=chat("hi", stream=True),
                          headers={"authorization": f"Bearer {token}"}, timeout=150) as resp:
            body = resp.read().decode()
            decision_id = resp.headers["x-douane-decision-id"]
    finally:
        llm.reply = REPLY
    assert trigger not in body and "Garcia" not in body
    assert "could not inspect this stream" in body and decision_id in body
    assert gw.audit_record(decision_id)
    assert_serving(gw, llm, token)


def test_identity_provider_down_without_cached_keys(gw, llm, issuer, dead_issuer, token):
    before = len(llm.requests)
    resp = post(gw, issuer.mint("fay@corp.example", iss=dead_issuer), chat("hi"))
    assert_refused(gw, llm, before, resp, 401, 503)
    assert_serving(gw, llm, token)  # the other issuer's users are unaffected


# ---- recordings on a full disk -------------------------------------------------------------

@pytest.fixture
def tiny_disk(tmp_path) -> Path:
    """A 512 KiB tmpfs (needs root); unmounted afterwards."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)],
            capture_output=True).returncode != 0:
        pytest.skip("a tmpfs mount needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(folder: Path) -> Path:
    filler = folder / "filler"
    with filler.open("wb") as f:
        try:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
        except OSError:
            pass
    return filler


def wait_for_log(gw: Gateway, text: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while text not in gw.log_text():
        assert time.monotonic() < deadline, f"{text!r} not logged"
        time.sleep(0.05)


@pytest.mark.parametrize("on_error", ["refuse", "continue"])
def test_full_recordings_disk_follows_on_error(issuer, make_gateway, upstream, tiny_disk, token,
                                               on_error):
    config = base_config(issuer.url, upstream.url,
                         recording={"dir": str(tiny_disk / "recordings"), "on_error": on_error})
    gw = make_gateway(config, mode=f"reverse:{upstream.url}")
    assert post(gw, token, chat("first")).status_code == 200
    deadline = time.monotonic() + 10
    while not list(tiny_disk.rglob("*.mitm")):  # the first flow is written while there is room
        assert time.monotonic() < deadline, "the first flow was not recorded"
        time.sleep(0.05)
    filler = fill(tiny_disk)
    for _ in range(40):  # until a recording fails (that flow itself was already answered)
        before = len(upstream.requests)
        resp = post(gw, token, chat("while the disk is full"))
        if resp.status_code != 200 or "cannot record flow" in gw.log_text():
            break
        time.sleep(0.1)
    wait_for_log(gw, "cannot record flow")
    if resp.status_code == 200:  # the next request meets the declared behaviour
        before = len(upstream.requests)
        resp = post(gw, token, chat("while the disk is full"))
    if on_error == "continue":
        assert resp.status_code == 200 and len(upstream.requests) == before + 1
        return
    for _ in range(10):  # a flow queued before the failure may still fit; the next one fails
        if resp.status_code == 503:
            break
        time.sleep(0.1)
        before = len(upstream.requests)
        resp = post(gw, token, chat("while the disk is full"))
    record = assert_refused(gw, upstream, before, resp, 503)
    assert record["reasons"][0]["rule"] == "recording.unavailable"

    filler.unlink()  # room again: the next recording succeeds and traffic resumes
    deadline = time.monotonic() + 10
    while (resp := post(gw, token, chat("after"))).status_code == 503:
        assert time.monotonic() < deadline, "traffic did not resume"
        time.sleep(0.2)
    assert resp.status_code == 200
    assert gw.audit_record(resp.headers["x-douane-decision-id"])["action"] == "allow"
    actions = [json.loads(line)["action"] for line in gw.audit_file().read_text().splitlines()]
    assert actions[0] == "allow" and "refuse" in actions and actions[-1] == "allow"


def test_full_audit_disk_refuses_traffic_and_the_chain_stays_intact(issuer, make_gateway,
                                                                    upstream, tiny_disk, token):
    config = base_config(issuer.url, upstream.url,
                         audit={"path": str(tiny_disk / "audit" / "audit.jsonl")})
    gw = make_gateway(config, mode=f"reverse:{upstream.url}")
    assert post(gw, token, chat("first")).status_code == 200
    filler = fill(tiny_disk)
    for _ in range(40):  # the log's last page still has room for a few records
        before = len(upstream.requests)
        resp = post(gw, token, chat("until its records cannot be written"))
        if resp.status_code != 200 or "cannot write the audit log" in gw.log_text():
            break
        time.sleep(0.1)
    wait_for_log(gw, "cannot write the audit log")
    if resp.status_code == 200:  # the next request meets the refusal
        before = len(upstream.requests)
        resp = post(gw, token, chat("while the disk is full"))
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "audit_unavailable"
    assert len(upstream.requests) == before

    filler.unlink()
    deadline = time.monotonic() + 10
    while (resp := post(gw, token, chat("after"))).status_code == 503:
        assert time.monotonic() < deadline, "traffic did not resume"
        time.sleep(0.2)
    assert resp.status_code == 200
    gw.stop()
    key = (gw.state_dir / "audit-hmac.key").read_bytes().strip()
    log = tiny_disk / "audit" / "audit.jsonl"
    verified = audit.verify(log, key)
    assert verified.ok, verified.error
    gaps = [r for r in map(json.loads, log.read_text().splitlines())
            if r.get("event") == "audit.gap"]
    assert gaps and all(g["lost_records"] >= 1 for g in gaps)
