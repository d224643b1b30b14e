"""What recording costs the request path: bare mitmdump, douane without recording, douane with
recording; requests at concurrency 1 and 32, and each gateway's start time.

The component method of docs/benchmarks.md, with the CPU of the gateway's own process ("parent")
and of its live child processes (the recording writer) counted apart: the children are running,
so /proc's cumulative child times (reaped children only) would miss them.
Usage: python scripts/bench_recording.py [requests at concurrency 1] [requests at 32]
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from bench_gateway import (
    CHAT,
    ROOT,
    Proxy,
    bench_config,
    cpu_seconds,
    descendants,
    free_port,
    load,
    wait_port,
)

from douane import config as configmod
from douane import devissuer


def cpu(pid: int) -> tuple[float, float]:
    """(CPU seconds of the process itself, of its live descendants)."""
    return cpu_seconds(pid), sum(cpu_seconds(c) for c in descendants(pid))


def main() -> int:
    counts = {1: int(sys.argv[1]) if len(sys.argv) > 1 else 600,
              32: int(sys.argv[2]) if len(sys.argv) > 2 else 2000}
    work = Path(tempfile.mkdtemp(prefix="douane-bench-rec-"))
    upstream_port = free_port()
    upstream = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "bench_upstream.py"),
                                 str(upstream_port)])
    wait_port(upstream_port)
    config = bench_config(work, upstream_port, masking=False)
    without = {k: v for k, v in config.items() if k != "recording"}
    (work / "cfg.yaml").write_text(yaml.safe_dump(config))
    dev = configmod.load(work / "cfg.yaml", gateway=False).identity.dev_issuer
    token = devissuer.mint(dev, "bench@corp", ["bench"], 3600)
    print(f"{'variant':<22} {'conc':>4} {'n':>5} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'cpu/req ms':>10} {'child cpu/req ms':>16} {'start s':>7}", flush=True)
    try:
        for name, cfg in (("bare mitmdump", None), ("douane, no recording", without),
                          ("douane", config)):
            started = time.perf_counter()
            proxy = Proxy(name.replace(" ", "_").replace(",", ""), upstream_port, work, cfg)
            start = time.perf_counter() - started
            tok = token if cfg is not None else None
            asyncio.run(load(proxy.port, "/v1/chat/completions", CHAT, tok, 50, 2, False))
            time.sleep(1)  # the writer's start-up CPU is not the requests'
            for concurrency, total in counts.items():
                before = cpu(proxy.proc.pid)
                elapsed, latencies, _ = asyncio.run(load(
                    proxy.port, "/v1/chat/completions", CHAT, tok, total, concurrency, False))
                time.sleep(0.5)  # what the writer still has queued is the requests' CPU too
                after = cpu(proxy.proc.pid)
                latencies.sort()
                print(f"{name:<22} {concurrency:>4} {total:>5} {total / elapsed:>7.1f} "
                      f"{statistics.median(latencies) * 1000:>7.2f} "
                      f"{latencies[int(len(latencies) * 0.99)] * 1000:>7.2f} "
                      f"{(after[0] - before[0]) / total * 1000:>10.2f} "
                      f"{(after[1] - before[1]) / total * 1000:>16.2f} {start:>7.2f}",
                      flush=True)
            proxy.stop()
    finally:
        upstream.terminate()
        upstream.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
