"""Workers behind HAProxy vs one bare mitmdump (issue 20): scripts/bench-workers [SECONDS]

wrk (Debian package `wrk`) drives JSON chat completions over 16 keep-alive connections for SECONDS
(default 10) against: bare mitmdump (reverse proxy, no douane), then `scripts/run --workers 1` and
`--workers 2` (douane behind HAProxy, recording on). Prints one Markdown row per variant.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from bench_gateway import CHAT, ROOT, Proxy, bench_config, free_port, wait_port

from douane import config as configmod
from douane import devissuer

CONNECTIONS = 16


def wrk(port: int, token: str | None, seconds: int, work: Path) -> tuple[float, str]:
    script = work / "post.lua"
    auth = f'wrk.headers["authorization"] = "Bearer {token}"\n' if token else ""
    script.write_text(f'wrk.method = "POST"\nwrk.body = [[{CHAT.decode()}]]\n'
                      f'wrk.headers["content-type"] = "application/json"\n{auth}'
                      # the first refusal is printed: a benchmark of refusals measures nothing
                      'shown = false\nresponse = function(status, headers, body)\n'
                      '  if status ~= 200 and not shown then print(status, body) shown = true end\n'
                      'end\n')
    out = subprocess.run(["wrk", "-t2", f"-c{CONNECTIONS}", f"-d{seconds}s", "--latency",
                          "-s", str(script), f"http://127.0.0.1:{port}/v1/chat/completions"],
                         capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        raise SystemExit(f"{non2xx.group(1)} refused requests:\n{out}")
    return rps, p50


def workers(n: int, config: Path, work: Path, upstream_port: int) -> tuple[subprocess.Popen[bytes],
                                                                         int]:
    port = free_port()
    log = (work / f"workers{n}.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "douane.workers", "--workers", str(n),
                             "--config", str(config), "--port", str(port),
                             "--confdir", str(work / "confdir"), "--",
                             "--mode", f"reverse:http://127.0.0.1:{upstream_port}"],
                            stdout=log, stderr=log, start_new_session=True,
                            env={**os.environ, "BENCH_UPSTREAM_KEY": "sk-bench-upstream"})
    deadline = time.monotonic() + 300
    while "workers behind HAProxy" not in (work / f"workers{n}.log").read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit((work / f"workers{n}.log").read_text())
        time.sleep(0.2)
    time.sleep(3)  # the health checks mark every worker up (rise 2, inter 1s)
    return proc, port


def main() -> int:
    seconds = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    work = Path(tempfile.mkdtemp(prefix="douane-bench-workers-"))
    upstream_port = free_port()
    upstream = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "bench_upstream.py"),
                                 str(upstream_port)])
    wait_port(upstream_port)
    config = work / "cfg.yaml"
    config.write_text(yaml.safe_dump(bench_config(work, upstream_port, masking=False)))
    dev = configmod.load(config, gateway=False).identity.dev_issuer
    token = devissuer.mint(dev, "bench@corp", ["bench"], 3600)
    rows = []
    try:
        bare = Proxy("bare", upstream_port, work, None)
        rows.append(("bare mitmdump (1 process)", *wrk(bare.port, None, seconds, work)))
        bare.stop()
        for n in (1, 2):
            proc, port = workers(n, config, work, upstream_port)
            try:
                rows.append((f"douane, {n} worker(s) behind HAProxy", *wrk(port, token, seconds,
                                                                             work)))
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
    finally:
        upstream.terminate()
    print(f"| variant ({os.cpu_count()} cores, wrk -t2 -c{CONNECTIONS} -d{seconds}s) "
          "| req/s | p50 |\n| --- | --- | --- |")
    for name, rps, p50 in rows:
        print(f"| {name} | {rps:.0f} | {p50} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
