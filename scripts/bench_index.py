"""Recording index benchmark: a million rows, then the queries `douane sessions list` runs.

`--postgres`: the fleet's index in the shared store instead (a throwaway PostgreSQL 15 cluster on
this machine, tests/support/postgres.py), inserted in the recording writer's batches: the cost of
a flow's index row there, paid by the writer process and the database, never by the gateway's loop.

    scripts/bench-index [ROWS] [--postgres]
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from douane.recording import index
from douane.recording.writer import BATCH_ROWS

REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def postgres() -> Iterator[Any]:
    sys.path.insert(0, str(REPO))
    import psycopg

    from douane.config import Database
    from douane.store.postgres import PgStore
    from tests.support.postgres import PASSWORD, PostgresCluster

    cluster = PostgresCluster()
    try:
        url = cluster.new_database()

        async def migrate() -> None:
            store = PgStore(Database(url.replace(f":{PASSWORD}@", "@"), PASSWORD), "bench")
            store.start()
            while not store.ready:
                await asyncio.sleep(0.05)
            await store.close()

        asyncio.run(migrate())
        with psycopg.connect(url, autocommit=True) as db:
            yield db
    finally:
        cluster.close()


def main() -> int:
    args = [a for a in sys.argv[1:] if a != "--postgres"]
    shared = "--postgres" in sys.argv
    rows = int(args[0]) if args else 100_000 if shared else 1_000_000
    rng = random.Random(3)
    with tempfile.TemporaryDirectory() as folder, \
            (postgres() if shared else contextlib.nullcontext()) as store:
        db = store or index.connect(Path(folder) / "index.sqlite3")
        batch_rows = BATCH_ROWS if shared else 50_000
        insert_time = 0.0
        now = time.time()
        start = time.perf_counter()
        batch = []
        for i in range(rows):
            batch.append({
                "flow_id": f"f{i}", "decision_id": f"dcn_{i:020d}",
                "ts": now - rng.random() * 90 * 86400, "user": f"user{rng.randint(0, 4999)}@corp",
                "groups": "eng", "upstream": rng.choice(["openai", "anthropic", "crm"]),
                "model": "gpt-4o", "operation": "chat.completions",
                "tool": rng.choice([None, None, "lookup_customer", "delete_records"]),
                "decision": rng.choices(["allow", "mask", "block", "hold"], [80, 12, 6, 2])[0],
                "risk": 0.0, "masked": 0, "masked_types": None, "status": 200, "latency_ms": 3.0,
                "file": "u/2026-01-01/conn-1.mitm", "offset": i * 4000,
                "replica": f"gw/w{i % 4 + 1}"})
            if len(batch) == batch_rows:
                t0 = time.perf_counter()
                index.insert(db, batch)
                insert_time += time.perf_counter() - t0
                batch = []
        if batch:
            t0 = time.perf_counter()
            index.insert(db, batch)
            insert_time += time.perf_counter() - t0
        print(f"inserted {rows:,} rows in {time.perf_counter() - start:.1f} s; the inserts "
              f"alone {insert_time:.1f} s, {insert_time / rows * 1e6:.0f} µs per row in batches "
              f"of {batch_rows}" + (" (the recording writer's)" if shared else ""))
        queries = {
            "user, last day": lambda: index.query(db, user=f"user{rng.randint(0, 4999)}@corp",
                                                  since=now - 86400),
            "user, all time": lambda: index.query(db, user=f"user{rng.randint(0, 4999)}@corp"),
            "blocks, last day": lambda: index.query(db, since=now - 86400, decision="block"),
            "by decision id": lambda: index.find(db, f"dcn_{rng.randint(0, rows - 1):020d}"),
        }
        for name, query in queries.items():
            times = []
            for _ in range(50):
                t0 = time.perf_counter()
                query()
                times.append((time.perf_counter() - t0) * 1000)
            times.sort()
            print(f"{name:<18} p50 {statistics.median(times):6.2f} ms   "
                  f"p99 {times[-1]:6.2f} ms   (target: well under 100 ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
