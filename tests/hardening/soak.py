"""Load, then kill -9 under load, then count: nothing is lost but the flows in flight at the kill.

One client process (asyncio + httpx) keeps `clients` streaming chat requests open against a real
gateway (policy + audit + recording) for `seconds`, sampling the mitmdump process's RSS every
second. Then the counts must agree exactly: requests sent = streams completed = audit records =
recorded flows = index rows. A second burst is cut by `kill -9` of the gateway; after a restart
and `douane sessions reindex`, every count of that burst may differ from the streams completed
only by the requests that were in flight at the kill.

`scripts/soak [--clients 200] [--seconds 60] [--kill-after 5]` prints the figures;
tests/hardening/test_load_and_kill.py runs a shorter soak and asserts them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from douane import audit
from douane.cli import main as douane
from douane.recording import index
from tests.support.gateway import Gateway, base_config
from tests.support.issuer import TestIssuer
from tests.support.upstream import FakeUpstream

UPSTREAM_KEY = "sk-soak-upstream-0123456789abcdefghijklmnop"
PATH = "/v1/chat/completions"
POLICY = """\
version: 1
default: {upstreams: {llm: {models: ["*"]}}}
rules:
  - {id: deny.codename, literal: "project nightingale", in: [prompt, completion], score: 90}
"""


@dataclass
class Burst:
    sent: int = 0
    completed: int = 0  # streams read to [DONE]
    failed: int = 0
    in_flight: int = 0
    in_flight_at_kill: int = 0
    latencies: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)  # failure kind -> count

    def fail(self, kind: str) -> None:
        self.failed += 1
        self.errors[kind] = self.errors.get(kind, 0) + 1


@dataclass
class Figures:
    clients: int
    seconds: float
    load: Burst
    kill: Burst
    rss_mb: list[float]  # one sample per second during the load burst
    audit_load: int = 0
    recorded_load: int = 0
    index_load: int = 0
    audit_kill: int = 0  # records of the kill burst
    recorded_kill: int = 0
    index_live_kill: int = 0  # rows the index held at the kill
    index_reindexed: int = 0  # rows after `douane sessions reindex` (both bursts)
    chain_ok: bool = False

    def report(self) -> str:
        lat = sorted(self.load.latencies) or [0.0]
        rss = self.rss_mb or [0.0]
        warm = rss[len(rss) // 4:] or rss
        return "\n".join([
            f"load: {self.clients} concurrent streaming clients for {self.seconds:.0f} s",
            f"  sent {self.load.sent}, completed {self.load.completed}, failed {self.load.failed}"
            f" ({self.load.completed / self.seconds:.0f} streams/s; p50 "
            f"{lat[len(lat) // 2] * 1000:.0f} ms, p99 {lat[int(len(lat) * 0.99)] * 1000:.0f} ms)"
            + (f" failures {self.load.errors}" if self.load.errors else ""),
            f"  audit records {self.audit_load}, recorded flows {self.recorded_load}, "
            f"index rows {self.index_load}",
            f"  mitmdump RSS MB: first {rss[0]:.1f}, after warm-up {warm[0]:.1f}, "
            f"max {max(rss):.1f}, last {rss[-1]:.1f} ({len(rss)} samples; every 10 s: "
            f"{', '.join(f'{x:.0f}' for x in rss[::10])})",
            f"kill -9 under load: sent {self.kill.sent}, completed {self.kill.completed}, "
            f"failed {self.kill.failed}, in flight at the kill {self.kill.in_flight_at_kill}"
            + (f" failures {self.kill.errors}" if self.kill.errors else ""),
            f"  audit records {self.audit_kill}, recorded flows {self.recorded_kill}, "
            f"index rows at the kill {self.index_live_kill}",
            f"  after restart + reindex: index rows {self.index_reindexed} "
            f"(= recorded flows {self.recorded_load + self.recorded_kill}), "
            f"audit chain {'intact' if self.chain_ok else 'BROKEN'}",
            f"lost (completed but not audited/recorded): load "
            f"{self.load.completed - min(self.audit_load, self.recorded_load)}, kill "
            f"{max(0, self.kill.completed - min(self.audit_kill, self.recorded_kill))}",
        ])


async def _client(http: httpx.AsyncClient, url: str, token: str, burst: Burst,
                  stop: asyncio.Event) -> None:
    body = {"model": "gpt-4o-mini", "stream": True,
            "messages": [{"role": "user", "content": "Summarise my account."}]}
    while not stop.is_set():
        burst.sent += 1
        burst.in_flight += 1
        started = time.perf_counter()
        try:
            async with http.stream("POST", url + PATH, json=body,
                                   headers={"authorization": f"Bearer {token}"}) as resp:
                data = await resp.aread()
            if resp.status_code == 200 and data.rstrip().endswith(b"data: [DONE]"):
                burst.completed += 1
                burst.latencies.append(time.perf_counter() - started)
            else:
                burst.fail(f"status {resp.status_code}" if resp.status_code != 200 else "cut")
        except httpx.HTTPError as e:
            burst.fail(type(e).__name__)
        finally:
            burst.in_flight -= 1


async def _burst(gw: Gateway, token: str, clients: int, seconds: float, *,
                 kill: bool = False, rss: list[float] | None = None) -> Burst:
    burst = Burst()
    stop = asyncio.Event()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=60) as http:
        tasks = [asyncio.create_task(_client(http, gw.url, token, burst, stop))
                 for _ in range(clients)]
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            await asyncio.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
            if rss is not None and gw.proc:
                rss.append(rss_mb(gw.proc.pid))
        if kill:
            burst.in_flight_at_kill = burst.in_flight
            gw.kill()
        stop.set()
        await asyncio.gather(*tasks)
    return burst


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def audited(gw: Gateway) -> int:
    """Audit records of chat requests (not the record of a torn line cut at restart)."""
    files = sorted(gw.audit_file().parent.glob("audit.jsonl*"))
    return sum(1 for f in files for line in f.read_text().splitlines()
               if line.strip() and json.loads(line).get("path") == PATH)


def recorded(gw: Gateway) -> int:
    return sum(1 for p in (gw.state_dir / "recordings").rglob("*.mitm")
               for _ in index.read_flows(p))


def index_rows(gw: Gateway) -> int:
    db = index.connect(gw.state_dir / "recordings" / "index.sqlite3")
    try:
        return db.execute("SELECT count(*) FROM flows").fetchone()[0]
    finally:
        db.close()


def settle(gw: Gateway, expected: int, timeout: float = 30) -> None:
    """Wait until the writer threads have caught up with `expected` flows."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (audited(gw) < expected or recorded(gw) < expected):
        time.sleep(0.2)


def soak(workdir: Path, clients: int = 200, seconds: float = 60, kill_after: float = 5,
         issuer: TestIssuer | None = None, secrets: set[str] | None = None) -> Figures:
    own_issuer = issuer is None
    issuer = issuer or TestIssuer()
    llm = FakeUpstream()
    llm.chunk_delay = 0.01  # ~10 events: each stream stays open ~0.1 s upstream
    llm.server.socket.listen(1024)  # socketserver's backlog of 5 drops bursts of connections
    llm.server.handle_error = lambda *args: None  # resets at the kill are expected
    (workdir / "policy.yaml").write_text(POLICY)
    config = base_config(issuer.url, llm.url, policy={"files": [str(workdir / "policy.yaml")]},
                         recording={})
    gw = Gateway(config, mode=f"reverse:{llm.url}", env={"DOUANE_TEST_UPSTREAM_KEY": UPSTREAM_KEY},
                 workdir=workdir / "gw")
    token = issuer.mint("soak@corp.example", ["engineering"], exp=int(time.time()) + 3600)
    if secrets is not None:
        secrets.update((token, UPSTREAM_KEY))
    try:
        rss: list[float] = []
        load = asyncio.run(_burst(gw, token, clients, seconds, rss=rss))
        figures = Figures(clients, seconds, load, Burst(), rss)
        settle(gw, load.completed)
        figures.audit_load, figures.recorded_load = audited(gw), recorded(gw)
        figures.index_load = index_rows(gw)

        figures.kill = asyncio.run(_burst(gw, token, clients, kill_after, kill=True))
        figures.audit_kill = audited(gw) - figures.audit_load
        figures.recorded_kill = recorded(gw) - figures.recorded_load
        figures.index_live_kill = index_rows(gw) - figures.index_load
        # keep the killed run's log aside, so start() waits for the new process to listen
        gw.log_file.rename(gw.log_file.with_suffix(".killed.log"))
        gw.start()  # cuts a torn audit line, records the cut, serves again
        gw.stop()
        douane(["sessions", "--config", str(gw.config_file), "reindex"])
        figures.index_reindexed = index_rows(gw)
        key = (gw.state_dir / "audit-hmac.key").read_bytes().strip()
        figures.chain_ok = audit.verify(gw.audit_file(), key).ok
        return figures
    finally:
        gw.stop()
        llm.close()
        if own_issuer:
            issuer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--kill-after", type=float, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="douane-soak-") as folder:
        print(soak(Path(folder), args.clients, args.seconds, args.kill_after).report())


if __name__ == "__main__":
    main()
