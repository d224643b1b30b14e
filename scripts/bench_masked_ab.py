"""Masked gateways from several trees side by side, interleaved in one run: A/B on a busy machine.

Each `--tree NAME=PATH[,VAR=VALUE...]` is a masked douane (scripts/bench_gateway.py's config, 2
masking workers) running that checkout's code (e.g. a `git archive` of main unpacked in /tmp)
with the given environment; bare mitmdump runs beside them. Requests: wrk rows as in
`scripts/bench`, each masked row also as a share of bare's req/s. `--streams`: time to the first
token at c=1 and 32 masked streams started together, with the loop's stalls per phase.

Usage: scripts/bench-masked-ab --tree base=/tmp/main --tree new=. [--streams] [--protocols openai,mcp]
                               [--connections 1,32] [--rounds 3] [--seconds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import bench_gateway as bg
import yaml

from douane import config as configmod
from douane import devissuer


@contextlib.contextmanager
def environment(variables: list[str]):
    saved = dict(os.environ)
    os.environ.update(v.split("=", 1) for v in variables)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def main() -> None:
    parser = argparse.ArgumentParser(prog="scripts/bench-masked-ab",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--tree", action="append", required=True, help="NAME=PATH[,VAR=VALUE...]")
    parser.add_argument("--streams", action="store_true")
    parser.add_argument("--protocols", default="openai")
    parser.add_argument("--connections", default="1,32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="douane-masked-ab-"))
    port = bg.free_port()
    upstream = subprocess.Popen([sys.executable, str(bg.ROOT / "scripts" / "bench_upstream.py"),
                                 str(port)])
    proxies: dict[str, bg.Proxy] = {}
    try:
        bg.wait_port(port)
        (work / "cfg.yaml").write_text(yaml.safe_dump(bg.bench_config(work, port)))
        dev = configmod.load(work / "cfg.yaml", gateway=False).identity.dev_issuer
        token = devissuer.mint(dev, "bench@corp", ["bench"], 3600)
        masked = bg.bench_config(work, port, masking=True)
        proxies["bare"] = (bg.Proxy("bare_streaming", port, work, None,
                                    ("--set", "stream_large_bodies=1"), probe=True)
                           if args.streams else bg.Proxy("bare", port, work, None))
        for tree in args.tree:
            name, spec = tree.split("=", 1)
            path, *variables = spec.split(",")
            with environment(variables):
                proxies[name] = bg.Proxy(name, port, work, masked, root=Path(path).resolve())
        for name, proxy in proxies.items():
            bg.ready(proxy.port, token, masked=name != "bare")
        print("load average before:", os.getloadavg(), flush=True)
        if args.streams:
            bg.measure_streams(proxies, token, True, args.rounds)
        else:
            rows = bg.measure_requests(
                [bg.Target(name, proxy.port, proxy.pid) for name, proxy in proxies.items()],
                token, args.seconds, work, args.protocols.split(","),
                tuple(int(c) for c in args.connections.split(",")), args.rounds)
            bare = {(r.protocol, r.connections): r.rps for r in rows if r.variant == "bare"}
            for r in rows:
                if r.variant != "bare":
                    print(f"{r.variant} {r.protocol} c={r.connections}: "
                          f"{r.rps / bare[r.protocol, r.connections]:.1%} of bare's req/s")
        print("load average after:", os.getloadavg())
    finally:
        for proxy in proxies.values():
            proxy.stop()
        upstream.terminate()
        upstream.wait()


if __name__ == "__main__":
    main()
