"""What recording and audit cost per request, process by process: bare mitmdump, douane without
recording, douane (audit and recording), and optionally douane from another tree (`--base`, a
checkout such as main's, to compare two trees in one run); wrk at 1 and 32 connections.

Each row splits the CPU per request (µs) of all the gateway's processes: its main thread (the
event loop: hooks, the snapshot and the hand-offs), its other threads (the audit writer, the
recording feeder), and its child processes (the recording writer); counted from wrk's start until
they are idle again (what a writer defers counts in the row that caused it). Interleaved: each
round runs every variant in turn (the order rotated), so load from elsewhere on the machine falls
on all alike; a row is the median of the rounds. The load average is printed before and after.
Usage: scripts/bench-recording [--rounds N] [--seconds S] [--protocols openai,anthropic,mcp]
                               [--base TREE] [--connections 1,32]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from bench_gateway import (
    PROTOCOLS,
    ROOT,
    Proxy,
    bench_config,
    cpu_seconds,
    descendants,
    free_port,
    ready,
    wait_port,
    wrk,
    wrk_script,
)

from douane import config as configmod
from douane import devissuer

PARTS = ("main thread", "other threads", "children")


def thread_seconds(pid: int, tid: int) -> float:
    fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def parts(pid: int) -> tuple[float, float, float]:
    """CPU seconds of (the main thread, the process's other threads, its live descendants)."""
    main, whole = thread_seconds(pid, pid), cpu_seconds(pid)
    return main, whole - main, sum(cpu_seconds(c) for c in descendants(pid))


def settled(pid: int, limit: float = 3.0) -> tuple[float, float, float]:
    """`parts` once the processes are idle again (a tenth of a second spending at most a tick)."""
    now, tick = parts(pid), 1.5 / os.sysconf("SC_CLK_TCK")
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        time.sleep(0.1)
        later = parts(pid)
        if sum(later) - sum(now) <= tick:
            return later
        now = later
    return now


def named_threads(pid: int) -> dict[str, tuple[float, int]]:
    """Per thread name (the main thread apart): (CPU seconds, voluntary context switches, i.e.
    sleeps it woke from) summed over the process's live threads of that name."""
    found: dict[str, tuple[float, int]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = "main" if int(task.name) == pid else (task / "comm").read_text().strip()
            wakes = int(re.search(r"^voluntary_ctxt_switches:\s+(\d+)",
                                  (task / "status").read_text(), re.M)[1])
            cpu = thread_seconds(pid, int(task.name))
        except (OSError, TypeError):  # the thread ended meanwhile
            continue
        had = found.get(name, (0.0, 0))
        found[name] = (had[0] + cpu, had[1] + wakes)
    return found


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def start_upstream(work: Path) -> tuple[subprocess.Popen, int, dict, str]:
    """The bench's upstream started, douane's configuration onto it (masking off) written to
    `work`/cfg.yaml, and a token of its dev issuer."""
    upstream_port = free_port()
    upstream = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "bench_upstream.py"),
                                 str(upstream_port)])
    wait_port(upstream_port)
    config = bench_config(work, upstream_port, masking=False)
    (work / "cfg.yaml").write_text(yaml.safe_dump(config))
    dev = configmod.load(work / "cfg.yaml", gateway=False).identity.dev_issuer
    return upstream, upstream_port, config, devissuer.mint(dev, "bench@corp", ["bench"], 3600)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=3)
    ap.add_argument("--protocols", default="openai")
    ap.add_argument("--connections", default="1,32")
    ap.add_argument("--base", type=Path, action="append", default=[],
                    help="another tree's douane, measured beside this one (repeatable: the first "
                    "is the variant `base`, others are named by their folder)")
    ap.add_argument("--threads", action="store_true", help="also each thread's CPU and wakes "
                    "(voluntary context switches) per request, by thread name")
    ap.add_argument("--only", default="", help="variants to run, comma-separated: bare, "
                    "norec, douane, base (default: all)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="douane-bench-rec-"))
    upstream, upstream_port, config, token = start_upstream(work)
    variants: list[tuple[str, dict | None, Path]] = [
        ("bare", None, ROOT), ("norec", {k: v for k, v in config.items() if k != "recording"},
                               ROOT), ("douane", config, ROOT)]
    for i, tree in enumerate(args.base):
        variants.append(("base" if i == 0 else tree.name, config, tree.resolve()))
    if args.only:
        variants = [v for v in variants if v[0] in args.only.split(",")]
    protocols = args.protocols.split(",")
    connections = [int(c) for c in args.connections.split(",")]
    print(f"load average before: {loadavg()}", flush=True)
    proxies: dict[str, Proxy] = {}
    try:
        for name, cfg, root in variants:
            # as deployed: no loop figures (bare mitmdump runs no probe either)
            extra = ("-s", str(ROOT / "scripts" / "threadnames.py")) if args.threads else ()
            proxies[name] = Proxy(name, upstream_port, work, cfg, extra=extra, root=root,
                                  figures=False)
            ready(proxies[name].port, token if cfg else None, False)
        runs: dict[tuple[str, str, int], list[tuple[float, tuple[float, ...], float]]] = {}
        threads: dict[tuple[str, str, int], list[dict[str, tuple[float, float]]]] = {}
        for r in range(args.rounds):
            for protocol in protocols:
                path, body = PROTOCOLS[protocol]
                for c in connections:
                    order = variants[r % len(variants):] + variants[:r % len(variants)]
                    for name, cfg, _ in order:
                        proxy = proxies[name]
                        script = wrk_script(work, body, token if cfg else None)
                        before = settled(proxy.pid)
                        named = named_threads(proxy.pid)
                        result = wrk(proxy.port, path, script, c, args.seconds)
                        after = settled(proxy.pid)
                        if not result.requests:  # (a host too loaded: nothing answered in time)
                            print(f"{name} {protocol} c={c}: no request completed", flush=True)
                            continue
                        threads.setdefault((name, protocol, c), []).append({
                            thread: ((cpu - named.get(thread, (0, 0))[0]) / result.requests * 1e6,
                                     (wakes - named.get(thread, (0, 0))[1]) / result.requests)
                            for thread, (cpu, wakes) in named_threads(proxy.pid).items()})
                        per = tuple((a - b) / result.requests * 1e6
                                    for a, b in zip(after, before, strict=True))
                        runs.setdefault((name, protocol, c), []).append(
                            (result.rps, per, result.p50_ms))
            print(f"round {r + 1}/{args.rounds} done (load average {loadavg()})", flush=True)
    finally:
        for proxy in proxies.values():
            proxy.stop()
        upstream.terminate()
        upstream.wait()
    print(f"\nload average after: {loadavg()}; medians of {args.rounds} rounds of "
          f"{args.seconds} s; CPU in µs per request")
    print(f"| variant | protocol | conns | req/s | p50 ms | {' | '.join(PARTS)} | all | "
          "all vs bare |\n|---|---|---|---|---|---|---|---|---|---|")
    for protocol in protocols:
        for c in connections:
            bare = runs.get(("bare", protocol, c))
            bare_all = statistics.median(sum(p) for _, p, _ in bare) if bare else None
            for name, _, _ in variants:
                cell = runs[name, protocol, c]
                split = [statistics.median(p[i] for _, p, _ in cell) for i in range(len(PARTS))]
                total = statistics.median(sum(p) for _, p, _ in cell)
                ratio = f"{total / bare_all:.2f}x" if bare_all else "-"
                print(f"| {name} | {protocol} | {c} | "
                      f"{statistics.median(rps for rps, _, _ in cell):.0f} | "
                      f"{statistics.median(p50 for _, _, p50 in cell):.2f} | "
                      f"{' | '.join(f'{v:.0f}' for v in split)} | {total:.0f} | {ratio} |")
    if args.threads:
        print("\nper thread (medians): CPU µs / wakes per request\n"
              "| variant | protocol | conns | threads |\n|---|---|---|---|")
        for (name, protocol, c), cells in threads.items():
            names = sorted({t for cell in cells for t in cell})
            print(f"| {name} | {protocol} | {c} | " + ", ".join(
                f"{t} {statistics.median(cell.get(t, (0, 0))[0] for cell in cells):.0f}/"
                f"{statistics.median(cell.get(t, (0, 0))[1] for cell in cells):.3f}"
                for t in names) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
