"""The README's examples, run as written against a real gateway with the embedded default
configuration (`policies/default.yaml`, dev issuer, default grants). The build machine has no
network, so the default upstreams point at a local stand-in with `connect_to`; everything else is
the README's text: the Quick start's proxy-mode command, the quick tour's SDK snippet, the refusal,
`douane audit verify` and `douane sessions list`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import UPSTREAM_KEY
from tests.support.gateway import REPO, Gateway, free_port
from tests.support.upstream import DEFAULT_REPLY, FakeUpstream

README = (REPO / "README.md").read_text()
BIN = Path(sys.executable).parent


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, re.S)


def quick_start_command() -> str:
    """The Quick start's `$ python -c '...'` (proxy mode, HTTPS_PROXY and SSL_CERT_FILE set)."""
    return re.search(r"^\$ (python -c '.*?')\n```", README, re.S | re.M).group(1)


@pytest.fixture(scope="module")
def default_gateway(tmp_path_factory):
    work = tmp_path_factory.mktemp("readme")
    stand_in = FakeUpstream()
    config = yaml.safe_load((REPO / "policies" / "default.yaml").read_text())
    config["gateway"]["state_dir"] = str(work / "state")
    config["recording"]["dir"] = str(work / "state" / "recordings")
    config["audit"]["path"] = str(work / "state" / "audit" / "audit.jsonl")
    config["policy"]["files"] = [str(REPO / "policies" / "grants.yaml")]
    for upstream in config["upstreams"].values():
        upstream["connect_to"] = stand_in.url
    env = {"OPENAI_API_KEY": UPSTREAM_KEY, "ANTHROPIC_API_KEY": UPSTREAM_KEY}
    # and a second listener in regular (proxy) mode, as `scripts/run` starts it
    proxy_port = free_port()
    with Gateway(config, mode="reverse:https://api.openai.com", env=env, workdir=work / "gw",
                 args=["--mode", f"regular@{proxy_port}"]) as gw:
        yield gw, stand_in, proxy_port
    stand_in.close()


def douane(gw: Gateway, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([BIN / "douane", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "DOUANE_CONFIG": str(gw.config_file)})


def test_the_quick_tour_as_written(default_gateway, tmp_path):
    gw, stand_in, _ = default_gateway
    # 2. Get a token
    token = douane(gw, "token", "alice@example.com", "--groups", "engineering", "--ttl", "1h")
    assert token.returncode == 0, token.stderr
    env = {**os.environ, "TOKEN": token.stdout.strip()}
    # 3. A first request through the SDK (the README's block, on this gateway's port)
    [snippet] = python_blocks()
    script = tmp_path / "tour.py"
    script.write_text("import os\nimport openai\n" +
                      snippet.replace("http://127.0.0.1:8080", gw.url))
    run = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[0] == DEFAULT_REPLY
    assert re.fullmatch(r"decision: dcn_[0-9a-f]+", run.stdout.splitlines()[1])
    assert stand_in.requests[-1].headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    # 4. A refusal: a prompt carrying a credential never leaves
    before = len(stand_in.requests)
    script.write_text(script.read_text().replace(
        "What is the capital of France?", "my key is AKIAIOSFODNN7EXAMPLE, fix the bucket"))
    run = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True,
                         timeout=120)
    assert "openai.PermissionDeniedError: Error code: 403 - blocked by policy" in run.stderr
    assert len(stand_in.requests) == before
    # 5. The audit log
    verify = douane(gw, "audit", "verify")
    assert verify.returncode == 0 and verify.stdout.startswith("ok: "), verify
    # 6. The sessions
    gw.audit_records(wait_for=2)
    sessions = douane(gw, "sessions", "list")
    assert sessions.returncode == 0, sessions.stderr
    assert "alice@example.com" in sessions.stdout and "block" in sessions.stdout


def test_the_quick_start_proxy_command_as_written(default_gateway, tmp_path):
    gw, stand_in, proxy_port = default_gateway
    token = douane(gw, "token", "alice@example.com", "--groups", "engineering").stdout.strip()
    # the reader's `python` has the openai package: here, the test environment's
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("OPENAI_BASE_URL", None)
    # the gateway's proxy-mode listener
    env["HTTPS_PROXY"] = f"http://alice:{token}@127.0.0.1:{proxy_port}"
    env["SSL_CERT_FILE"] = str(gw.ca_file)
    run = subprocess.run(["bash", "-c", quick_start_command()], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert DEFAULT_REPLY in run.stdout
    assert stand_in.requests[-1].headers["host"] == "api.openai.com"
