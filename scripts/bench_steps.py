"""What each of douane's steps costs the main thread per request (`scripts/step_timers.py`), for
this tree and optionally another (`--base`, a checkout such as main's), under wrk at one
connection. Per protocol, both trees' gateways run side by side and take turns (interleaved
rounds); a step's figure is the median CPU µs of its calls, "*" the whole event (the dispatcher,
LoopShare and the steps). The load average is printed before and after.
Usage: scripts/bench-steps [--rounds N] [--seconds S] [--protocols openai,anthropic,mcp]
                           [--base TREE] [--also module:function,...]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from bench_gateway import (
    PROTOCOLS,
    ROOT,
    Proxy,
    ready,
    wrk,
    wrk_script,
)
from bench_recording import loadavg, start_upstream

EVENTS = ("requestheaders", "request", "responseheaders", "response")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=3)
    ap.add_argument("--protocols", default="openai,anthropic,mcp")
    ap.add_argument("--base", type=Path, help="another tree's douane, measured beside this one")
    ap.add_argument("--also", default="", help="functions to time too (step_timers.py's "
                    "douane_step_timers_also: module:name,...)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="douane-bench-steps-"))
    upstream, upstream_port, config, token = start_upstream(work)
    trees = [("douane", ROOT)] + ([("base", args.base.resolve())] if args.base else [])
    print(f"load average before: {loadavg()}", flush=True)
    figures: dict[tuple[str, str], dict[str, list]] = {}
    try:
        for protocol in args.protocols.split(","):
            path, body = PROTOCOLS[protocol]
            proxies = {}
            for name, root in trees:
                out = work / f"{name}-{protocol}-steps.json"
                proxies[name] = (Proxy(f"{name}-{protocol}", upstream_port, work, config,
                                       extra=("-s", str(ROOT / "scripts" / "step_timers.py"),
                                              "--set", f"douane_step_timers={out}",
                                              "--set", f"douane_step_timers_also={args.also}"),
                                       root=root, figures=False), out)
                ready(proxies[name][0].port, token, False)
            script = wrk_script(work, body, token)
            for r in range(args.rounds):
                order = trees[r % len(trees):] + trees[:r % len(trees)]
                for name, _ in order:
                    wrk(proxies[name][0].port, path, script, 1, args.seconds)
            for name, (proxy, out) in proxies.items():
                proxy.stop()
                figures[name, protocol] = json.loads(out.read_text())
            print(f"{protocol} done (load average {loadavg()})", flush=True)
    finally:
        upstream.terminate()
        upstream.wait()
    print(f"\nload average after: {loadavg()}; {args.rounds} rounds of {args.seconds} s at one "
          "connection; median CPU µs per call of the main thread")
    names = [n for n, _ in trees]
    for protocol in args.protocols.split(","):
        print(f"\n{protocol}\n| step | {' | '.join(names)} |\n|---|{'---|' * len(names)}")
        steps = list(dict.fromkeys(s for n in names for s in figures[n, protocol]))
        for step in (s for s in steps if ":" in s):
            cells = [figures[n, protocol].get(step) for n in names]
            print(f"| {step} (calls per request) | " + " | ".join(
                f"{c[2]:.1f} ({c[0] / figures[n, protocol]['request *'][0]:.1f})" if c else "-"
                for n, c in zip(names, cells, strict=True)) + " |")
        for event in EVENTS:
            for step in sorted((s for s in steps if s.split(" ")[0] == event),
                               key=lambda s: (not s.endswith("*"), s)):
                cells = [figures[n, protocol].get(step) for n in names]
                if all(c is None or c[2] < 3 for c in cells) and not step.endswith("*"):
                    continue  # the steps that do nothing here
                print(f"| {step} | " + " | ".join(f"{c[2]:.1f}" if c else "-" for c in cells)
                      + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
