"""`scripts/run --workers N`: N gateway processes of one machine behind HAProxy on the one port.

Each worker is a mitmdump on a loopback port with its own admin listener (/healthz); HAProxy (TCP
mode) balances new connections over the workers whose /healthz answers 200, so a worker that is
starting, draining or dead gets none. The workers share the configuration, the CA (certs/) and
the keys; each writes its own audit chain and recordings folder (`douane_worker`, see
`settings.for_worker`). With a shared store (`database:`, PostgreSQL) the workers share approvals,
grants, limits, the session index and the audit chain heads; each worker's approvals API listens
on a loopback port of its own, behind a second HAProxy frontend on `approvals.listen`. Without
one, approvals and limits would live in each process's memory: with N > 1 a configuration with
approvals is refused.
A worker that exits is started again on its ports (HAProxy takes it back once its /healthz says
ready), after a delay that doubles while it keeps dying young; one that dies young
`GIVE_UP` times in a row is left down, and when every worker is, `scripts/run` exits.

    python -m douane.workers --workers N|auto --config FILE --host H --port P --confdir DIR \
        [-- mitmdump options]
"""

from __future__ import annotations

import argparse
import contextlib
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
STABLE_SECONDS = 60  # a worker that ran this long before exiting starts again at once
RESTART_MAX_DELAY = 30
GIVE_UP = 5


@dataclass
class Worker:
    name: str
    port: int
    admin: int
    approvals: int = 0  # its approvals API's port, when the config has approvals
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0  # monotonic
    failures: int = 0  # exits in a row within STABLE_SECONDS of a start
    restart_at: float | None = None

    @property
    def given_up(self) -> bool:
        return self.failures >= GIVE_UP


def free_ports(n: int) -> list[int]:
    """`n` distinct free loopback ports. Every socket stays bound until all are: a port asked for,
    freed and asked for again can come back twice (two workers on one admin port: the second
    exited at startup, restarted on the same port, forever)."""
    with contextlib.ExitStack() as held:
        sockets = [held.enter_context(socket.socket()) for _ in range(n)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def haproxy_config(host: str, port: int, workers: list[Worker],
                   approvals: tuple[str, int] | None = None) -> str:
    """TCP balancing (TLS and CONNECT pass through untouched) with HTTP checks of /healthz; the
    approvals APIs behind `approvals` (HOST, PORT), by client address (an approver's browser stays
    on one worker: the inbox's login and status links are a process's own)."""
    servers = "\n".join(f"    server {w.name} 127.0.0.1:{w.port} check port {w.admin}"
                        for w in workers)
    api = "" if approvals is None else f"""
frontend approvals
    bind {approvals[0]}:{approvals[1]}
    default_backend approvals

backend approvals
    balance source
    option httpchk GET /healthz
    http-check expect status 200
    default-server inter 1s fall 2 rise 2
""" + "\n".join(f"    server {w.name} 127.0.0.1:{w.approvals} check port {w.admin}"
                for w in workers) + "\n"
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
{api}"""


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
        *(["--set", f"douane_worker_approvals={worker.approvals}"] if worker.approvals else []),
        "--listen-host", "127.0.0.1", "--listen-port", str(worker.port), *args.mitmdump])
    worker.started = time.monotonic()
    api = f", approvals API on 127.0.0.1:{worker.approvals}" if worker.approvals else ""
    print(f"douane: worker {worker.name} (pid {worker.proc.pid}) on 127.0.0.1:{worker.port}, "
          f"/healthz on 127.0.0.1:{worker.admin}{api}", file=sys.stderr, flush=True)


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


def supervise(worker: Worker, args: argparse.Namespace) -> None:
    """Start a worker that exited again, on its ports, after a delay (1 s, doubling while it
    keeps dying young, at most RESTART_MAX_DELAY)."""
    if worker.proc is None or worker.proc.poll() is None or worker.given_up:
        return
    now = time.monotonic()
    if worker.restart_at is None:
        young = now - worker.started < STABLE_SECONDS
        worker.failures = worker.failures + 1 if young else 0
        if worker.given_up:
            print(f"douane: worker {worker.name} exited (code {worker.proc.returncode}) "
                  f"{GIVE_UP} times in a row within {STABLE_SECONDS}s of starting; left down",
                  file=sys.stderr, flush=True)
            return
        delay = min(RESTART_MAX_DELAY, 2 ** max(0, worker.failures - 1))
        worker.restart_at = now + delay
        print(f"douane: worker {worker.name} (pid {worker.proc.pid}) exited (code "
              f"{worker.proc.returncode}); restarting it in {delay}s", file=sys.stderr,
              flush=True)
    elif now >= worker.restart_at:
        worker.restart_at = None
        start(worker, args)


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
    approvals = config.sections.get("approvals")
    if args.workers > 1 and approvals and config.database is None:
        print("douane: approvals need one store shared by the workers: with --workers > 1 and "
              "no database (PostgreSQL), a flow held on one worker could not be approved through "
              "another. Configure database:, run one worker, or take the approvals section out.",
              file=sys.stderr)
        return 2
    if approvals and approvals.port == 0:
        print("douane: with --workers, approvals.listen needs a fixed port: the balancer listens "
              "there for every worker's approvals API", file=sys.stderr)
        return 2
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        print("douane: --workers needs HAProxy (Debian package haproxy)", file=sys.stderr)
        return 2
    ports = iter(free_ports(3 * args.workers))
    workers = [Worker(f"w{i + 1}", next(ports), next(ports), next(ports) if approvals else 0)
               for i in range(args.workers)]
    run_dir = Path(tempfile.mkdtemp(prefix="douane-haproxy-"))
    cfg = run_dir / "haproxy.cfg"
    cfg.write_text(haproxy_config(args.host, args.port, workers,
                                  (approvals.host, approvals.port) if approvals else None))
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
            for w in workers:
                supervise(w, args)
            if all(w.given_up for w in workers):
                print("douane: every worker keeps exiting; stopping", file=sys.stderr)
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
