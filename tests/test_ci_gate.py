"""scripts/ci_gate.py for real: a real gateway in front of a tiny app test command that calls a fake
upstream with the openai SDK through the proxy environment the gate sets."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import UPSTREAM_KEY
from tests.support.gateway import REPO, base_config
from tests.support.upstream import DEFAULT_REPLY, FakeUpstream

APP = """
import os, sys, openai
client = openai.OpenAI(base_url=os.environ["APP_LLM_URL"] + "/v1", api_key="unused",
                       max_retries=0)
print("APP KEY:", os.environ.get("DOUANE_TEST_UPSTREAM_KEY"))
messages = [{"role": "user", "content": sys.argv[1]}]
try:
    if sys.argv[2:] == ["stream"]:
        stream = client.chat.completions.create(model="m", messages=messages, stream=True)
        print("ANSWER:", "".join(c.choices[0].delta.content or "" for c in stream if c.choices))
    else:
        answer = client.chat.completions.create(model="m", messages=messages)
        print("ANSWER:", answer.choices[0].message.content)
except openai.APIStatusError as e:
    print("REFUSED:", e.status_code)  # a sloppy test that swallows the error: the gate does not
except openai.APIConnectionError:
    print("NO ANSWER")
    sys.exit(1)
"""


@pytest.fixture
def setup(tmp_path):
    llm = FakeUpstream()
    (tmp_path / "grants.yaml").write_text(
        "version: 1\ngroups:\n  ci:\n    upstreams:\n      llm: {models: ['*']}\n"
        "rules:\n  - {id: deny.codename, literal: nightingale, score: 90}\n")
    config = base_config(None, llm.url, recording={},
                         policy={"files": [str(tmp_path / "grants.yaml")]},
                         gateway={"state_dir": str(tmp_path / "state")})
    (tmp_path / "douane.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "app.py").write_text(APP)
    yield tmp_path, llm
    llm.close()


def gate(work: Path, llm: FakeUpstream, prompt: str, *extra: str, key: bool = True,
         stream: bool = False) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "all_proxy")}
    env.pop("DOUANE_TEST_UPSTREAM_KEY", None)
    env.update(APP_LLM_URL=llm.url, **({"DOUANE_TEST_UPSTREAM_KEY": UPSTREAM_KEY} if key else {}))
    return subprocess.run([sys.executable, str(REPO / "scripts" / "ci_gate.py"),
                           "--config", str(work / "douane.yaml"), "--certs", str(work / "certs"),
                           "--log", str(work / "gateway.log"), *extra,
                           "--", sys.executable, str(work / "app.py"), prompt,
                           *(["stream"] if stream else [])],
                          capture_output=True, text=True, env=env, timeout=180)


def test_a_clean_run_passes_and_a_blocked_prompt_then_fails_the_job(setup):
    """One gateway's state for both runs (a gate start each): the clean run passes and the app
    never holds the key; a later blocked prompt fails its own job with its decision id, the
    earlier run not counted against it."""
    work, llm = setup
    run = gate(work, llm, "hello")
    assert run.returncode == 0, run.stderr + (work / "gateway.log").read_text()
    assert f"ANSWER: {DEFAULT_REPLY}" in run.stdout
    assert "APP KEY: douane-ci-no-key" in run.stdout and UPSTREAM_KEY not in run.stdout
    assert "1 decision(s) in this run: 1 allow" in run.stderr and "ci-gate: ok" in run.stderr
    assert llm.requests[0].headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    run = gate(work, llm, "what is project nightingale?")
    assert "REFUSED: 403" in run.stdout  # the app's own test passed...
    assert run.returncode == 3, run.stderr  # ...the job fails
    (line,) = [x for x in run.stderr.splitlines() if x.startswith("ci-gate: BLOCK")]
    decision_id = re.search(r"dcn_\w+", line).group(0)
    audit = (work / "state" / "audit" / "audit.jsonl").read_text()
    assert f'"decision_id":"{decision_id}"' in audit and "deny.codename" in line
    assert "1 request(s) refused by douane" in run.stderr
    assert len(llm.requests) == 1


def test_replay_answers_from_a_recording_with_the_upstream_stopped(setup):
    work, llm = setup
    llm.reply = "A recorded answer."
    assert gate(work, llm, "summarise the release").returncode == 0
    recorded = work / "llm.mitm"  # what docs/ci.md does: concatenate douane's recordings
    recorded.write_bytes(b"".join(p.read_bytes() for p in
                                  sorted((work / "state" / "recordings").rglob("*.mitm"))))
    llm.close()
    run = gate(work, llm, "summarise the release", "--replay", str(recorded), key=False)
    assert run.returncode == 0, run.stderr + (work / "gateway.log").read_text()
    assert "ANSWER: A recorded answer." in run.stdout
    # a request without a recorded answer is killed, never sent to a model
    run = gate(work, llm, "something new", "--replay", str(recorded), key=False)
    assert "NO ANSWER" in run.stdout and run.returncode == 1
    # a prompt the policy now refuses is refused, not answered from the recording
    grants = work / "grants.yaml"
    grants.write_text(grants.read_text() + "  - {id: deny.release, literal: 'the release', "
                      "score: 90}\n")
    run = gate(work, llm, "summarise the release", "--replay", str(recorded), key=False)
    assert "REFUSED: 403" in run.stdout and "recorded answer" not in run.stdout, run.stdout
    assert run.returncode == 3 and re.search(r"ci-gate: BLOCK dcn_\w+ 403 POST", run.stderr)
    assert len(llm.requests) == 1


def test_replay_answers_a_streamed_recording_through_the_same_inspection(setup):
    work, llm = setup
    llm.reply = "A recorded answer, streamed."
    assert gate(work, llm, "summarise the release", stream=True).returncode == 0
    recorded = work / "llm.mitm"
    recorded.write_bytes(b"".join(p.read_bytes() for p in
                                  sorted((work / "state" / "recordings").rglob("*.mitm"))))
    llm.close()
    run = gate(work, llm, "summarise the release", "--replay", str(recorded), key=False,
               stream=True)
    assert run.returncode == 0, run.stderr + (work / "gateway.log").read_text()
    assert "ANSWER: A recorded answer, streamed." in run.stdout
    # the replayed stream is policed as a live one: a rule added since blocks the recorded answer
    grants = work / "grants.yaml"
    grants.write_text(grants.read_text() + "  - {id: deny.release, literal: 'recorded answer', "
                      "score: 90, in: [completion]}\n")
    run = gate(work, llm, "summarise the release", "--replay", str(recorded), key=False,
               stream=True)
    assert "recorded answer" not in run.stdout and run.returncode == 1, run.stderr
    # the SDK read a valid stream ending in douane's error event, and the gate names the block
    assert "APIError: the answer was blocked by policy: deny rule deny.release" in run.stderr
    assert re.search(r"ci-gate: BLOCK dcn_\w+ 200 POST .*deny\.release", run.stderr)
    assert len(llm.requests) == 1
