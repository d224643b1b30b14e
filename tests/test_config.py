"""Configuration loading: valid files parse, invalid ones say file, line and key path."""

from __future__ import annotations

import subprocess

import pytest

from douane import config as configmod
from douane.cli import main

BASE = """\
version: 1
identity:
  dev_issuer: {enabled: true}
upstreams:
  openai:
    url: https://api.openai.com/v1
    protocol: openai
    credential: {env: DOUANE_TEST_KEY}
"""


def write(tmp_path, text: str):
    path = tmp_path / "douane.yaml"
    path.write_text(text)
    return path


def test_valid_config(tmp_path, monkeypatch):
    monkeypatch.setenv("DOUANE_TEST_KEY", "sk-secret")
    config = configmod.load(write(tmp_path, BASE))
    (openai,) = config.upstreams
    assert (openai.host, openai.port, openai.path_prefix) == ("api.openai.com", 443, "/v1")
    assert openai.credential.header == "authorization"
    assert openai.credential.value == "Bearer sk-secret"
    assert "sk-secret" not in repr(openai)
    assert config.upstream_for("api.openai.com", 443, "/v1/chat/completions") is openai
    assert config.upstream_for("api.openai.com", 443, "/v2/x") is None
    assert config.upstream_for("api.openai.com", 80, "/v1/x") is None


@pytest.mark.parametrize(("text", "expected"), [
    (BASE, "douane.yaml:8 upstreams.openai.credential.env: unknown env var DOUANE_TEST_KEY"),
    (BASE.replace("protocol: openai", "protocol: opnai"),
     "douane.yaml:7 upstreams.openai.protocol: unknown protocol 'opnai'"),
    (BASE.replace("url: https://api.openai.com/v1", "url: api.openai.com"),
     "douane.yaml:6 upstreams.openai.url: expected an http(s) URL"),
    (BASE + "audti: {}\n", "douane.yaml:9 audti: unknown key"),
    (BASE + "audit:\n  backups: many\n", "douane.yaml:10 audit.backups: expected an integer"),
    (BASE + "audit:\n  unauthenticated: {per_peer: -1}\n",
     "douane.yaml:10 audit.unauthenticated.per_peer: expected an integer from 0 to 1000000"),
    (BASE + "audit:\n  unauthenticated: {window_seconds: 0}\n",
     "douane.yaml:10 audit.unauthenticated.window_seconds: expected an integer from 1 to 86400"),
    (BASE + "audit:\n  unauthenticated: {peers: 1000001}\n",
     "douane.yaml:10 audit.unauthenticated.peers: expected an integer from 1 to 100000"),
    (BASE + "audit:\n  unauthenticated: {per_peer: 50, total: 10}\n",
     "douane.yaml:10 audit.unauthenticated.total: expected at least per_peer"),
    (BASE + "audit:\n  unauthenticated: {per_per: 5}\n",
     "douane.yaml:10 audit.unauthenticated.per_per: unknown key"),
    (BASE.replace("dev_issuer: {enabled: true}", "issuers:\n    - {issuer: x, audience: a, "
                  "algorithms: [HS256]}"),
     "douane.yaml:4 identity.issuers.0.algorithms: HS256 is not allowed"),
    (BASE.replace("dev_issuer: {enabled: true}", "issuers:\n    - {issuer: x, audience: a, "
                  "client_id: cli, resource: https://b}"),
     "douane.yaml:4 identity.issuers.0.resource: must be one of this issuer's audience"),
    (BASE + "    credentials: {per_user: true}\n",
     "douane.yaml:9 upstreams.openai.credentials.per_user: a per-user credential is the only one"),
    (BASE + "    credentials:\n      by_group: {a: {env: DOUANE_TEST_KEY, header: x-k}}\n",
     "douane.yaml:10 upstreams.openai.credentials.by_group.a: header and format are the"),
    (BASE + "    credentials: {by_group: {a: {value: k}}}\n",
     "douane.yaml:9 upstreams.openai.credentials.by_group.a.value: unknown key"),
    (BASE + "    credentials: {per_usr: true}\n",
     "douane.yaml:9 upstreams.openai.credentials.per_usr: unknown key"),
    (BASE + "gateway:\n  timeouts: {answer_head: 0}\n",
     "douane.yaml:10 gateway.timeouts.answer_head: must be at least 1 second"),
    (BASE + "gateway:\n  timeouts: {mcp_silence: soon}\n",
     "douane.yaml:10 gateway.timeouts.mcp_silence: expected an integer"),
    ("version: 1\nidentity: {}\n", "douane.yaml:2 identity: no way to authenticate"),
    ("version: 1\n  bad: [indent\n", "douane.yaml:2: invalid YAML"),
    ("version: 1\nversion: 2\n", "douane.yaml:2 version: duplicate key"),
])
def test_errors_name_file_line_and_key(tmp_path, monkeypatch, text, expected):
    if "DOUANE_TEST_KEY" in expected:
        monkeypatch.delenv("DOUANE_TEST_KEY", raising=False)
    else:
        monkeypatch.setenv("DOUANE_TEST_KEY", "k")
    with pytest.raises(configmod.ConfigError) as err:
        configmod.load(write(tmp_path, text))
    assert str(err.value).removeprefix(f"{tmp_path}/").startswith(expected)


def test_douane_check_prints_the_same_error(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DOUANE_TEST_KEY", raising=False)
    assert main(["check", str(write(tmp_path, BASE))]) == 1
    assert "douane.yaml:8 upstreams.openai.credential.env: unknown env var DOUANE_TEST_KEY" in \
        capsys.readouterr().err


def test_optional_credential_may_be_absent(tmp_path, monkeypatch):
    monkeypatch.delenv("DOUANE_TEST_KEY", raising=False)
    text = BASE.replace("{env: DOUANE_TEST_KEY}", "{env: DOUANE_TEST_KEY, optional: true}")
    (openai,) = configmod.load(write(tmp_path, text)).upstreams
    assert openai.credential.value is None


def test_the_shipped_default_config_is_valid():
    assert main(["check"]) == 0


def test_gateway_refuses_to_start_on_an_invalid_config(tmp_path, monkeypatch):
    from tests.support.gateway import Gateway

    monkeypatch.delenv("DOUANE_TEST_KEY", raising=False)
    gw = Gateway(BASE, workdir=tmp_path, start=False)
    assert exit_code(gw) == 1
    assert "upstreams.openai.credential.env: unknown env var DOUANE_TEST_KEY" in gw.log_text()


def test_gateway_refuses_a_misspelled_douane_option(tmp_path, monkeypatch):
    from tests.support.gateway import Gateway

    monkeypatch.setenv("DOUANE_TEST_KEY", "k")
    gw = Gateway(BASE, workdir=tmp_path, args=["--set", "douane_confg=x"], start=False)
    assert exit_code(gw) == 1
    assert "unknown option(s) douane_confg" in gw.log_text()


def exit_code(gw) -> int:
    """Start the gateway's process and wait for it to exit by itself."""
    with gw.log_file.open("ab") as log:
        proc = subprocess.Popen(gw.command(), stdout=log, stderr=subprocess.STDOUT, env=gw.env,
                                cwd=gw.dir)
    try:
        return proc.wait(30)
    finally:
        proc.kill()
