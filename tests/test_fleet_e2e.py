"""A fleet: `scripts/run --workers 3` (three real mitmdump replicas behind a real HAProxy) sharing
one real PostgreSQL. One cluster for the module; the tests run in file order and share it.

Held on one replica, approved through another's API: upstream once. A limit of 10/min allows 10
across the three. `douane sessions list` shows every replica's flows; `douane audit verify` catches
a record cut from the end of one replica's log. A replica killed under load: HAProxy takes it out,
the others serve, nothing answered is missing from the index or the audit logs but the last
moment's flows of the killed one. The database stopped under load: what needs it is refused in
the API's shape, the rest is served, and service (and the index) resume by themselves.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import psycopg
import pytest
import yaml

from douane import bursts
from douane.cli import main as cli
from tests.conftest import UPSTREAM_KEY
from tests.support.gateway import REPO, base_config, free_port, terminate_group
from tests.support.postgres import PASSWORD
from tests.support.upstream import DEFAULT_REPLY, FakeUpstream
from tests.test_approvals_e2e import HELD, Background, ask, call, pending_for
from tests.test_shared_store_e2e import GRANTS, LIMIT, refusal

pytestmark = pytest.mark.skipif(shutil.which("haproxy") is None,
                                reason="haproxy missing: scripts/test installs it (as root)")
REPLICA = "fleet"
# a group whose every request counts against a limit in the store, high enough never to bind
METERED = GRANTS.replace("rules:", """\
  metered:
    upstreams:
      llm: {models: ["gpt-*"], max_tokens: 1000}
    limits: {requests_per_minute: 100000}
rules:""")


@dataclass
class Worker:
    pid: int
    port: int
    admin: int
    api: str

    def ready(self) -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{self.admin}/healthz").status_code == 200
        except httpx.HTTPError:
            return False


@dataclass
class Fleet:
    run: subprocess.Popen[bytes]
    log: Path
    port: int
    config: Path
    state: Path
    llm: FakeUpstream
    database: str
    approvals: str  # the balancer's frontend for the approvals APIs
    workers: dict[str, Worker] = field(default_factory=dict)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def find_workers(self) -> None:
        for name, pid, port, admin, api in re.findall(
                r"worker (w\d) \(pid (\d+)\) on 127\.0\.0\.1:(\d+), /healthz on 127\.0\.0\.1:(\d+), "
                r"approvals API on (127\.0\.0\.1:\d+)", self.text()):
            self.workers[name] = Worker(int(pid), int(port), int(admin), f"http://{api}")

    def client(self, token: str, port: int | None = None) -> openai.OpenAI:
        """A client of one replica's proxy port, or (default) of the balancer's."""
        proxy = f"http://u:{token}@127.0.0.1:{port or self.port}"
        return openai.OpenAI(base_url=self.llm.url + "/v1", api_key="unused", max_retries=0,
                             timeout=60, http_client=openai.DefaultHttpxClient(proxy=proxy))

    def audit(self) -> list[dict]:
        return [json.loads(line) for path in sorted((self.state / "audit").glob("audit.w*.jsonl"))
                for line in path.read_text().splitlines() if line.strip()]

    def sql(self, query: str) -> list[tuple]:
        with psycopg.connect(self.database) as db:
            return db.execute(query).fetchall()


def wait_for(predicate, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def fleet(issuer, postgres, tmp_path_factory):
    work = tmp_path_factory.mktemp("fleet")
    database = postgres.new_database()
    llm = FakeUpstream()
    (work / "grants.yaml").write_text(METERED)
    approvals = f"127.0.0.1:{free_port()}"
    config = base_config(
        issuer.url, llm.url + "/v1", policy={"files": [str(work / "grants.yaml")]},
        approvals={"listen": approvals, "approver_groups": ["approvers"]},
        database={"url": database.replace(f":{PASSWORD}@", "@"), "timeout": 2,
                  "password": {"env": "DOUANE_TEST_DB_PASSWORD"}},
        recording={}, gateway={"state_dir": str(work / "state"), "replica": REPLICA})
    config["upstreams"]["quick"] = {"url": llm.url + "/v1/quick", "protocol": "openai",
                                    "credential": {"env": "DOUANE_TEST_UPSTREAM_KEY"}}
    (work / "douane.yaml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = work / "run.log"
    env = {**os.environ, "DOUANE_CONFIG": str(work / "douane.yaml"), "DOUANE_PORT": str(port),
           "DOUANE_TEST_UPSTREAM_KEY": UPSTREAM_KEY, "DOUANE_TEST_DB_PASSWORD": PASSWORD}
    with log.open("wb") as out:
        run = subprocess.Popen([str(REPO / "scripts" / "run"), "--workers", "3"], stdout=out,
                               stderr=subprocess.STDOUT, env=env, cwd=work,
                               start_new_session=True)
    fleet = Fleet(run, log, port, work / "douane.yaml", work / "state", llm, database,
                  f"http://{approvals}")
    os.environ["DOUANE_TEST_DB_PASSWORD"] = PASSWORD  # for the operator commands run here
    try:
        wait_for(lambda: "workers behind HAProxy" in fleet.text() or run.poll() is not None,
                 "the fleet", timeout=600)
        assert run.poll() is None, fleet.text()
        fleet.find_workers()
        assert set(fleet.workers) == {"w1", "w2", "w3"}, fleet.text()
        # ready: keys fetched, store migrated, writers up
        wait_for(lambda: all(w.ready() for w in fleet.workers.values()), "ready replicas", 300)
        yield fleet
    finally:
        del os.environ["DOUANE_TEST_DB_PASSWORD"]
        terminate_group(run)
        llm.close()
    assert PASSWORD not in fleet.text()
    assert "Traceback" not in fleet.text(), fleet.text()


def test_held_on_one_replica_approved_through_another_reaches_the_upstream_once(fleet, issuer):
    w1, w2, w3 = (fleet.workers[w] for w in ("w1", "w2", "w3"))
    bob = issuer.mint("bob@corp", ["approvers"])
    before = len(fleet.llm.requests)
    held = Background(lambda: ask(fleet.client(issuer.mint("alice@corp", ["engineering"]),
                                               w1.port), HELD))
    pending = pending_for(fleet.approvals, bob, "alice@corp")  # listed through the balancer
    assert len(fleet.llm.requests) == before
    status, doc = call(w2.api, bob, "POST", f"/approvals/{pending['id']}/approve",
                       {"reason": "fine"})
    assert status == 200 and doc["status"] == "approved"
    assert held.result() == DEFAULT_REPLY
    assert len(fleet.llm.requests) == before + 1
    assert call(w3.api, bob, "POST", f"/approvals/{pending['id']}/deny",
                {"reason": "late"})[0] == 409
    assert len(fleet.llm.requests) == before + 1


def test_a_limit_of_10_per_minute_allows_exactly_10_across_the_three(fleet, issuer):
    token = issuer.mint("lim@corp", ["limited"])
    clients = [fleet.client(token, w.port) for w in fleet.workers.values()]
    before = len(fleet.llm.requests)

    def one(i: int) -> str:
        try:
            return ask(clients[i % 3], f"question {i}")
        except openai.RateLimitError as e:
            assert refusal(e)[:2] == (429, "rate_limited")
            return "refused"

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(one, range(LIMIT + 8)))
    assert results.count(DEFAULT_REPLY) == LIMIT and results.count("refused") == 8
    assert len(fleet.llm.requests) == before + LIMIT


def decided(fleet: Fleet) -> set[str]:
    return {r["decision_id"] for r in fleet.audit() if r.get("event") == "decision"}


def indexed(fleet: Fleet) -> set[str]:
    return {r[0] for r in fleet.sql("SELECT decision_id FROM flows")}


def test_sessions_list_shows_every_flow_of_every_replica(fleet, capsys):
    ids = decided(fleet)
    wait_for(lambda: ids <= indexed(fleet), "every decision in the store's index", 30)
    assert cli(["sessions", "--config", str(fleet.config), "list", "--limit", "1000"]) == 0
    out = capsys.readouterr().out
    assert all(i in out for i in ids) and f"({len(indexed(fleet))} flow(s))" in out
    for w in ("w1", "w2", "w3"):
        assert f"{REPLICA}/{w}" in out
    # the recording of a flow of w3 is read from w3's folder on this host
    (flow,) = fleet.sql(f"SELECT decision_id FROM flows WHERE replica = '{REPLICA}/w3' "
                        "AND decision = 'allow' LIMIT 1")
    assert cli(["sessions", "--config", str(fleet.config), "show", flow[0]]) == 0
    assert "POST http://127.0.0.1" in capsys.readouterr().out


class Load:
    """Threads sending requests through the balancer, a new connection each; every answer kept
    with the time it came."""

    def __init__(self, fleet: Fleet, token: str, threads: int = 4):
        self.answers: list[tuple[float, int, str]] = []  # (monotonic, status, decision id)
        self.failures: list[float] = []
        self._stop = threading.Event()
        proxy = f"http://u:{token}@127.0.0.1:{fleet.port}"
        url = fleet.llm.url + "/v1/chat/completions"
        body = {"model": "gpt-4o-mini", "max_tokens": 10,
                "messages": [{"role": "user", "content": "hello"}]}

        def run() -> None:
            while not self._stop.is_set():
                try:
                    with httpx.Client(proxy=proxy, timeout=30) as c:
                        r = c.post(url, json=body)
                    self.answers.append((time.monotonic(), r.status_code,
                                         r.headers.get("x-douane-decision-id", "")))
                    if r.status_code != 200:
                        self.last_refusal = r.json()
                except httpx.HTTPError:
                    self.failures.append(time.monotonic())

        self.threads = [threading.Thread(target=run, daemon=True) for _ in range(threads)]
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self.threads:
            t.join(60)


def test_a_replica_killed_under_load(fleet, issuer):
    load = Load(fleet, issuer.mint("load@corp", ["engineering"]))
    try:
        wait_for(lambda: len(load.answers) >= 20, "traffic")
        downs = fleet.text().count("Server workers/w2 is DOWN")
        killed = time.monotonic()
        os.kill(fleet.workers["w2"].pid, signal.SIGKILL)
        wait_for(lambda: fleet.text().count("Server workers/w2 is DOWN") > downs,
                 "HAProxy to take w2 out")
        down = time.monotonic()
        wait_for(lambda: len([a for a in load.answers if a[0] > down + 0.5]) >= 20,
                 "the others to serve")
    finally:
        load.stop()
    assert all(status == 200 for at, status, _ in load.answers if at > down), \
        "HAProxy sent a request to the dead replica after taking it out"
    # at most the connections in flight to w2 when it died failed
    assert len(load.failures) <= 4 and all(t < down + 1 for t in load.failures)
    # every answer is in the audit logs and the index but the last moment's of the killed one
    answered = {d for _, status, d in load.answers if status == 200}
    recent = {d for at, _, d in load.answers if killed - 2 < at < down + 1}
    wait_for(lambda: answered - recent <= decided(fleet), "the audit records", 15)
    wait_for(lambda: answered - recent <= indexed(fleet), "the index rows", 30)
    # flows of w2 whose record was still in its writer's last burst (or queued) at the kill
    last_moment = {d for at, _, d in load.answers if killed - bursts.WINDOW - 0.5 < at}
    missing = answered - decided(fleet)
    assert missing <= last_moment, missing


def test_the_database_stopped_and_restarted_under_load(fleet, issuer, postgres):
    metered = issuer.mint("meter@corp", ["metered"])
    plain = Load(fleet, issuer.mint("plain@corp", ["engineering"]), threads=2)
    try:
        assert ask(fleet.client(metered), "before") == DEFAULT_REPLY
        with postgres.outage():
            outage = time.monotonic()
            for _ in range(3):  # what needs the store (a limit to count) is refused, clearly
                with pytest.raises(openai.InternalServerError) as e:
                    ask(fleet.client(metered), "during")
                status, code, decision_id = refusal(e.value)
                assert (status, code) == (503, "store_unavailable")
                assert decision_id in str(e.value)
            time.sleep(1)
        back = time.monotonic()
        # back by itself, no replica restarted
        wait_for(lambda: _answers(fleet.client(metered)), "the metered user served again")
        wait_for(lambda: len([a for a in plain.answers if a[0] > back + 1]) >= 5,
                 "traffic after the outage")
    finally:
        plain.stop()
    # what does not need the store was served throughout, and indexed once the store came back
    during = [a for a in plain.answers if outage < a[0] < back]
    assert during and all(status == 200 for _, status, _ in during)
    wait_for(lambda: {d for _, _, d in during} <= indexed(fleet), "the outage's index rows", 30)


def _answers(c: openai.OpenAI) -> bool:
    try:
        return ask(c, "after") == DEFAULT_REPLY
    except openai.InternalServerError:
        return False


def test_audit_verify_detects_a_record_cut_from_the_end_of_one_replicas_log(fleet, capsys):
    logs = {w: fleet.state / "audit" / f"audit.{w}.jsonl" for w in ("w1", "w2", "w3")}

    def current() -> bool:
        heads = dict(fleet.sql("SELECT replica, seq FROM audit_heads"))
        return all(heads.get(f"{REPLICA}/{w}") ==
                   json.loads(path.read_text().splitlines()[-1])["seq"]
                   for w, path in logs.items())

    wait_for(current, "every chain's head in the store", 30)
    verify = ["audit", "verify", "--config", str(fleet.config)]
    assert cli(verify) == 0
    out = capsys.readouterr().out
    assert all(f"ok {REPLICA}/{w}: " in out for w in logs), out
    lines = logs["w3"].read_bytes().splitlines(keepends=True)
    logs["w3"].write_bytes(b"".join(lines[:-1]))
    assert cli(verify) == 1
    out = capsys.readouterr().out
    assert f"FAIL {REPLICA}/w3: " in out and "records were cut from the end" in out
    assert f"ok {REPLICA}/w1: " in out
