"""`scripts/run --workers N`: N gateway processes of one machine behind HAProxy on the one port.

Each worker is a mitmdump on a loopback port with its own admin listener (/healthz); HAProxy (TCP
mode) balances new connections over the workers whose /healthz answers 200, so a worker that is
starting, draining or dead gets none. The workers share the configuration, the CA (certs/) and
the keys; each writes its own audit chain and recordings folder (`douane_worker`, see
`settings.for_worker`). Approvals and rate limits live in each process's memory: with N > 1 they
would be per worker, so a configuration with approvals is refused until a shared store exists.

    python -m douane.workers --workers N|auto --config FILE --host H --port P --confdir DIR \
        [-- mitmdump options]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from douane import config as configmod

GATEWAY = Path(__file__).resolve().parents[1] / "gateway.py"
START_SECONDS = 300  # a worker loads the NER model; the machine may be loaded
DRAIN_SECONDS = 10


@dataclass
class Worker:
    name: str
    port: int
    admin: int
    proc: subprocess.Popen[bytes] | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def haproxy_config(host: str, port: int, workers: list[Worker]) -> str:
    """TCP balancing (TLS and CONNECT pass through untouched) with HTTP checks of /healthz."""
    servers = "\n".join(f"    server {w.name} 127.0.0.1:{w.port} check port {w.admin}"
                        for w in workers)
    return f"""# written by douane (scripts/run --workers); regenerated at every start
global
    maxconn 4000

defaults
    mode tcp
    timeout connect 5s
    timeout client 10m
    timeout server 10m
    retries 2
    option redispatch

frontend douane
    bind {host}:{port}
    default_backend workers

backend workers
    balance leastconn
    option httpchk GET /healthz
    http-check expect status 200
    default-server inter 1s fall 2 rise 2
{servers}
"""


def healthz(worker: Worker) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{worker.admin}/healthz", timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def start(worker: Worker, args: argparse.Namespace) -> None:
    worker.proc = subprocess.Popen([
        shutil.which("mitmdump") or "mitmdump", "-s", str(GATEWAY),
        "--set", f"douane_config={args.config}", "--set", f"confdir={args.confdir}",
        "--set", f"douane_worker={worker.name}",
        "--set", f"douane_metrics_listen=127.0.0.1:{worker.admin}",
        "--set", f"douane_drain_seconds={DRAIN_SECONDS}",
        "--listen-host", "127.0.0.1", "--listen-port", str(worker.port), *args.mitmdump])
    print(f"douane: worker {worker.name} (pid {worker.proc.pid}) on 127.0.0.1:{worker.port}, "
          f"/healthz on 127.0.0.1:{worker.admin}", file=sys.stderr, flush=True)


def wait_started(worker: Worker) -> bool:
    """Until its admin listener answers (ready or not: keys may come later)."""
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        assert worker.proc
        if worker.proc.poll() is not None:
            return False
        if healthz(worker) is not None:
            return True
        time.sleep(0.2)
    return False


def listening(host: str, port: int, balancer: subprocess.Popen[bytes]) -> bool:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and balancer.poll() is None:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return True
        except OSError:
            time.sleep(0.1)
    return False


def count(value: str) -> int:
    n = (os.cpu_count() or 1) if value == "auto" else int(value)
    if not 1 <= n <= 64:
        raise argparse.ArgumentTypeError("expected 1 to 64 workers, or auto")
    return n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/run --workers")
    parser.add_argument("--workers", type=count, required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--confdir", required=True)
    parser.add_argument("mitmdump", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.mitmdump[:1] == ["--"]:
        args.mitmdump = args.mitmdump[1:]
    config = configmod.load(args.config, gateway=False)
    if args.workers > 1 and "approvals" in config.sections:
        print("douane: approvals need one store shared by the workers (PostgreSQL, not built "
              "yet); with --workers > 1 a flow held on one worker could not be approved through "
              "another. Run one worker, or take the approvals section out.", file=sys.stderr)
        return 2
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        print("douane: --workers needs HAProxy (Debian package haproxy)", file=sys.stderr)
        return 2
    workers = [Worker(f"w{i + 1}", free_port(), free_port()) for i in range(args.workers)]
    run_dir = Path(tempfile.mkdtemp(prefix="douane-haproxy-"))
    cfg = run_dir / "haproxy.cfg"
    cfg.write_text(haproxy_config(args.host, args.port, workers))
    balancer: subprocess.Popen[bytes] | None = None
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        # The first worker alone creates what the others share (keys, the CA's files, folders).
        start(workers[0], args)
        if not wait_started(workers[0]):
            print("douane: the first worker did not start", file=sys.stderr)
            return 1
        for worker in workers[1:]:
            start(worker, args)
        if not all(wait_started(w) for w in workers[1:]):
            print("douane: a worker did not start", file=sys.stderr)
            return 1
        balancer = subprocess.Popen([haproxy, "-db", "-f", str(cfg)])
        if not listening(args.host, args.port, balancer):
            print("douane: HAProxy did not start", file=sys.stderr)
            return 1
        print(f"douane: {len(workers)} workers behind HAProxy (pid {balancer.pid}) on "
              f"http://{args.host}:{args.port} (config {cfg})", file=sys.stderr, flush=True)
        while not stopping:
            if balancer.poll() is not None:
                print("douane: HAProxy exited; stopping", file=sys.stderr)
                return 1
            if all(w.proc and w.proc.poll() is not None for w in workers):
                print("douane: every worker exited; stopping", file=sys.stderr)
                return 1
            time.sleep(0.5)
        return 0
    finally:
        # Draining: each worker's /healthz says 503 while its flows finish, and the balancer,
        # still running, sends new connections to none of them.
        for w in workers:
            if w.proc and w.proc.poll() is None:
                w.proc.send_signal(signal.SIGTERM)
        for w in workers:
            if w.proc:
                try:
                    w.proc.wait(DRAIN_SECONDS + 20)
                except subprocess.TimeoutExpired:
                    w.proc.kill()
        if balancer and balancer.poll() is None:
            balancer.terminate()
            balancer.wait(10)
        shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
