"""The operator CLI reads the gateway's configuration, needs no provider key, and says what it did."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from douane import audit
from douane import config as configmod
from douane.cli import main

DOUANE = Path(sys.executable).parent / "douane"


def gateway_config(tmp_path: Path, extra: str = "") -> Path:
    """A gateway config whose upstream key variable is not set where the operator runs."""
    (tmp_path / "grants.yaml").write_text(textwrap.dedent("""\
        version: 1
        default: {upstreams: {openai: {models: ["gpt-4o-mini"], max_tokens: 100}}}
        """))
    config = tmp_path / "douane.yaml"
    config.write_text(textwrap.dedent(f"""\
        version: 1
        gateway: {{state_dir: {tmp_path / 'state'}}}
        identity: {{dev_issuer: {{enabled: true}}}}
        upstreams:
          openai: {{url: "https://api.openai.com/v1", protocol: openai,
                   credential: {{env: DOUANE_TEST_UNSET_PROVIDER_KEY}}}}
        policy: {{files: [grants.yaml]}}
        recording: {{}}
        """) + extra)
    return config


def write_records(config: Path, n: int) -> None:
    loaded = configmod.load(config, gateway=False)
    log = audit.AuditLog(loaded.audit, audit.hmac_key(loaded))
    for i in range(n):
        log.append({"event": "decision", "decision_id": f"dcn_{i}"})
    log.close()


@pytest.fixture
def env(monkeypatch):
    monkeypatch.delenv("DOUANE_TEST_UNSET_PROVIDER_KEY", raising=False)
    monkeypatch.delenv("DOUANE_CONFIG", raising=False)
    return monkeypatch


def test_commands_read_douane_config_and_say_which_file(tmp_path, env, capsys):
    config = gateway_config(tmp_path)
    write_records(config, 3)
    env.setenv("DOUANE_CONFIG", str(config))
    assert main(["audit", "verify"]) == 0
    captured = capsys.readouterr()
    assert "ok: 3 record(s)" in captured.out
    assert f"douane: configuration {config}" in captured.err
    assert main(["sessions", "list"]) == 0
    assert f"douane: configuration {config}" in capsys.readouterr().err
    request = tmp_path / "req.json"
    request.write_text(json.dumps({"model": "gpt-4o", "max_tokens": 10,
                                   "messages": [{"role": "user", "content": "hi"}]}))
    # the policy of DOUANE_CONFIG answers (gpt-4o is not granted there), not the default's
    assert main(["explain", str(request), "--as", "bob@corp"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("decision: block") and "model gpt-4o is not granted" in out
    assert main(["token", "alice@corp"]) == 0
    assert capsys.readouterr().out.count(".") == 2  # a JWT
    # --config wins over the variable
    other = tmp_path / "other"
    other.mkdir()
    assert main(["audit", "verify", "--config", str(gateway_config(other))]) == 1
    assert "no audit log" in capsys.readouterr().out


def test_verify_of_a_missing_or_empty_log_fails_and_mints_no_key(tmp_path, env, capsys):
    config = gateway_config(tmp_path)
    assert main(["audit", "verify", "--config", str(config)]) == 1
    assert "FAIL: no audit log at" in capsys.readouterr().out
    assert not (tmp_path / "state" / "audit-hmac.key").exists()
    log = tmp_path / "state" / "audit" / "audit.jsonl"
    log.parent.mkdir(parents=True)
    log.write_text("")
    assert main(["audit", "verify", "--config", str(config)]) == 1
    assert "FAIL: no HMAC key at" in capsys.readouterr().out
    write_records(config, 0)  # creates the key, writes nothing
    assert main(["audit", "verify", "--config", str(config)]) == 1
    assert "holds no audit record" in capsys.readouterr().out


def test_verify_needs_the_configured_hmac_key(tmp_path, env, capsys):
    config = gateway_config(tmp_path, "audit: {hmac_key: {env: DOUANE_TEST_AUDIT_KEY}}\n")
    env.setenv("DOUANE_TEST_AUDIT_KEY", "k" * 32)
    write_records(config, 2)
    assert main(["audit", "verify", "--config", str(config)]) == 0
    env.delenv("DOUANE_TEST_AUDIT_KEY")
    assert main(["audit", "verify", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "audit.hmac_key: unknown env var DOUANE_TEST_AUDIT_KEY" in err


def test_gateway_still_needs_every_credential(tmp_path, env):
    with pytest.raises(configmod.ConfigError, match="unknown env var DOUANE_TEST_UNSET"):
        configmod.load(gateway_config(tmp_path))


def test_a_grant_for_an_undeclared_upstream_is_an_error_with_its_line(tmp_path, env, capsys):
    config = gateway_config(tmp_path)
    (tmp_path / "grants.yaml").write_text(textwrap.dedent("""\
        version: 1
        groups:
          eng:
            upstreams:
              openia: {models: ["gpt-4o"]}
        """))
    env.setenv("DOUANE_TEST_UNSET_PROVIDER_KEY", "sk-test")
    assert main(["check", str(config)]) == 1
    err = capsys.readouterr().err
    assert "grants.yaml:5 groups.eng.upstreams.openia: no upstream named 'openia' is " \
           "declared in the configuration (declared: openai)" in err


def test_a_closed_pipe_exits_quietly(tmp_path):
    # `douane ca env | head`: the reader is gone before the command writes
    proc = subprocess.Popen([DOUANE, "ca", "--dir", str(tmp_path), "env"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    err = proc.stderr.read()
    proc.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipe" not in err, err
