"""What LoopShare costs the event loop when many flows share it, without sockets to a proxy:
an in-process model of N connections (default 32) in a closed loop, each request four events
through a `Checkpoint` whose steps use 20-450 µs of CPU (requestheaders 40, request 150,
responseheaders 20, response 300, each x0.5-1.5), and before each event mitmproxy's read
(`--io` µs, default 60) in a reader callback woken through a socket pair by the loop's selector,
as a connection's bytes are. Prints, per tree, CPU µs per request of the thread, loop passes,
callbacks and LoopShare's waits (a flow parked or called again; before: each `asyncio.sleep(0)`)
per request. Trees run in turns (`--rounds`), each in its own process.

Usage: scripts/bench-loopshare [--base TREE] [--connections N] [--requests N] [--rounds N]
                               [--io US]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from asyncio import base_events, events
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COST = {"requestheaders": 40e-6, "request": 150e-6, "responseheaders": 20e-6, "response": 300e-6}


def busy(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def measure(connections: int, requests: int, io: float) -> dict[str, float]:
    """In this process: the model run once, its figures per request."""
    from mitmproxy.test import tflow

    from douane import loopshare
    from douane.pipeline import Checkpoint, Order

    counts = {"passes": 0, "callbacks": 0, "waits": 0}
    run_once, run = base_events.BaseEventLoop._run_once, events.Handle._run

    def counted_run_once(self) -> None:
        counts["passes"] += 1
        run_once(self)

    def counted_run(self) -> None:
        counts["callbacks"] += 1
        run(self)

    base_events.BaseEventLoop._run_once = counted_run_once  # type: ignore[method-assign]
    events.Handle._run = counted_run  # type: ignore[method-assign]

    class Asyncio:  # loopshare's asyncio, its sleeps counted (the polling before the queue)
        def __getattr__(self, name: str):
            return getattr(asyncio, name)

        @staticmethod
        def sleep(delay: float, *args):
            counts["waits"] += 1
            return asyncio.sleep(delay, *args)

    loopshare.asyncio = Asyncio()  # type: ignore[assignment]
    wait = getattr(loopshare.LoopShare, "_wait", None)
    if wait is not None:
        async def counted_wait(self) -> None:
            counts["waits"] += 1
            await wait(self)
        loopshare.LoopShare._wait = counted_wait  # type: ignore[method-assign]

    rng = random.Random(1)

    def step_of(cost: float):
        return lambda flow: busy(cost * rng.uniform(0.5, 1.5))

    checkpoint = Checkpoint((), Order(**{event: (step_of(cost),) for event, cost in COST.items()}))
    done = [0]

    async def connection() -> None:
        loop = asyncio.get_running_loop()
        ours, peer = socket.socketpair()
        ours.setblocking(False)
        waiter: list[asyncio.Future] = []

        def readable() -> None:
            ours.recv(16)
            busy(io)
            waiter.pop().set_result(None)

        loop.add_reader(ours.fileno(), readable)
        flow = tflow.tflow()
        while done[0] < requests:
            for event in COST:
                waiter.append(loop.create_future())
                peer.send(b"x")  # ready at the loop's next look at its sockets
                await waiter[0]
                await getattr(checkpoint, event)(flow)
            done[0] += 1
        loop.remove_reader(ours.fileno())
        ours.close()
        peer.close()

    async def main() -> None:
        await asyncio.gather(*(connection() for _ in range(connections)))

    cpu = time.thread_time()
    asyncio.run(main())
    cpu = time.thread_time() - cpu
    return {"cpu_us": cpu / done[0] * 1e6, **{k: v / done[0] for k, v in counts.items()}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", type=Path, help="another tree's douane, measured in turns")
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--requests", type=int, default=1500)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--io", type=float, default=60, help="µs of mitmproxy's work per read")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.connections, args.requests, args.io / 1e6)))
        return 0
    trees = [("douane", ROOT)] + ([("base", args.base.resolve())] if args.base else [])
    print(f"load average before: {os.getloadavg()}", flush=True)
    figures: dict[str, list[dict[str, float]]] = {name: [] for name, _ in trees}
    for r in range(args.rounds):
        for name, tree in trees[r % len(trees):] + trees[:r % len(trees)]:
            out = subprocess.run(
                [sys.executable, __file__, "--child", "--connections", str(args.connections),
                 "--requests", str(args.requests), "--io", str(args.io)],
                env={**os.environ, "PYTHONPATH": str(tree / "addons")},
                capture_output=True, text=True, check=True).stdout
            figures[name].append(json.loads(out))
    print(f"load average after: {os.getloadavg()}; {args.connections} connections, "
          f"{args.requests} requests, {args.rounds} round(s); per request, the median of the rounds")
    print("| tree | CPU µs | loop passes | callbacks | LoopShare waits |\n|---|---|---|---|---|")
    for name, runs in figures.items():
        m = {key: sorted(run[key] for run in runs)[len(runs) // 2] for key in runs[0]}
        print(f"| {name} | {m['cpu_us']:.0f} | {m['passes']:.2f} | {m['callbacks']:.2f} | "
              f"{m['waits']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
