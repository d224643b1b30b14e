"""`scripts/run --workers 2`: two real mitmdump workers behind a real HAProxy on one port."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from douane.cli import main as cli
from douane.config import ConfigError, load
from douane.settings import for_worker
from douane.workers import Worker, free_ports, haproxy_config, main
from tests.conftest import UPSTREAM_KEY
from tests.support.gateway import REPO, base_config, terminate_group
from tests.support.issuer import TestIssuer
from tests.support.upstream import FakeUpstream
from tests.test_admin_e2e import CHAT

pytestmark = pytest.mark.skipif(shutil.which("haproxy") is None,
                                reason="haproxy missing: scripts/test installs it (as root)")


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for(predicate, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_two_workers_behind_haproxy_share_the_port_and_restart_a_killed_worker(
        issuer: TestIssuer, llm: FakeUpstream, tmp_path):
    config = base_config(issuer.url, llm.url)
    config["gateway"] = {"state_dir": str(tmp_path / "state")}
    (tmp_path / "douane.yaml").write_text(yaml.safe_dump(config))
    (port,) = free_ports(1)
    log = tmp_path / "run.log"
    env = {**os.environ, "DOUANE_CONFIG": str(tmp_path / "douane.yaml"),
           "DOUANE_PORT": str(port), "DOUANE_TEST_UPSTREAM_KEY": UPSTREAM_KEY}
    with log.open("wb") as out:
        run = subprocess.Popen([str(REPO / "scripts" / "run"), "--workers", "2",
                                "--mode", f"reverse:{llm.url}"], stdout=out,
                               stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
                               start_new_session=True)
    try:
        wait_for(lambda: "workers behind HAProxy" in log.read_text() or run.poll() is not None,
                 "the workers", timeout=600)
        text = log.read_text()
        assert run.poll() is None, text
        pids = dict(re.findall(r"worker (w\d) \(pid (\d+)\)", text))
        assert set(pids) == {"w1", "w2"}
        token = issuer.mint("alice@corp.example")
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        headers = {"authorization": f"Bearer {token}"}
        # each request on a new connection: the balancer spreads connections
        wait_for(lambda: httpx.post(url, json=CHAT, headers=headers).status_code == 200,
                 "a first answer through HAProxy")
        for _ in range(8):
            assert httpx.post(url, json=CHAT, headers=headers).status_code == 200
        audit = tmp_path / "state" / "audit"
        w1, w2 = audit / "audit.w1.jsonl", audit / "audit.w2.jsonl"
        wait_for(lambda: len(records(w1)) + len(records(w2)) >= 9, "9 audit records")
        assert records(w1) and records(w2), "both workers get traffic"
        assert not (audit / "audit.jsonl").exists()

        os.kill(int(pids["w1"]), signal.SIGKILL)  # a crash
        wait_for(lambda: re.search(r"Server workers/w1 is DOWN", log.read_text()),
                 "HAProxy to take w1 out")
        for _ in range(6):  # served by w2 while w1 is down or starting again
            assert httpx.post(url, json=CHAT, headers=headers).status_code == 200
        assert re.search(r"worker w1 \(pid \d+\) exited \(code -9\); restarting",
                         log.read_text())
        wait_for(lambda: len(re.findall(r"Server workers/w1 is UP", log.read_text())) >= 1,
                 "the restarted w1 back in HAProxy", timeout=300)
        restarted = re.findall(r"worker w1 \(pid (\d+)\)", log.read_text())[-1]
        assert restarted != pids["w1"]
        served_by_w1 = len(records(w1))
        wait_for(lambda: httpx.post(url, json=CHAT, headers=headers).status_code == 200
                 and len(records(w1)) > served_by_w1, "the restarted w1 to serve again")
        # its chain goes on from where the killed process left it
        assert cli(["audit", "verify", "--config", str(tmp_path / "douane.yaml"),
                    "--log", str(w1)]) == 0
    finally:
        terminate_group(run)
    assert "Traceback" not in log.read_text()


def test_the_workers_ports_are_distinct():
    # 9 ports a round for 3 workers, asked 200 times: each port freed before the next was asked
    # for gave one twice now and then (two workers' admin listeners on one port)
    for _ in range(200):
        ports = free_ports(9)
        assert len(set(ports)) == 9, ports


def test_haproxy_accepts_the_written_config(tmp_path):
    cfg = tmp_path / "haproxy.cfg"
    port, approvals = free_ports(2)
    cfg.write_text(haproxy_config("127.0.0.1", port,
                                  [Worker("w1", 1001, 2001, 3001), Worker("w2", 1002, 2002, 3002)],
                                  ("127.0.0.1", approvals)))
    check = subprocess.run(["haproxy", "-c", "-f", str(cfg)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "server w2 127.0.0.1:1002 check port 2002" in cfg.read_text()
    assert "server w2 127.0.0.1:3002 check port 2002" in cfg.read_text()  # its approvals API


def test_more_than_one_worker_refuses_per_worker_approvals(tmp_path, capsys):
    file = tmp_path / "douane.yaml"
    file.write_text(yaml.safe_dump({**base_config(None, "http://127.0.0.1:9"),
                                    "approvals": {"approver_groups": ["security"]}}))
    assert main(["--workers", "2", "--config", str(file), "--confdir", str(tmp_path)]) == 2
    assert "no database (PostgreSQL)" in capsys.readouterr().err
    file.write_text(yaml.safe_dump({**base_config(None, "http://127.0.0.1:9"),
                                    "approvals": {"approver_groups": ["security"],
                                                  "listen": "127.0.0.1:0"},
                                    "database": "postgresql://douane@127.0.0.1:9/douane"}))
    assert main(["--workers", "2", "--config", str(file), "--confdir", str(tmp_path)]) == 2
    assert "approvals.listen needs a fixed port" in capsys.readouterr().err


def test_each_worker_writes_its_own_audit_chain_and_recordings(tmp_path):
    file = tmp_path / "douane.yaml"
    file.write_text(yaml.safe_dump({**base_config(None, "http://127.0.0.1:9"),
                                    "gateway": {"state_dir": str(tmp_path)}, "recording": {},
                                    "approvals": {"approver_groups": ["security"],
                                                  "listen": "0.0.0.0:8181"}}))
    config = load(str(file), gateway=False)
    w2 = for_worker(config, "w2", approvals_port=3002)
    assert w2.audit.path == tmp_path / "audit" / "audit.w2.jsonl"
    assert w2.sections["recording"].dir == tmp_path / "recordings" / "w2"
    assert config.audit.path == tmp_path / "audit" / "audit.jsonl"  # the original is unchanged
    assert config.sections["recording"].dir == tmp_path / "recordings"
    assert (w2.sections["approvals"].host, w2.sections["approvals"].port) == ("127.0.0.1", 3002)
    assert w2.sections["approvals"].public_url == "http://0.0.0.0:8181"  # links: the balancer
    assert (w2.replica, config.replica) == (f"{config.host}/w2", config.host)


@pytest.mark.parametrize("name, ok", [("gw-1.eu", True), ("a/b", False), ("-x", False),
                                      ("x" * 64, False)])
def test_a_replica_is_named_in_the_config(tmp_path, name, ok):
    file = tmp_path / "douane.yaml"
    file.write_text(yaml.safe_dump({**base_config(None, "http://127.0.0.1:9"),
                                    "gateway": {"replica": name}}))
    if ok:
        assert load(str(file), gateway=False).replica == name
    else:
        with pytest.raises(ConfigError, match="replica"):
            load(str(file), gateway=False)
