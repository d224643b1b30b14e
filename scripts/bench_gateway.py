"""What douane costs on the wire, side by side in one run, as ratios to bare mitmdump.

Requests (wrk, a C load generator, for every req/s row): direct to the upstream, bare mitmdump
(reverse mode), douane (identity, policy, audit, recording), douane + masking (the answers carry
PII and come back masked); for an OpenAI chat completion, an Anthropic message and an MCP
`tools/call`; at 1 and 32 connections. Each row: req/s, p50, p99, CPU seconds per 1,000 requests of
all the proxy's processes (the recording writer and the masking workers included) and its peak RSS.
Streams (a Python client: it must read SSE events): time to the first token, unmasked vs masked,
at 50 and 200 tokens/s, and the largest event-loop stall with 32 masked streams ending together.
Workers (issue 20): 1, 2 and N (one per core) douane processes behind HAProxy vs one bare mitmdump;
the shared store (PostgreSQL) against the default one, per request, and workers sharing it.

Bounded: a fixed number of fixed-length wrk runs per row; every server on 127.0.0.1; stops by
itself. Writes docs/benchmarks.md unless --no-write (the analysis below its marker is kept).
Usage: scripts/bench [--quick] [--seconds S] [--rounds N] [--no-write] [--twice]
                     [--only requests,streams,workers,store]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import yaml

from douane import config as configmod
from douane import devissuer

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PROMPT = [{"role": "user", "content": "Summarise my account."}]
CHAT = json.dumps({"model": "gpt-4o-mini", "max_tokens": 100, "messages": PROMPT}).encode()
# (path, body) per protocol; bench_upstream.py answers each with the same text full of PII
PROTOCOLS: dict[str, tuple[str, bytes]] = {
    "openai": ("/v1/chat/completions", CHAT),
    "anthropic": ("/anthropic/v1/messages", json.dumps(
        {"model": "claude-sonnet-4", "max_tokens": 100, "messages": PROMPT}).encode()),
    "mcp": ("/mcp", json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
        "name": "lookup_customer", "arguments": {"customer_id": "42"}}}).encode()),
}
PII = b"maria.garcia@example.com"  # in every answer: a masked answer must not carry it
UPSTREAM_KEY = "sk-bench-upstream"


def stream_body(pace: int) -> bytes:
    """A streamed chat completion; the benchmark upstream reads its pace from the model name."""
    return json.dumps({"model": f"gpt-4o-pace{pace}", "max_tokens": 100, "stream": True,
                       "messages": PROMPT}).encode()


STREAM = stream_body(50)


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


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process and all its processes, live (the recording writer, the masking
    workers) or exited and reaped."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    exited = (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")
    return cpu_seconds(pid) + exited + sum(cpu_seconds(c) for c in descendants(pid))


def settled_cpu(target: Target, limit: float = 3.0) -> float:
    """The CPU seconds of a target's processes once they are done with the requests just sent
    (polled every 0.1 s until one interval spends at most a clock tick, at most `limit` s): the
    work they defer past wrk's last answer (the recording writer's and the audit thread's
    backlog) counts in the row that caused it, not in the next row measured on that target,
    where it moved a row's CPU by up to 0.1-0.15 ms per request after a 32-connection row."""
    cpu, tick = tree_cpu(target.pid) + target.also(), 1.5 / os.sysconf("SC_CLK_TCK")
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = tree_cpu(target.pid) + target.also()
        if now - cpu <= tick:
            return now
        cpu = now
    return cpu


def tree_rss(pid: int) -> int:
    """Resident KiB of a process and its live descendants, now, as PSS: a page several of them
    share (the masking workers share their zygote's analyser) counts once, not once per process
    as summed RSS would."""
    total = 0
    for p in (pid, *descendants(pid)):
        with contextlib.suppress(OSError, TypeError):  # exited meanwhile
            total += int(re.search(r"^Pss:\s+(\d+)", Path(f"/proc/{p}/smaps_rollup").read_text(),
                                   re.M)[1])
    return total


class RssPeak:
    """Samples tree_rss every second while the block runs (reading PSS walks each process's
    pages: ~4 ms per masking worker); .peak in KiB."""

    def __init__(self, pid: int | None):
        self.pid, self.peak, self._stop = pid, 0, threading.Event()

    def _run(self) -> None:
        while True:
            self.peak = max(self.peak, tree_rss(self.pid))
            if self._stop.wait(1):
                return

    def __enter__(self) -> RssPeak:
        if self.pid:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pid:
            self._stop.set()
            self._thread.join()


# -- wrk ------------------------------------------------------------------------------------------

def wrk_script(work: Path, body: bytes, token: str | None) -> Path:
    path = work / f"wrk-{abs(hash((body, token)))}.lua"
    auth = f'wrk.headers["authorization"] = "Bearer {token}"\n' if token else ""
    path.write_text(
        f'wrk.method = "POST"\nwrk.body = [==[{body.decode()}]==]\n'
        'wrk.headers["content-type"] = "application/json"\n'
        'wrk.headers["accept"] = "application/json, text/event-stream"\n' + auth
        # the first refusal is printed: a benchmark of refusals measures nothing
        + 'shown = false\nresponse = function(status, headers, body)\n'
        '  if status ~= 200 and not shown then print(status, body) shown = true end\nend\n')
    return path


def wrk_ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
    return float(value) * {"us": 0.001, "ms": 1, "s": 1000, "m": 60000}[unit]


@dataclass
class Wrk:
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float


def wrk(port: int, path: str, script: Path, connections: int, seconds: float) -> Wrk:
    out = subprocess.run(["wrk", f"-t{min(2, connections)}", f"-c{connections}",
                          f"-d{seconds}s", "--timeout", "10s", "--latency", "-s", str(script),
                          f"http://127.0.0.1:{port}{path}"],
                         capture_output=True, text=True, check=True).stdout
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: .*", out)
    if bad:
        raise SystemExit(f"wrk: {bad[0]} on {path}:\n{out}")
    return Wrk(int(re.search(r"(\d+) requests in", out)[1]),
               float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1]),
               wrk_ms(re.search(r"^\s+50%\s+(\S+)", out, re.M)[1]),
               wrk_ms(re.search(r"^\s+99%\s+(\S+)", out, re.M)[1]))


# -- a Python client, where SSE events must be read ----------------------------------------------

FIRST_TOKEN = re.compile(rb'"content":\s*"[^"]')


async def one_request(reader, writer, path: str, body: bytes, token: str | None,
                      stream: bool = False) -> tuple[float, float, bytes]:
    """(time to the first content delta or the whole body, total, body) for one keep-alive
    HTTP/1.1 request."""
    auth = f"authorization: Bearer {token}\r\n" if token else ""
    start = time.perf_counter()
    writer.write(f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                 f"accept: application/json, text/event-stream\r\n{auth}"
                 f"content-length: {len(body)}\r\n\r\n".encode() + body)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = re.search(rb"(?i)content-length: (\d+)", head)
    if length:
        data = await reader.readexactly(int(length[1]))
        first = time.perf_counter()
    else:  # chunked: read chunks until the terminator; the first content delta is the first token
        first, chunks = None, []
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            chunks.append((await reader.readexactly(size + 2))[:-2])
            if first is None and FIRST_TOKEN.search(chunks[-1]):
                first = time.perf_counter()
            if size == 0:
                break
        first, data = first or time.perf_counter(), b"".join(chunks)
    if status != 200:
        raise RuntimeError(f"status {status}: {head[:200]!r} {data[:300]!r}")
    end = time.perf_counter()
    return first - start, end - start, data


async def load(port: int, path: str, body: bytes, token: str | None, total: int,
               concurrency: int, stream: bool = False) -> tuple[float, list[float], list[float]]:
    """(elapsed, latencies, times to first token) of `total` requests over `concurrency`
    keep-alive connections started together."""
    latencies: list[float] = []
    ttfts: list[float] = []
    remaining = [total]

    async def worker() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while remaining[0] > 0:
            remaining[0] -= 1
            ttft, latency, _ = await one_request(reader, writer, path, body, token, stream)
            ttfts.append(ttft)
            latencies.append(latency)
        writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - start, latencies, ttfts


async def fetch(port: int, path: str, body: bytes, token: str | None) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        return (await one_request(reader, writer, path, body, token))[2]
    finally:
        writer.close()


def ready(port: int, token: str | None, masked: bool, timeout: float = 180) -> None:
    """Until every protocol answers 200 (masking workers load spaCy first; HAProxy marks workers
    up after two health checks), then checks what the rows measure: masked answers carry no PII,
    the others carry it."""
    deadline = time.monotonic() + timeout
    for name, (path, body) in PROTOCOLS.items():
        while True:
            try:
                answer = asyncio.run(fetch(port, path, body, token))
                break
            except (OSError, RuntimeError, asyncio.IncompleteReadError) as e:
                if time.monotonic() > deadline:
                    raise SystemExit(f"{name} on port {port} never answered: {e} (its log: "
                                     "the bench's temporary folder)") from e
                time.sleep(0.5)
        if (PII in answer) == masked:
            raise SystemExit(f"{name}: expected a{' masked' if masked else 'n unmasked'} "
                             f"answer, got {answer[:300]!r}")
        asyncio.run(load(port, path, body, token, 20, 2))  # warm up


# -- the processes --------------------------------------------------------------------------------

class Proxy:
    """A mitmdump process: bare, or with douane and a given config."""

    def __init__(self, name: str, upstream_port: int, work: Path, config: dict | None,
                 extra: tuple[str, ...] = (), probe: bool = False, root: Path = ROOT,
                 figures: bool = True):
        """`root`: the tree whose douane runs (another checkout, to compare two trees);
        `figures`: douane writes its loop figures (`stalls`; its probe then reads the thread's CPU
        clock each pass, a system call a deployed gateway does not make)."""
        self.name, self.port, self.work = name, free_port(), work
        self.loop_stats = work / f"{name}-loop.json"
        args = [str(BIN / "mitmdump"), "-q", "--mode", f"reverse:http://127.0.0.1:{upstream_port}",
                "--listen-host", "127.0.0.1", "--listen-port", str(self.port),
                "--set", f"confdir={work / 'confdir'}", *extra]
        if config is not None:  # a state folder of its own: variants run side by side
            config = {**config, "gateway": {**config.get("gateway", {}),
                                            "state_dir": str(work / f"state-{name}")}}
            path = work / f"{name}.yaml"
            path.write_text(yaml.safe_dump(config))
            args += ["-s", str(root / "addons" / "gateway.py"), "--set", f"douane_config={path}"]
            if figures:
                args += ["--set", f"douane_loop_stats={self.loop_stats}"]
        elif probe:  # bare mitmdump with douane's lag probe alone, to compare stalls
            args += ["-s", str(ROOT / "addons" / "loopprobe.py"),
                     "--set", f"douane_loop_stats={self.loop_stats}"]
        env = {**os.environ, "BENCH_UPSTREAM_KEY": UPSTREAM_KEY}
        if root != ROOT:  # its douane before this tree's (installed in the venv)
            env["PYTHONPATH"] = str(root / "addons")
        with open(work / f"{name}.log", "wb") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=log)
        wait_port(self.port)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stats(self) -> tuple[float, int]:
        """(CPU seconds of all its processes, peak RSS of the main one in KiB)."""
        hwm = re.search(r"VmHWM:\s+(\d+)", Path(f"/proc/{self.pid}/status").read_text())
        return tree_cpu(self.pid), int(hwm[1])

    def stalls(self, since: float, until: float) -> list[tuple[float, float, float]] | None:
        """The event-loop stalls over 10 ms the probe saw wake up between two wall-clock times:
        (unix time, ms, the main thread's CPU ms meanwhile). Call a second after `until`: the
        probe writes its figures every second."""
        try:
            stalls = json.loads(self.loop_stats.read_text())["stalls"]
        except (OSError, ValueError, KeyError):
            return None
        return [(at, ms, cpu) for at, ms, cpu in stalls if since <= at <= until]

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class Workers:
    """`scripts/run --workers N`: N douane processes behind HAProxy (douane.workers)."""

    def __init__(self, n: int, config: dict, upstream_port: int, work: Path):
        self.port, path = free_port(), work / f"workers{n}.yaml"
        path.write_text(yaml.safe_dump({**config, "gateway": {
            **config.get("gateway", {}), "state_dir": str(work / f"state-workers{n}")}}))
        self.log = work / f"workers{n}.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "douane.workers", "--workers", str(n), "--config",
                 str(path), "--port", str(self.port), "--confdir", str(work / "confdir"), "--",
                 "--mode", f"reverse:http://127.0.0.1:{upstream_port}"],
                stdout=log, stderr=log, start_new_session=True,
                env={**os.environ, "BENCH_UPSTREAM_KEY": UPSTREAM_KEY})
        deadline = time.monotonic() + 300
        while "workers behind HAProxy" not in self.log.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(self.log.read_text())
            time.sleep(0.2)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)


def bench_config(work: Path, upstream_port: int, masking: bool = False,
                 database: str | None = None) -> dict:
    """douane in front of the benchmark upstream's three APIs: identity (dev issuer), policy,
    audit, recording; with `masking`, Presidio masking of the answers (2 workers); with
    `database` (a PostgreSQL URL, its password in $BENCH_PG_PASSWORD), the shared store and a rate
    limit it counts (too high to refuse anything), for the store's cost per request."""
    default: dict = {"upstreams": {
        "llm": {"models": ["gpt-4o*"], "max_tokens": 1000},
        "claude": {"models": ["claude-*"], "max_tokens": 1000},
        "crm": {"tools": {"allow": ["lookup_customer"]}}}}
    if database:
        default["limits"] = {"requests_per_minute": 10_000_000}
    grants = work / f"grants{'-db' if database else ''}.yaml"
    grants.write_text(yaml.safe_dump({"version": 1, "default": default}))
    base = f"http://127.0.0.1:{upstream_port}"
    config = {"version": 1, "gateway": {"state_dir": str(work / "state")},
              "identity": {"dev_issuer": {"enabled": True, "key_file": str(work / "dev.pem")}},
              "upstreams": {
                  "llm": {"url": f"{base}/v1", "protocol": "openai",
                          "credential": {"env": "BENCH_UPSTREAM_KEY"}},
                  "claude": {"url": f"{base}/anthropic", "protocol": "anthropic",
                             "credential": {"env": "BENCH_UPSTREAM_KEY"}},
                  "crm": {"url": f"{base}/mcp", "protocol": "mcp"}},
              "policy": {"files": [str(grants)]},
              "recording": {}}
    if masking:
        config["masking"] = {"workers": 2}
    if database:
        config["database"] = {"url": database, "password": {"env": "BENCH_PG_PASSWORD"}}
    return config


# -- the rows -------------------------------------------------------------------------------------

@dataclass
class Row:
    variant: str
    protocol: str
    connections: int
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_per_1k: float | None = None  # CPU seconds per 1,000 requests, all the proxy's processes
    rss_mib: float | None = None  # peak during the row, all the proxy's processes
    # each round's req/s and CPU per 1,000 requests, in round order: a ratio to another row of
    # the same run is taken round by round (`paired`)
    round_rps: tuple[float, ...] = ()
    round_cpu: tuple[float, ...] = ()


@dataclass
class Paired:
    """A ratio of two rows of one run: the median of the rounds' ratios (each round's two figures
    measured seconds apart: a cell's variants are loaded one after the other), and their least
    and greatest."""
    median: float
    low: float
    high: float

    def share(self) -> str:
        return f"{self.median:.1%} ({self.low:.0%}-{self.high:.0%})"

    def times(self) -> str:
        return f"{self.median:.2f}x ({self.low:.2f}-{self.high:.2f})"


def paired(mine: tuple[float, ...], reference: tuple[float, ...]) -> Paired | None:
    """Round r of one row against round r of the other: load from elsewhere on the machine that
    moves both variants' figures in a round cancels in its ratio (a ratio of the rows' medians
    takes each median from a different round). None without rounds on both sides."""
    ratios = sorted(a / b for a, b in zip(mine, reference, strict=False) if b)
    if not ratios or len(mine) != len(reference):
        return None
    return Paired(statistics.median(ratios), ratios[0], ratios[-1])


@dataclass
class Stall:
    """A phase's stalls: the largest, and the most CPU the proxy's main thread used in one (the
    loop's own work; the rest of a stall is waiting for a core, which the machine's other
    processes decide)."""
    ms: float
    cpu_ms: float

    def __str__(self) -> str:
        return f"{self.ms:.1f} / {self.cpu_ms:.1f}"


PHASES = ("start", "during", "ends")
BARE_STREAMING = "bare mitmdump (stream_large_bodies=1)"


@dataclass
class StreamRow:
    variant: str
    pace: int  # tokens/s
    streams: int  # concurrent
    ttft_p50_ms: float
    total_p50_ms: float
    loop: dict[str, Stall] | None = None  # per phase of a together run (PHASES)


@dataclass
class Memory:
    variant: str
    idle_mib: float
    load_mib: float


@dataclass
class Run:
    quick: bool
    seconds: int
    rounds: int
    rows: list[Row]
    streams: list[StreamRow]
    memory: list[Memory]
    workers: list[Row]
    store: list[Row]
    notes: list[str]


def opt(v: float | None, fmt: str) -> str:
    return format(v, fmt) if v is not None else "-"


def spread(values: tuple[float, ...], fmt: str) -> str:
    """The least and greatest of a row's rounds ("" for one round)."""
    return f" ({min(values):{fmt}}-{max(values):{fmt}})" if len(values) > 1 else ""


def print_row(r: Row) -> None:
    print(f"| {r.variant} | {r.protocol} | {r.connections} | {r.rps:.0f}{spread(r.round_rps, '.0f')}"
          f" | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {opt(r.cpu_per_1k, '.2f')}"
          f"{spread(r.round_cpu, '.2f')} | {opt(r.rss_mib, '.0f')} |", flush=True)


@dataclass
class Target:
    """What wrk loads: a port, and the process whose CPU and memory count (None: direct)."""
    variant: str
    port: int
    pid: int | None
    also: Callable[[], float] = lambda: 0.0  # CPU seconds of a server it uses (PostgreSQL)


def measure_requests(targets: list[Target], token: str | None, seconds: int, work: Path,
                     protocols: list[str], connections=(1, 32), rounds: int = 1) -> list[Row]:
    """wrk rows, interleaved: each round runs every (protocol, connections) cell on every target
    in turn, the order rotated each round, so load from elsewhere on the machine falls on every
    variant alike. A row: the median of its rounds' req/s, p50, p99 and CPU per request (CPU
    from before wrk starts until the target has settled: `settled_cpu`); the peak RSS; and each
    round's req/s and CPU per request, printed as they come, for ratios taken round by round."""
    runs: dict[tuple[str, str, int], list[tuple[Wrk, float, int]]] = {}
    for r in range(rounds):
        for name in protocols:
            path, body = PROTOCOLS[name]
            script = wrk_script(work, body, token)
            for c in connections:
                for t in targets[r % len(targets):] + targets[:r % len(targets)]:
                    before = tree_cpu(t.pid) + t.also() if t.pid else 0.0
                    with RssPeak(t.pid) as rss:
                        result = wrk(t.port, path, script, c, seconds)
                    cpu = settled_cpu(t) - before if t.pid else 0.0
                    runs.setdefault((t.variant, name, c), []).append((result, cpu, rss.peak))
                    per = f", {cpu / result.requests * 1000:.2f} ms CPU" if t.pid and \
                        result.requests else ""
                    print(f"  round {r + 1}: {t.variant}, {name}, c={c}: {result.rps:.0f} req/s"
                          f"{per}", flush=True)
        print(f"round {r + 1}/{rounds} done", flush=True)
    print("\n| variant | protocol | connections | req/s | p50 ms | p99 ms | CPU s/1k req "
          "| RSS MiB |\n|---|---|---|---|---|---|---|---|")
    rows = []
    for t in targets:
        for name in protocols:
            for c in connections:
                cell = runs[t.variant, name, c]
                requests = sum(w.requests for w, _, _ in cell)
                rows.append(Row(
                    t.variant, name, c, requests, statistics.median(w.rps for w, _, _ in cell),
                    statistics.median(w.p50_ms for w, _, _ in cell),
                    statistics.median(w.p99_ms for w, _, _ in cell),
                    statistics.median(cpu / w.requests * 1000 for w, cpu, _ in cell
                                      if w.requests) if t.pid and requests else None,
                    max(peak for _, _, peak in cell) / 1024 if t.pid else None,
                    tuple(w.rps for w, _, _ in cell),
                    tuple(cpu / w.requests * 1000 for w, cpu, _ in cell)
                    if t.pid and all(w.requests for w, _, _ in cell) else ()))
                print_row(rows[-1])
    return rows


@dataclass
class Streamed:
    """One stream of a together run, in wall-clock time."""
    start: float  # its request sent
    first: float  # its first content delta
    end: float  # its last byte


async def together(port: int, token: str | None, n: int, pace: int) -> list[Streamed]:
    """`n` streams started together, one connection each (so they also end together)."""
    async def one() -> Streamed:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            start = time.time()
            ttft, total, _ = await one_request(reader, writer, PROTOCOLS["openai"][0],
                                               stream_body(pace), token, stream=True)
            return Streamed(start, start + ttft, start + total)
        finally:
            writer.close()

    return await asyncio.gather(*(one() for _ in range(n)))


def phases(stalls: list[tuple[float, float, float]], streams: list[Streamed],
           pace: int) -> dict[str, Stall]:
    """Each phase's largest stall (by when the probe woke up): 'start' until every stream has
    its first token (32 requests read, routed and sent upstream in a few passes of the loop),
    'ends' from a token's interval before the first stream ended (the finish events, the
    answers' ends), 'during' between (every stream's tokens arriving at the same tick)."""
    first, ends = max(s.first for s in streams), min(s.end for s in streams) - 1 / pace
    out = {phase: Stall(0.0, 0.0) for phase in PHASES}
    for at, ms, cpu in stalls:
        phase = out["start" if at <= first else "ends" if at >= ends else "during"]
        phase.ms, phase.cpu_ms = max(phase.ms, ms), max(phase.cpu_ms, cpu)
    return out


def measure_streams(proxies: dict[str, Proxy], token: str | None, quick: bool,
                    rounds: int) -> list[StreamRow]:
    """Per variant: c=1 time to first token at 50 and 200 tokens/s; then 32 streams at 50
    tokens/s started (and so ending) together, `rounds` times, the variants in turn (the order
    rotated), each round's stalls per phase (`phases`) by the same probe in every proxy
    (douane's, or addons/loopprobe.py in bare mitmdump); a row shows the medians of the rounds."""
    rows = []
    path = PROTOCOLS["openai"][0]
    print("\n| variant | tokens/s | streams | TTFT p50 ms | stream p50 ms |\n|---|---|---|---|---|")
    for variant, proxy in proxies.items():
        for pace, total in ((50, 3 if quick else 8), (200, 5 if quick else 16)):
            _, latencies, ttfts = asyncio.run(load(proxy.port, path, stream_body(pace), token,
                                                   total, 1, stream=True))
            rows.append(StreamRow(variant, pace, 1, statistics.median(ttfts) * 1000,
                                  statistics.median(latencies) * 1000))
            r = rows[-1]
            print(f"| {r.variant} | {r.pace} | 1 | {r.ttft_p50_ms:.1f} | {r.total_p50_ms:.0f} |",
                  flush=True)
    n, pace, names = 32, 50, list(proxies)
    runs: dict[str, list[tuple[list[Streamed], dict[str, Stall] | None]]] = {}
    for r in range(rounds):
        timed = []
        for variant in names[r % len(names):] + names[:r % len(names)]:
            since = time.time()
            streams = asyncio.run(together(proxies[variant].port, token, n, pace))
            timed.append((variant, since, time.time(), streams))
        time.sleep(1.1)  # the probes write their figures every second
        for variant, since, until, streams in timed:
            stalls = proxies[variant].stalls(since, until)
            runs.setdefault(variant, []).append(
                (streams, phases(stalls, streams, pace) if stalls is not None else None))
    print(f"\n{n} streams together, {rounds} round(s); loop ms per phase: largest stall / most "
          "CPU in one (medians of the rounds)\n| variant | TTFT p50 ms | stream p50 ms | "
          + " | ".join(PHASES) + " |\n|---|---|---|" + "---|" * len(PHASES))
    for variant in names:
        streams = [s for each, _ in runs[variant] for s in each]
        loops = [loop for _, loop in runs[variant] if loop is not None]
        loop = {phase: Stall(statistics.median_low(each[phase].ms for each in loops),
                             statistics.median_low(each[phase].cpu_ms for each in loops))
                for phase in PHASES} if loops else None
        rows.append(StreamRow(variant, pace, n,
                              statistics.median(s.first - s.start for s in streams) * 1000,
                              statistics.median(s.end - s.start for s in streams) * 1000, loop))
        r = rows[-1]
        print(f"| {variant} | {r.ttft_p50_ms:.1f} | {r.total_p50_ms:.0f} | "
              + " | ".join(str(loop[phase]) if loop else "-" for phase in PHASES) + " |",
              flush=True)
    return rows


def measure_store(upstream_port: int, work: Path, token: str, seconds: int, rounds: int,
                  quick: bool, out: Run) -> None:
    """Issue 20: the shared store's cost per request. douane with a rate limit and the default
    store (SQLite, limits in memory) against the same with `database:` on a PostgreSQL 15 cluster
    of its own (tests/support/postgres.py; its server processes' CPU counted too); then workers
    sharing it (not in --quick)."""
    sys.path.insert(0, str(ROOT))
    from tests.support import postgres

    if "database" not in configmod.Config.__dataclass_fields__ or not postgres.available():
        out.notes.append("Shared store: not measured (no `database:` in this tree's config, or "
                         f"no PostgreSQL binaries under {postgres.BIN}).")
        return
    cluster = postgres.PostgresCluster()
    os.environ["BENCH_PG_PASSWORD"] = postgres.PASSWORD
    try:
        def pg_cpu() -> float:
            return tree_cpu(int((cluster.data / "postmaster.pid").read_text().split()[0]))

        # the password goes in $BENCH_PG_PASSWORD: douane refuses it in the URL
        database = cluster.url(cluster.new_database().rsplit("/", 1)[1]).replace(
            f":{postgres.PASSWORD}@", "@")
        variants: list[tuple[str, dict, Callable[[], float]]] = [
            ("douane + limit, default store", bench_config(work, upstream_port), lambda: 0.0),
            ("douane + limit, PostgreSQL store",
             bench_config(work, upstream_port, database=database), pg_cpu)]
        variants[0][1]["policy"] = variants[1][1]["policy"]  # the same grants, with the limit
        proxies = []
        try:  # both at once, measured interleaved
            for name, cfg, _ in variants:
                proxies.append(Proxy(name.split(",")[1].strip().replace(" ", "_"), upstream_port,
                                     work, cfg))
                ready(proxies[-1].port, token, masked=False)
            out.store += measure_requests(
                [Target(name, proxy.port, proxy.pid, also)
                 for (name, _, also), proxy in zip(variants, proxies, strict=True)],
                token, seconds, work, ["openai"], rounds=rounds)
        finally:
            for proxy in proxies:
                proxy.stop()
        if quick:
            return
        config = bench_config(work, upstream_port, database=database)
        for n in sorted({1, 2, os.cpu_count() or 1}):
            workers = Workers(n, config, upstream_port, work)
            try:
                ready(workers.port, token, masked=False)
                out.store += measure_requests([Target(
                    f"douane + limit, PostgreSQL store, {n} worker{'s' * (n > 1)} behind HAProxy",
                    workers.port, workers.pid, pg_cpu)], token, seconds, work, ["openai"], (32,),
                    rounds)
            finally:
                workers.stop()
    finally:
        cluster.close()


def run(quick: bool, only: set[str], seconds: int, rounds: int, twice: bool = False) -> Run:
    work = Path(tempfile.mkdtemp(prefix="douane-bench-"))
    upstream_port = free_port()
    upstream = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "bench_upstream.py"),
                                 str(upstream_port)])
    out = Run(quick, seconds, rounds, [], [], [], [], [], [])
    try:
        wait_port(upstream_port)
        config = bench_config(work, upstream_port, masking=False)
        (work / "cfg.yaml").write_text(yaml.safe_dump(config))
        dev = configmod.load(work / "cfg.yaml", gateway=False).identity.dev_issuer
        token = devissuer.mint(dev, "bench@corp", ["bench"], 3600)
        masked = bench_config(work, upstream_port, masking=True)
        protocols = list(PROTOCOLS)
        variants: list[tuple[str, dict | None]] = [("douane", config),
                                                   ("douane + masking", masked)]
        if "requests" in only:
            variants.insert(0, ("bare mitmdump", None))
            if twice:  # the same proxies again: their ratios to the first are the method's noise
                variants[1:1] = [(AGAIN["bare mitmdump"], None)]
                variants[3:3] = [(AGAIN["douane"], config)]
        proxies: dict[str, Proxy] = {}

        def start(figures: bool) -> None:  # every variant at once: their rows interleave
            for variant, cfg in variants:
                proxies[variant] = Proxy(variant.replace(" ", "_").replace("+", ""),
                                         upstream_port, work, cfg, figures=figures)
                ready(proxies[variant].port, token, masked=variant == "douane + masking")

        try:
            if "requests" in only:  # as deployed: no loop figures file (its probe then reads
                start(figures=False)  # the thread's CPU clock every pass, a system call)
                idle = {variant: tree_rss(proxy.pid) for variant, proxy in proxies.items()}
                ready(upstream_port, None, masked=False)
                out.rows += measure_requests(
                    [Target("direct", upstream_port, None)] +
                    [Target(variant, proxy.port, proxy.pid) for variant, proxy in proxies.items()],
                    token, seconds, work, protocols, rounds=rounds)
                out.memory += [Memory(variant, idle[variant] / 1024, max(
                    r.rss_mib for r in out.rows if r.variant == variant)) for variant in proxies]
            if "streams" in only:  # bare mitmdump buffers whole answers unless told to stream
                for proxy in proxies.values():
                    proxy.stop()
                proxies.clear()
                variants = [(v, cfg) for v, cfg in variants
                            if cfg is not None and v not in AGAIN.values()]
                start(figures=True)  # the stalls rows read them
                streaming = {variant: proxies[variant]
                             for variant in ("douane", "douane + masking")}
                bare = BARE_STREAMING
                proxies[bare] = streaming[bare] = Proxy(
                    "bare_streaming", upstream_port, work, None,
                    ("--set", "stream_large_bodies=1"), probe=True)
                ready(proxies[bare].port, None, masked=False)
                out.streams += measure_streams(streaming, token, quick, rounds)
        finally:
            for proxy in proxies.values():
                proxy.stop()
        if "workers" in only:
            out.workers = measure_workers(config, upstream_port, work, token, seconds, rounds,
                                          out)
        if "store" in only:
            measure_store(upstream_port, work, token, seconds, rounds, quick, out)
    finally:
        upstream.terminate()
        upstream.wait()
    return out


AGAIN = {"bare mitmdump": "bare mitmdump again", "douane": "douane again"}  # --twice


def measure_workers(config: dict, upstream_port: int, work: Path, token: str, seconds: int,
                    rounds: int, out: Run) -> list[Row]:
    rows = [r for r in out.rows if r.variant == "bare mitmdump" and r.protocol == "openai"
            and r.connections == 32]
    if not rows:
        proxy = Proxy("bare_workers", upstream_port, work, None)
        try:
            ready(proxy.port, token, masked=False)
            rows += measure_requests([Target("bare mitmdump", proxy.port, proxy.pid)], token,
                                     seconds, work, ["openai"], (32,), rounds)
        finally:
            proxy.stop()
    counts = sorted({1, 2, os.cpu_count() or 1})
    variants: list[tuple[str, int, dict]] = [
        (f"douane, {n} worker{'s' * (n > 1)} behind HAProxy", n, config) for n in counts]
    for name, n, cfg in variants:
        workers = Workers(n, cfg, upstream_port, work)
        try:
            ready(workers.port, token, masked=False)
            rows += measure_requests([Target(name, workers.port, workers.pid)], token, seconds,
                                     work, ["openai"], (32,), rounds)
        finally:
            workers.stop()
    return rows


# -- the report -----------------------------------------------------------------------------------

def table(head: list[str], lines: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                      *("| " + " | ".join(line) + " |" for line in lines)])


def rps_ratio(r: Row, bare: Row) -> Paired:
    """req/s against bare's, round by round (one round: the rows' own ratio)."""
    return paired(r.round_rps, bare.round_rps) or Paired(*[r.rps / bare.rps] * 3)


def cpu_ratio(r: Row, bare: Row) -> Paired | None:
    if not (r.cpu_per_1k and bare.cpu_per_1k):
        return None
    return paired(r.round_cpu, bare.round_cpu) or Paired(*[r.cpu_per_1k / bare.cpu_per_1k] * 3)


def ratio_lines(rows: list[Row], reference: Callable[[Row], Row | None]) -> list[list[str]]:
    lines = []
    for r in rows:
        bare = reference(r)
        if r.variant == "bare mitmdump" or bare is None:
            continue
        cpu = cpu_ratio(r, bare)
        lines.append([r.variant, r.protocol, str(r.connections), rps_ratio(r, bare).share(),
                      f"{r.p50_ms - bare.p50_ms:+.2f}", cpu.times() if cpu else "-"])
    return lines


def targets(run: Run) -> list[list[str]]:
    """Issues 17 and 18's targets, met or not, in this run."""
    def bare(r: Row) -> Row | None:
        return next((b for b in run.rows if b.variant == "bare mitmdump"
                     and b.protocol == r.protocol and b.connections == r.connections), None)

    lines = []
    for r in run.rows:
        b = bare(r)
        if b is None or r.variant not in ("douane", "douane + masking"):
            continue
        where = f"{r.protocol} c={r.connections}"
        rps = rps_ratio(r, b)
        if r.variant == "douane":
            lines.append(["18", f"douane >= 90% of bare req/s, {where}", rps.share(),
                          "yes" if rps.median >= 0.9 else "no"])
            lines.append(["18", f"p50 within +0.5 ms of bare, {where}",
                          f"{r.p50_ms - b.p50_ms:+.2f} ms",
                          "yes" if r.p50_ms - b.p50_ms <= 0.5 else "no"])
            cpu = cpu_ratio(r, b)
            if cpu:
                lines.append(["18", f"CPU/request <= 1.3x bare, {where}", cpu.times(),
                              "yes" if cpu.median <= 1.3 else "no"])
        else:
            lines.append(["17", f"masked answers >= 60% of bare req/s, {where}", rps.share(),
                          "yes" if rps.median >= 0.6 else "no"])
    for pace in (50, 200):
        plain = next((s for s in run.streams if s.variant == "douane" and s.pace == pace
                      and s.streams == 1), None)
        masked = next((s for s in run.streams if s.variant == "douane + masking"
                       and s.pace == pace and s.streams == 1), None)
        if plain and masked:
            delta = masked.ttft_p50_ms - plain.ttft_p50_ms
            lines.append(["17", f"masked TTFT <= unmasked + 30 ms at {pace} tokens/s",
                          f"{delta:+.1f} ms", "yes" if delta <= 30 else "no"])
    loops = {s.variant: s.loop for s in run.streams if s.streams > 1 and s.loop}
    if "douane + masking" in loops:
        ends = loops["douane + masking"]["ends"]
        bare = loops.get(BARE_STREAMING)
        lines.append(["17", "loop stall <= 10 ms, 32 masked streams ending together",
                      f"{ends.ms:.1f} ms, {ends.cpu_ms:.1f} ms of its own CPU" + (
                          f" (bare mitmdump: {bare['ends'].ms:.1f}, {bare['ends'].cpu_ms:.1f})"
                          if bare else ""),
                      "yes" if ends.ms <= 10 else "no"])
    return lines


def report(run: Run, command: str) -> str:
    def bare_of(rows: list[Row]) -> Callable[[Row], Row | None]:
        return lambda r: next((b for b in rows if b.variant == "bare mitmdump"
                               and b.protocol == r.protocol and b.connections == r.connections),
                              None)

    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split()[:2]
    parts = [
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {os.cpu_count()} cores "
        f"({platform.processor() or platform.machine()}), Python {platform.python_version()}, "
        f"with `{command}`. Load generator: `{' '.join(wrk_version)}` for every req/s row "
        f"(`-t1` at 1 connection, `-t2` at 32, keep-alive, a Lua script for the POST body and the "
        f"bearer token); each row is the median of {run.rounds} runs of {run.seconds} s, "
        "interleaved: every variant runs at once and each round loads them in turn (the order "
        "rotated), so load from elsewhere falls on all alike. A Python asyncio client for the "
        "stream rows (it must read SSE events). The generator, the upstream and the proxies share "
        "the machine: compare rows of one run, as ratios."]
    if run.rows:
        parts += [
            "## Requests\n\nUpstream: `scripts/bench_upstream.py` (uvicorn, loopback), a JSON "
            "answer of ~200 characters with PII at once: an OpenAI chat completion, an Anthropic "
            "message, an MCP `tools/call` result. douane: identity (dev issuer JWT), policy, "
            "audit log, recording, as deployed (no loop figures file: the stream rows' proxies, "
            "started afresh, write it); '+ masking' adds Presidio masking of the answers (2 worker "
            "processes), checked before measuring (a masked answer must not carry the email). "
            "'CPU s/1k req' is the CPU seconds per 1,000 requests of the proxy and all its "
            "processes (the recording writer, the masking workers), counted from wrk's start "
            "until they are idle again (the work they defer counts in its own row), the median "
            "of the rounds; 'RSS' is their summed resident memory (PSS: a page they share counts "
            "once), the peak during the row.",
            table(["variant", "protocol", "connections", "req/s", "p50 ms", "p99 ms",
                   "CPU s/1k req", "RSS MiB"],
                  [[r.variant, r.protocol, str(r.connections),
                    f"{r.rps:.0f}{spread(r.round_rps, '.0f')}", f"{r.p50_ms:.2f}",
                    f"{r.p99_ms:.2f}", opt(r.cpu_per_1k, ".2f") + spread(r.round_cpu, ".2f"),
                    opt(r.rss_mib, ".0f")] for r in run.rows]),
            "Against bare mitmdump (same protocol, same connections), round by round: each "
            "ratio is the median of the rounds' ratios (a round's row against the same round's "
            "bare row, measured seconds apart), in parentheses the least and greatest of "
            "them; a target is met on the median. req/s and CPU above: the median of the rounds "
            "and, in parentheses, their least and greatest.",
            table(["variant", "protocol", "connections", "req/s", "p50 ms", "CPU/request"],
                  ratio_lines(run.rows, bare_of(run.rows))),
            "Memory (the proxy and all its processes; idle: after warm-up, before load):",
            table(["variant", "idle RSS MiB", "under load (peak) MiB"],
                  [[m.variant, f"{m.idle_mib:.0f}", f"{m.load_mib:.0f}"] for m in run.memory])]
    alone = [s for s in run.streams if s.streams == 1]
    burst = [s for s in run.streams if s.streams > 1]
    if alone:
        parts += [
            "## Streams\n\nOpenAI chat completion streams of 50 tokens (4 characters each, with "
            "PII) at 50 and 200 tokens/s. 'TTFT' is the time to the first content delta the "
            "client reads. Bare mitmdump runs with `stream_large_bodies=1` here, so it streams as "
            "douane does.",
            table(["variant", "tokens/s", "streams", "TTFT p50 ms", "stream p50 ms"],
                  [[s.variant, str(s.pace), str(s.streams), f"{s.ttft_p50_ms:.1f}",
                    f"{s.total_p50_ms:.0f}"] for s in alone])]
    if burst:
        parts += [
            f"{burst[0].streams} streams at {burst[0].pace} tokens/s started together, so "
            "they end together, in every variant in turn (the order rotated each round). Each "
            "proxy runs the same event-loop lag probe (douane's `LoopProbe`; in bare mitmdump "
            "alone, `-s addons/loopprobe.py`). Per phase, the largest stall (one "
            "pass of the loop over 10 ms, its selector's return to its next call; 0: none) / the most CPU time the proxy's main thread used during one stall (the "
            "loop's own work; the rest of a stall is time it waited for a core, which the "
            "machine's other processes decide): 'start' until every stream "
            "has its first token (32 requests in a few passes of the loop), 'ends' from a "
            "token's interval before the first stream ended, 'during' between (32 streams' "
            "tokens arriving at the same tick). Each figure is the median of the rounds; TTFT and "
            "stream are medians over every stream of every round.",
            table(["variant", "TTFT p50 ms", "stream p50 ms", *(f"loop ms {p}" for p in PHASES)],
                  [[s.variant, f"{s.ttft_p50_ms:.1f}", f"{s.total_p50_ms:.0f}",
                    *(str(s.loop[p]) if s.loop else "-" for p in PHASES)] for s in burst])]
    if run.workers:
        parts += [
            "## Workers\n\n`scripts/run --workers N` (`python -m douane.workers`: N douane "
            "processes behind HAProxy on one port) against one bare mitmdump, OpenAI chat "
            "completions at 32 connections. CPU and RSS count HAProxy and every worker.",
            table(["variant", "req/s", "p50 ms", "p99 ms", "CPU s/1k req", "RSS MiB",
                   "req/s vs bare"],
                  [[r.variant, f"{r.rps:.0f}", f"{r.p50_ms:.2f}", f"{r.p99_ms:.2f}",
                    opt(r.cpu_per_1k, ".2f"), opt(r.rss_mib, ".0f"),
                    f"{r.rps / run.workers[0].rps:.1%}"] for r in run.workers])]
    if run.store:
        plain, pg = (next(r for r in run.store if r.variant == v and r.connections == 1)
                     for v in ("douane + limit, default store", "douane + limit, PostgreSQL store"))
        parts += [
            "## Shared store\n\nThe same douane with a rate limit on the OpenAI grant (too high "
            "to refuse), with the default store (SQLite files, limits in memory) and with "
            "`database:` on a PostgreSQL 15 cluster on the same machine (fsync off); OpenAI chat "
            "completions. CPU counts the PostgreSQL server's processes too. What goes through "
            "the store is what this tree sends there (limits, index, approvals as they land).",
            table(["variant", "connections", "req/s", "p50 ms", "p99 ms", "CPU s/1k req",
                   "RSS MiB"],
                  [[r.variant, str(r.connections), f"{r.rps:.0f}", f"{r.p50_ms:.2f}",
                    f"{r.p99_ms:.2f}", opt(r.cpu_per_1k, ".2f"), opt(r.rss_mib, ".0f")]
                   for r in run.store]),
            f"Cost of the shared store per request (c=1): {pg.p50_ms - plain.p50_ms:+.2f} ms p50, "
            f"{(pg.cpu_per_1k or 0) - (plain.cpu_per_1k or 0):+.2f} ms of CPU (all processes), "
            f"{pg.rps / plain.rps:.1%} of the default store's req/s."]
    lines = targets(run)
    if lines:
        parts += ["## Targets in this run", table(["issue", "target", "measured", "met"], lines)]
    parts += run.notes
    return "\n\n".join(parts) + "\n"


SECTIONS = ("requests", "streams", "workers", "store")
ANALYSIS = "<!-- analysis: kept when scripts/bench rewrites the figures above -->"


def write_doc(text: str) -> None:
    doc = ROOT / "docs" / "benchmarks.md"
    old = doc.read_text() if doc.exists() else ""
    analysis = old[old.index(ANALYSIS):] if ANALYSIS in old else ANALYSIS + "\n"
    doc.write_text("# Benchmarks\n\n" + text + "\n" + analysis)
    print(f"wrote {doc}")


def main() -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter runs (under 3 min)")
    parser.add_argument("--seconds", type=int, help="per wrk run (default 3)")
    parser.add_argument("--rounds", type=int, help="interleaved wrk runs per row (default 3, "
                        "quick 1); a row is their median")
    parser.add_argument("--no-write", action="store_true", help="do not write docs/benchmarks.md")
    parser.add_argument("--twice", action="store_true", help="requests: a second bare mitmdump "
                        "and a second douane of this tree, measured in the same rounds (A/A): "
                        "their ratios to the first show the method's own spread")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections: {', '.join(SECTIONS)}")
    args = parser.parse_args()
    only = set(args.only.split(","))
    if only - set(SECTIONS):
        parser.error(f"unknown section in --only {args.only!r}")
    command = "scripts/bench " + " ".join(sys.argv[1:])
    print(f"{os.cpu_count()} cores, Python {platform.python_version()}: {command}", flush=True)
    started = time.monotonic()
    seconds = args.seconds or 3
    rounds = args.rounds or (1 if args.quick else 3)
    text = report(run(args.quick, only, seconds, rounds, args.twice), command.strip())
    print("\n" + text + f"\n({time.monotonic() - started:.0f} s)")
    if not args.no_write:
        write_doc(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
