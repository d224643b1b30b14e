"""Recording index benchmark: a million rows, then the queries `douane sessions list` runs."""

from __future__ import annotations

import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from douane.recording import index


def main() -> int:
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    rng = random.Random(3)
    with tempfile.TemporaryDirectory() as folder:
        db = index.connect(Path(folder) / "index.sqlite3")
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
                "file": "u/2026-01-01/conn-1.mitm", "offset": i * 4000})
            if len(batch) == 50_000:
                index.insert(db, batch)
                batch = []
        if batch:
            index.insert(db, batch)
        print(f"inserted {rows:,} rows in {time.perf_counter() - start:.1f} s")
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
