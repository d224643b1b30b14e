"""The shared store's cost per request (issue 20): a limits check counted in PostgreSQL (one upsert,
`SharedRateLimiter`) against the in-memory one (`RateLimiter`), on a throwaway PostgreSQL 15
cluster on this machine (tests/support/postgres.py). Sequential latency (p50, p99) and the rate
of 32 concurrent checks on one process's pool; each check is of a distinct user's key, under a
limit never reached (the common case), plus a hot key shared by all (the contended case). Then
end to end: a real mitmdump gateway with a limit, without and with `database:`, the same
sequential requests alternated between the two: p50, and CPU per request of the gateway process
and of the PostgreSQL cluster (on a loaded machine each round trip to the database also waits for
the scheduler to run the gateway again: latency there is not the store's cost, CPU is).

    scripts/bench-store [CHECKS] [REQUESTS]
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "addons"))

from douane.config import Database  # noqa: E402
from douane.interaction import Interaction, TextPiece  # noqa: E402
from douane.policy.limits import RateLimiter, SharedRateLimiter  # noqa: E402
from douane.policy.model import Limits  # noqa: E402
from douane.store.postgres import PgStore  # noqa: E402
from tests.support.postgres import PASSWORD, PostgresCluster  # noqa: E402

LIMITS = Limits(requests_per_minute=1_000_000, tokens_per_day=10**12)  # never reached
IT = Interaction("openai", "chat.completions", model="gpt-4o-mini", max_tokens=100,
                 texts=[TextPiece("prompt", "user", "hello " * 50, ("messages", 0))])


def figures(us: list[float]) -> str:
    us = sorted(us)
    return f"p50 {statistics.median(us):7.0f} µs   p99 {us[int(len(us) * 0.99)]:7.0f} µs"


async def run(url: str, n: int) -> None:
    # a limit of 1000/min: the hot key's window holds at most 1000 times
    hot_limits = Limits(requests_per_minute=1000, tokens_per_day=10**12)
    store = PgStore(Database(url.replace(f":{PASSWORD}@", "@"), PASSWORD, pool_size=10), "bench")
    store.start()
    while not store.ready:
        await asyncio.sleep(0.01)
    shared, local = SharedRateLimiter(store), RateLimiter()
    for i in range(200):  # warm the pool and the plan cache
        await shared.check(f"warm|{i}", LIMITS, IT)

    trip = []
    for _ in range(n):
        t = time.perf_counter()
        await store.fetchone("SELECT 1 AS one")
        trip.append((time.perf_counter() - t) * 1e6)
    mem = []
    for i in range(n):
        t = time.perf_counter()
        local.check(f"k|{i % 500}", LIMITS, IT)
        mem.append((time.perf_counter() - t) * 1e6)
    seq = []
    for i in range(n):
        t = time.perf_counter()
        assert await shared.check(f"user{i % 500}", LIMITS, IT) is None
        seq.append((time.perf_counter() - t) * 1e6)
    hot = []
    for _ in range(min(n, 900)):
        t = time.perf_counter()
        assert await shared.check("hot", hot_limits, IT) is None
        hot.append((time.perf_counter() - t) * 1e6)

    async def worker(w: int, count: int) -> None:
        for i in range(count):
            await shared.check(f"c{w}|{i % 50}", LIMITS, IT)

    started = time.perf_counter()
    await asyncio.gather(*(worker(w, n // 32) for w in range(32)))
    rate = (n // 32 * 32) / (time.perf_counter() - started)
    await store.close()
    print(f"in memory (RateLimiter)                     {figures(mem)}")
    print(f"PostgreSQL, SELECT 1 (the round trip alone) {figures(trip)}")
    print(f"PostgreSQL, sequential, distinct users      {figures(seq)}")
    print(f"PostgreSQL, sequential, one hot key (1000/min, window near full) {figures(hot)}")
    print(f"PostgreSQL, 32 concurrent on one pool of 10: {rate:,.0f} checks/s "
          f"({1e6 / rate:,.0f} µs of wall time per check)")


def cpu_seconds(*pids: int) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def cluster_pids(cluster: PostgresCluster) -> list[int]:
    """The postmaster and its children (the backends serving the gateway among them)."""
    main = int((cluster.data / "postmaster.pid").read_text().split()[0])
    children = Path(f"/proc/{main}/task/{main}/children").read_text().split()
    return [main, *map(int, children)]


def gateways(cluster: PostgresCluster, n: int) -> None:
    """One request through a gateway counting a limit in memory, and in PostgreSQL."""
    import httpx
    import yaml

    from tests.support.gateway import Gateway, base_config
    from tests.support.issuer import TestIssuer
    from tests.support.upstream import FakeUpstream

    url = cluster.new_database()
    issuer, llm = TestIssuer(), FakeUpstream()
    env = {"DOUANE_TEST_UPSTREAM_KEY": "sk-bench-0123456789abcdefghijklmnopqrstuv",
           "DOUANE_BENCH_DB_PASSWORD": PASSWORD}
    started: list[Gateway] = []
    try:
        for database in (None, {"url": url.replace(f":{PASSWORD}@", "@"),
                                "password": {"env": "DOUANE_BENCH_DB_PASSWORD"}}):
            gw = Gateway(base_config(issuer.url, llm.url + "/v1"), env=env, start=False)
            (gw.dir / "grants.yaml").write_text(yaml.safe_dump({"version": 1, "groups": {"eng": {
                "upstreams": {"llm": {"models": ["gpt-*"]}},
                "limits": {"requests_per_minute": 1_000_000, "tokens_per_day": 10**12}}}}))
            config = yaml.safe_load(gw.config_file.read_text())
            config["policy"] = {"files": [str(gw.dir / "grants.yaml")]}
            if database:
                config["database"] = database
            gw.config_file.write_text(yaml.safe_dump(config))
            started.append(gw.start())
        time.sleep(2)  # the store migrated, the pool open
        body = {"model": "gpt-4o-mini", "max_tokens": 50,
                "messages": [{"role": "user", "content": "hello"}]}
        times: list[list[float]] = [[], []]
        cpu = [0.0, 0.0, 0.0]  # gateway without, gateway with, the PostgreSQL cluster
        clients = [httpx.Client(proxy=gw.proxy_url("u", issuer.mint("bench@corp", ["eng"])),
                                timeout=30) for gw in started]
        for i in range(n + 50):
            if i == 50:  # after the warm-up
                cpu = [cpu_seconds(started[0].proc.pid), cpu_seconds(started[1].proc.pid),
                       cpu_seconds(*cluster_pids(cluster))]
            for which, c in enumerate(clients):
                t = time.perf_counter()
                assert c.post(llm.url + "/v1/chat/completions", json=body).status_code == 200
                if i >= 50:
                    times[which].append((time.perf_counter() - t) * 1e3)
        used = [(cpu_seconds(started[0].proc.pid) - cpu[0]) / n * 1e3,
                (cpu_seconds(started[1].proc.pid) - cpu[1]) / n * 1e3,
                (cpu_seconds(*cluster_pids(cluster)) - cpu[2]) / n * 1e3]
        mem, pg = (statistics.median(t) for t in times)
        print(f"gateway, limit counted in memory       p50 {mem:6.2f} ms, gateway CPU "
              f"{used[0]:.2f} ms/request ({n} requests)")
        print(f"gateway, limit counted in PostgreSQL   p50 {pg:6.2f} ms (+{pg - mem:.2f}), gateway "
              f"CPU {used[1]:.2f} ms/request (+{used[1] - used[0]:.2f}), PostgreSQL CPU "
              f"{used[2]:.2f} ms/request")
    finally:
        for gw in started:
            gw.stop()
        llm.close()
        issuer.close()


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    requests = int(sys.argv[2]) if len(sys.argv) > 2 else 300
    cluster = PostgresCluster()
    try:
        asyncio.run(run(cluster.new_database(), n))
        gateways(cluster, requests)
    finally:
        cluster.close()


if __name__ == "__main__":
    main()
