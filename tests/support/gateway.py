"""Start a real `mitmdump -s addons/gateway.py` for end-to-end tests."""

from __future__ import annotations

import atexit
import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from mitmproxy import certs

from tests.support.ready import READY

REPO = Path(__file__).resolve().parents[2]
MITMDUMP = Path(sys.executable).parent / "mitmdump"
_READY = re.compile(re.escape(READY) + r" on ports ([\d ]+)")  # not mitmweb's web server
# seconds a gateway may take to start: one with masking workers took over 60 s at load ~12 on
# 2 cores (CI shares its host). A start that fails exits and is reported at once, not at this.
START_SECONDS = 180


def free_port() -> int:
    """A loopback port free now (for a listener whose port a config must name in advance)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def terminate_group(proc: subprocess.Popen, timeout: float = 60) -> None:
    """SIGTERM to a process started in its own group (`scripts/run`), SIGKILL to the group if it
    has not stopped within `timeout`."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@functools.cache
def _ca_template() -> Path:
    """A CA made once per test process, copied into each new gateway's confdir: mitmproxy
    generating a 2048-bit RSA key at every start cost each gateway ~0.1-0.3 s of CPU."""
    folder = Path(tempfile.mkdtemp(prefix="douane-test-ca-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    certs.CertStore.from_store(folder, "mitmproxy", 2048)
    return folder


def base_config(issuer_url: str | None, upstream_url: str, *, audience: str = "douane-tests",
                protocol: str = "openai", key_env: str = "DOUANE_TEST_UPSTREAM_KEY",
                **sections: Any) -> dict[str, Any]:
    """A config accepting the test issuer's tokens, with one upstream named `llm`."""
    identity: dict[str, Any] = {"issuers": [{"issuer": issuer_url, "audience": audience}]} \
        if issuer_url else {"dev_issuer": {"enabled": True}}
    config = {"version": 1, "identity": identity,
              "upstreams": {"llm": {"url": upstream_url, "protocol": protocol,
                                    "credential": {"env": key_env}}}}
    config.update(sections)
    return config


class Gateway:
    """A mitmdump subprocess running douane.

    `config` is YAML text or a dict; `state_dir` defaults to a fresh temporary folder. `mode` is a
    mitmproxy mode ("regular", "reverse:http://127.0.0.1:PORT", ...). `env` adds environment
    variables (upstream credentials). The gateway's own confdir starts with a copy of the tests' CA.
    """

    def __init__(self, config: str | dict[str, Any], *, mode: str = "regular",
                 env: dict[str, str] | None = None, args: list[str] | None = None,
                 workdir: Path | None = None, start: bool = True,
                 timeout: float = START_SECONDS,
                 tool: str = "mitmdump") -> None:
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="douane-gw-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        if isinstance(config, dict):
            config = dict(config)
            config.setdefault("gateway", {}).setdefault("state_dir", str(self.dir / "state"))
            # the suite refuses many unauthenticated requests from 127.0.0.1 and reads their
            # records: none summarised unless a test asks (`douane.preauth`)
            audit = config["audit"] = dict(config.get("audit") or {})
            audit.setdefault("unauthenticated", {"per_peer": 1_000_000, "total": 10_000_000})
            config = yaml.safe_dump(config, sort_keys=False)
        self.config_file = self.dir / "douane.yaml"
        self.config_file.write_text(config)
        self.confdir = self.dir / "confdir"
        if not self.confdir.exists():
            shutil.copytree(_ca_template(), self.confdir)
        self.log_file = self.dir / "mitmdump.log"
        self.mode, self.args, self.timeout = mode, list(args or []), timeout
        self.tool = MITMDUMP.with_name(tool)  # or mitmweb, for the live console
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.port: int | None = None
        if start:
            self.start()

    @property
    def state_dir(self) -> Path:
        return Path(yaml.safe_load(self.config_file.read_text()).get("gateway", {})
                    .get("state_dir", self.dir / "state"))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def proxy_url(self, user: str = "", password: str = "") -> str:
        auth = f"{user}:{password}@" if password else ""
        return f"http://{auth}127.0.0.1:{self.port}"

    @property
    def ca_file(self) -> Path:
        return self.confdir / "mitmproxy-ca-cert.pem"

    def command(self) -> list[str]:
        return [str(self.tool), "-s", str(REPO / "addons" / "gateway.py"),
                "--set", f"douane_config={self.config_file}", "--set", f"confdir={self.confdir}",
                "--mode", self.mode, "--listen-host", "127.0.0.1", "--listen-port", "0",
                *self.args, "-s", str(REPO / "tests" / "support" / "ready.py")]

    def start(self) -> Gateway:
        log = self.log_file.open("ab")
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                     env=self.env, cwd=self.dir, start_new_session=True)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            # mitmproxy listens before it checks the addons' start-up errors: READY comes after
            # that check (tests/support/ready.py), a gateway whose configuration failed exits
            m = _READY.search(self.log_text())
            if m:
                self.port = int(m.group(1).split()[0])  # the first --mode's listener
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"mitmdump exited with {self.proc.returncode}:\n{self.log_text()}")
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"mitmdump did not start within {self.timeout}s:\n{self.log_text()}")

    def log_text(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def audit_file(self) -> Path:
        return self.state_dir / "audit" / "audit.jsonl"

    def audit_records(self, wait_for: int = 0, timeout: float = 5) -> list[dict[str, Any]]:
        """The audit log's records, waiting up to `timeout` until there are `wait_for` of them."""
        deadline = time.monotonic() + timeout
        while True:
            lines = self.audit_file().read_text().splitlines() if self.audit_file().exists() else []
            records = [json.loads(line) for line in lines if line.strip()]
            if len(records) >= wait_for or time.monotonic() > deadline:
                return records
            time.sleep(0.05)

    def audit_where(self, match: Callable[[dict[str, Any]], bool], count: int = 1,
                    timeout: float = 10) -> list[dict[str, Any]]:
        """The audit records that `match`, waiting up to `timeout` until there are `count` of them
        (records are written off the event loop, after the response may have left)."""
        deadline = time.monotonic() + timeout
        while True:
            found = [r for r in self.audit_records() if match(r)]
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(found)} matching audit records, expected {count}")
            time.sleep(0.05)

    def audit_record(self, decision_id: str, timeout: float = 10) -> dict[str, Any]:
        """The audit record of one decision, waiting up to `timeout` for it to be written."""
        return self.audit_where(lambda r: r.get("decision_id") == decision_id,
                                timeout=timeout)[0]

    def kill(self) -> None:
        """kill -9, as a crash would."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> Gateway:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
