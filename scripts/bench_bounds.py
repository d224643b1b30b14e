"""What one heavy request costs the others, through a real gateway (docs/security.md, "Bounds").

A client sends small chat requests one after another while a heavy one goes through: 300k tiny
messages in 9 MB, or a 9 MB prompt of base64-looking runs (with a `decode_base64` deny rule).
Printed per case: the heavy request's status and time, the event loop's largest stall during it
(douane's LoopMonitor), the small requests' worst latency, the gateway's CPU seconds.
`--streams`: the CPU time the stream rewriter (run on the event loop) spends on 2, 4, 8 and 16 MiB
answers in 256-character deltas, as it is and with the old `text += delta` accumulation.

    .venv/bin/python scripts/bench_bounds.py [--old]   # --old: a config without the new keys
    .venv/bin/python scripts/bench_bounds.py --streams
"""

from __future__ import annotations

import base64
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "addons"))

from tests.hardening.conftest import write_policy  # noqa: E402
from tests.support.gateway import Gateway, base_config  # noqa: E402
from tests.support.issuer import TestIssuer  # noqa: E402
from tests.support.upstream import FakeUpstream  # noqa: E402


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100


def bodies() -> dict[str, bytes]:
    tiny = {"model": "m", "messages": [{"role": "user", "content": "a"}] * 300_000}
    run = base64.b64encode(b"hello world, this is fine ").decode()
    prompt = " ".join([run] * (9 * 1024**2 // (len(run) + 1)))
    return {"300k tiny messages": json.dumps(tiny, separators=(",", ":")).encode(),
            "9 MB of base64 runs": json.dumps({"model": "m", "messages": [
                {"role": "user", "content": prompt}]}).encode()}


def streams() -> None:
    from douane.interaction import Interaction
    from douane.protocols import openai, streams
    from tests.support.upstream import _openai_chat_events

    def quadratic(self: streams.StreamedText, text: str) -> None:
        self.text = self.text + text  # what `piece.text += text` did

    linear = streams.StreamedText.append
    for mib in (2, 4, 8, 16):
        text = "x" * (mib * 1024**2)
        data = "".join(_openai_chat_events("m", [text[i:i + 256] for i in range(
            0, len(text), 256)])).encode()
        figures = []
        for append in (linear, quadratic):
            rewriter = streams.StreamRewriter(openai.ChatStream(), Interaction(
                "openai", "chat.completions"), "bench")
            streams.StreamedText.append = append  # type: ignore[method-assign]
            start = time.process_time()
            for i in range(0, len(data), 16 * 1024):
                rewriter(data[i:i + 16 * 1024])
            rewriter(b"")
            figures.append(time.process_time() - start)
            assert rewriter.abort_message is None
        print(f"{mib} MiB stream ({len(data) / 1024**2:.0f} MiB of SSE): {figures[0]:.2f} s "
              f"(with text += delta: {figures[1]:.2f} s)", flush=True)


def main() -> int:
    if "--streams" in sys.argv:
        streams()
        return 0
    old = "--old" in sys.argv
    work = Path(tempfile.mkdtemp(prefix="douane-bench-bounds-"))
    issuer, llm = TestIssuer(), FakeUpstream()
    config = base_config(issuer.url, llm.url, policy={"files": [write_policy(work)]})
    config["upstreams"]["claude"] = {"url": llm.url + "/anthropic", "protocol": "anthropic",
                                     "credential": {"env": "DOUANE_TEST_UPSTREAM_KEY"}}
    if not old:
        config["gateway"] = {"max_text_pieces": 10_000}
    stats = work / "loop.json"
    token = issuer.mint("bench@corp.example", ["engineering"])
    headers = {"authorization": f"Bearer {token}", "content-type": "application/json"}
    small = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
    with Gateway(config, mode=f"reverse:{llm.url}", workdir=work / "gw",
                 args=["--set", f"douane_loop_stats={stats}"],
                 env={"DOUANE_TEST_UPSTREAM_KEY": "sk-bench"}) as gw:
        assert gw.proc
        for name, body in bodies().items():
            httpx.post(gw.url + "/v1/chat/completions", content=small, headers=headers)
            latencies: list[float] = []
            done = threading.Event()

            def others(done: threading.Event, latencies: list[float]) -> None:
                with httpx.Client(headers=headers, timeout=120) as client:
                    while not done.is_set():
                        t = time.perf_counter()
                        client.post(gw.url + "/v1/chat/completions", content=small)
                        latencies.append(time.perf_counter() - t)

            thread = threading.Thread(target=others, args=(done, latencies))
            time.sleep(1.5)
            t0, cpu0 = time.time(), cpu_seconds(gw.proc.pid)
            thread.start()
            start = time.perf_counter()
            resp = httpx.post(gw.url + "/v1/chat/completions", content=body, headers=headers,
                              timeout=300)
            took = time.perf_counter() - start
            done.set()
            thread.join()
            cpu = cpu_seconds(gw.proc.pid) - cpu0
            time.sleep(1.3)
            stalls = json.loads(stats.read_text())["stalls"]
            stall = max((ms for t, ms, *_ in stalls if t >= t0), default=0.0)
            print(f"{name} ({len(body) / 1024**2:.1f} MB): {resp.status_code} in {took:.2f} s; "
                  f"largest loop stall {stall:.0f} ms; other clients' worst latency "
                  f"{max(latencies) * 1000:.0f} ms over {len(latencies)} requests; gateway CPU "
                  f"{cpu:.2f} s", flush=True)
    llm.close()
    issuer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
