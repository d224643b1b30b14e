"""What douane costs on the wire, side by side in one run: direct to the upstream, bare mitmdump,
douane (identity + policy + audit + recording), douane + masking; requests and streams.

Fixed request counts (bounded); every server on 127.0.0.1; stops by itself. Prints a table and
ratios against bare mitmdump, and writes docs/benchmarks.md unless --no-write.
Usage: python scripts/bench_gateway.py [--quick] [--no-write]
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import yaml

from douane import config as configmod
from douane import devissuer

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CHAT = json.dumps({"model": "gpt-4o-mini", "max_tokens": 100,
                   "messages": [{"role": "user", "content": "Summarise my account."}]}).encode()
STREAM = json.dumps({"model": "gpt-4o-mini", "max_tokens": 100, "stream": True,
                     "messages": [{"role": "user", "content": "Summarise my account."}]}).encode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) of one live process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            found += [int(child), *descendants(int(child))]
    return found


def proc_stats(pid: int) -> tuple[float, int]:
    """CPU seconds (user + system) of a process and all its processes, live (the recording
    writer, the masking workers) or exited, and its peak RSS in KiB."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    exited = (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")
    live = sum(cpu_seconds(child) for child in descendants(pid))
    hwm = int(re.search(r"VmHWM:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1))
    return cpu_seconds(pid) + exited + live, hwm


async def one_request(reader, writer, path: str, body: bytes, token: str | None,
                      stream: bool) -> tuple[float, float]:
    """(time to first body byte, total) for one keep-alive HTTP/1.1 request."""
    auth = f"authorization: Bearer {token}\r\n" if token else ""
    start = time.perf_counter()
    writer.write(f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                 f"{auth}content-length: {len(body)}\r\n\r\n".encode() + body)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if status != 200:
        raise RuntimeError(f"status {status}: {head[:200]!r}")
    length = re.search(rb"(?i)content-length: (\d+)", head)
    if length:
        await reader.readexactly(int(length.group(1)))
        first = time.perf_counter()
    else:  # chunked: read chunks until the terminator; the first data chunk is the first token
        first = None
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            data = await reader.readexactly(size + 2)
            if first is None and b'"content": "' in data and b'"content": ""' not in data:
                first = time.perf_counter()
            if size == 0:
                break
        first = first or time.perf_counter()
    end = time.perf_counter()
    return first - start, end - start


async def load(port: int, path: str, body: bytes, token: str | None, total: int,
               concurrency: int, stream: bool) -> tuple[float, list[float], list[float]]:
    latencies: list[float] = []
    ttfts: list[float] = []
    remaining = [total]

    async def worker() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while remaining[0] > 0:
            remaining[0] -= 1
            ttft, latency = await one_request(reader, writer, path, body, token, stream)
            ttfts.append(ttft)
            latencies.append(latency)
        writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - start, latencies, ttfts


@dataclass
class Result:
    variant: str
    mode: str
    concurrency: int
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    ttft_p50_ms: float
    cpu_per_1000: float | None
    rss_mib: float | None
    loop_max_ms: float | None


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))]


class Proxy:
    """A mitmdump process: bare, or with douane and a given config."""

    def __init__(self, name: str, upstream_port: int, work: Path, config: dict | None):
        self.name, self.port, self.work = name, free_port(), work
        self.loop_stats = work / f"{name}-loop.json"
        args = [str(BIN / "mitmdump"), "-q", "--mode", f"reverse:http://127.0.0.1:{upstream_port}",
                "--listen-host", "127.0.0.1", "--listen-port", str(self.port),
                "--set", f"confdir={work / 'confdir'}"]
        if config is not None:
            path = work / f"{name}.yaml"
            path.write_text(yaml.safe_dump(config))
            args += ["-s", str(ROOT / "addons" / "gateway.py"), "--set", f"douane_config={path}",
                     "--set", f"douane_loop_stats={self.loop_stats}"]
        else:  # bare mitmdump buffers whole answers unless told to stream: compare like with like
            args += ["--set", "stream_large_bodies=1"]
        env = {**os.environ, "BENCH_UPSTREAM_KEY": "sk-bench-upstream"}
        with open(work / f"{name}.log", "wb") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=log)
        wait_port(self.port)
        if config is not None and "masking" in config:
            time.sleep(8)  # let the masking workers load spaCy before measuring

    def stats(self) -> tuple[float, int]:
        return proc_stats(self.proc.pid)

    def loop_max(self, since: float, until: float) -> float | None:
        """The largest event-loop stall between two wall-clock times (0: none over 10 ms)."""
        time.sleep(1.1)  # the probe writes its figures every second
        try:
            stalls = json.loads(self.loop_stats.read_text())["stalls"]
        except (OSError, ValueError, KeyError):
            return None
        return max((lag for at, lag in stalls if since <= at <= until), default=0.0)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def bench_config(work: Path, upstream_port: int, masking: bool) -> dict:
    (work / "grants.yaml").write_text(yaml.safe_dump({
        "version": 1, "default": {"upstreams": {"llm": {"models": ["gpt-4o*"],
                                                        "max_tokens": 1000}}}}))
    config = {"version": 1, "gateway": {"state_dir": str(work / "state")},
              "identity": {"dev_issuer": {"enabled": True, "key_file": str(work / "dev.pem")}},
              "upstreams": {"llm": {"url": f"http://127.0.0.1:{upstream_port}/v1",
                                    "protocol": "openai",
                                    "credential": {"env": "BENCH_UPSTREAM_KEY"}}},
              "policy": {"files": [str(work / "grants.yaml")]},
              "recording": {}}
    if masking:
        config["masking"] = {"workers": 2}
    return config


def run(quick: bool) -> list[Result]:
    counts = {1: 150 if quick else 400, 32: 600 if quick else 2000}
    stream_counts = {1: 5 if quick else 10, 32: 32 if quick else 64}
    work = Path(tempfile.mkdtemp(prefix="douane-bench-"))
    upstream_port = free_port()
    upstream = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "bench_upstream.py"),
                                 str(upstream_port)])
    wait_port(upstream_port)
    config = bench_config(work, upstream_port, masking=False)
    (work / "cfg.yaml").write_text(yaml.safe_dump(config))
    dev = configmod.load(work / "cfg.yaml", gateway=False).identity.dev_issuer
    token = devissuer.mint(dev, "bench@corp", ["bench"], 3600)
    results: list[Result] = []
    variants: list[tuple[str, dict | None]] = [
        ("direct", None), ("bare mitmdump", None),
        ("douane", config), ("douane + masking", bench_config(work, upstream_port, True))]
    try:
        for name, cfg in variants:
            proxy = None if name == "direct" else Proxy(name.replace(" ", "_").replace("+", ""),
                                                        upstream_port, work, cfg)
            port = proxy.port if proxy else upstream_port
            tok = token if cfg is not None else None
            asyncio.run(load(port, "/v1/chat/completions", CHAT, tok, 20, 2, False))  # warm up
            for mode, body, table in (("request", CHAT, counts), ("stream", STREAM,
                                                                   stream_counts)):
                for concurrency, total in table.items():
                    before = proxy.stats() if proxy else None
                    since = time.time()
                    elapsed, latencies, ttfts = asyncio.run(
                        load(port, "/v1/chat/completions", body, tok, total, concurrency,
                             mode == "stream"))
                    after = proxy.stats() if proxy else None
                    results.append(Result(
                        name, mode, concurrency, total, total / elapsed,
                        statistics.median(latencies) * 1000, percentile(latencies, 0.99) * 1000,
                        statistics.median(ttfts) * 1000,
                        (after[0] - before[0]) / total * 1000 if proxy else None,
                        after[1] / 1024 if proxy else None,
                        proxy.loop_max(since, time.time()) if proxy else None))
                    print(format_row(results[-1]), flush=True)
            if proxy:
                proxy.stop()
    finally:
        upstream.terminate()
        upstream.wait()
    return results


HEADER = (f"{'variant':<18} {'mode':<8} {'conc':>4} {'n':>5} {'req/s':>8} {'p50 ms':>8} "
          f"{'p99 ms':>8} {'ttft ms':>8} {'cpu s/1k':>9} {'rss MiB':>8} {'loop max ms':>11}")


def format_row(r: Result) -> str:
    def opt(v: float | None, fmt: str) -> str:
        return format(v, fmt) if v is not None else "-"

    return (f"{r.variant:<18} {r.mode:<8} {r.concurrency:>4} {r.requests:>5} {r.rps:>8.1f} "
            f"{r.p50_ms:>8.1f} {r.p99_ms:>8.1f} {r.ttft_p50_ms:>8.1f} "
            f"{opt(r.cpu_per_1000, '>9.2f')} {opt(r.rss_mib, '>8.0f')} "
            f"{opt(r.loop_max_ms, '>11.1f')}")


def ratios(results: list[Result]) -> list[str]:
    out = []
    for r in results:
        if r.variant in ("douane", "douane + masking"):
            bare = next(b for b in results if b.variant == "bare mitmdump" and b.mode == r.mode
                        and b.concurrency == r.concurrency)
            out.append(f"{r.variant:<18} {r.mode:<8} c={r.concurrency:<3} req/s "
                       f"{r.rps / bare.rps:6.1%} of bare, p50 {r.p50_ms - bare.p50_ms:+7.1f} ms, "
                       f"ttft {r.ttft_p50_ms - bare.ttft_p50_ms:+7.1f} ms")
    return out


def main() -> int:
    quick = "--quick" in sys.argv
    print(f"{os.cpu_count()} cores, {platform.python_version()}, quick={quick}")
    print(HEADER, flush=True)
    results = run(quick)
    lines = ratios(results)
    print("\nagainst bare mitmdump (the floor on the same engine):")
    print("\n".join(lines))
    if "--no-write" not in sys.argv:
        write_doc(results, lines, quick)
    return 0


ANALYSIS = "<!-- analysis: kept when scripts/bench rewrites the figures above -->"


def write_doc(results: list[Result], lines: list[str], quick: bool) -> None:
    doc = ROOT / "docs" / "benchmarks.md"
    old = doc.read_text() if doc.exists() else ""
    analysis = old[old.index(ANALYSIS):] if ANALYSIS in old else ""
    doc.write_text(
        "# Benchmarks\n\n"
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {os.cpu_count()} cores "
        f"({platform.processor() or platform.machine()}), Python {platform.python_version()}, "
        f"with `scripts/bench{' --quick' if quick else ''}`. The load generator, the upstream and "
        "the proxy share the machine, so absolute figures are low; compare rows of one run.\n\n"
        "Upstream: uvicorn on loopback; a JSON answer at once, or 50 tokens at 20 ms in OpenAI "
        "SSE (with PII). douane: identity (dev issuer JWT), policy, audit log, recording; "
        "'+ masking' adds Presidio masking of the answer (2 worker processes and the urgent one). Bare mitmdump "
        "runs with `stream_large_bodies=1` so it streams SSE as douane does. 'ttft' is the "
        "time to the first content delta; 'cpu s/1k' counts the proxy and its processes (the "
        "recording writer, the masking workers); 'loop max' is the largest event-loop stall inside "
        "douane during that row's load (0: none over 10 ms).\n\n"
        "```\n" + HEADER + "\n" + "\n".join(format_row(r) for r in results) + "\n```\n\n"
        "Against bare mitmdump:\n\n```\n" + "\n".join(lines) + "\n```\n"
        + ("\n" + analysis if analysis else ""))
    print(f"wrote {doc}")


if __name__ == "__main__":
    sys.exit(main())
