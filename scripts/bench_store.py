"""The shared store's cost per request (issue 20): a limits check counted in PostgreSQL (one upsert,
`SharedRateLimiter`) against the in-memory one (`RateLimiter`), on a throwaway PostgreSQL 15
cluster on this machine (tests/support/postgres.py). Sequential latency (p50, p99) and the rate
of 32 concurrent checks on one process's pool; each check is of a distinct user's key, under a
limit never reached (the common case), plus a hot key shared by all (the contended case).

    scripts/bench-store [CHECKS]
"""

from __future__ import annotations

import asyncio
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


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    cluster = PostgresCluster()
    try:
        asyncio.run(run(cluster.new_database(), n))
    finally:
        cluster.close()


if __name__ == "__main__":
    main()
