"""scripts/loop_timeline.py keeps the slow passes of the loop and what ran in them."""

from __future__ import annotations

import asyncio
import gc
import json
import time
from asyncio import base_events, events
from pathlib import Path

from mitmproxy.test import taddons

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "loop_timeline.py"


def test_a_slow_pass_is_kept_with_its_callbacks(tmp_path, monkeypatch):
    # restored after the test: the script patches them
    monkeypatch.setattr(events.Handle, "_run", events.Handle._run)
    monkeypatch.setattr(base_events.BaseEventLoop, "_run_once", base_events.BaseEventLoop._run_once)
    gc_callbacks = list(gc.callbacks)
    out = tmp_path / "passes.jsonl"
    with taddons.context() as tctx:
        [timeline] = tctx.script(str(SCRIPT)).addons
        tctx.configure(timeline, douane_loop_timeline=str(out))

        def slow() -> None:  # 20 ms of the loop's own work, and a collection
            end = time.thread_time() + 0.02
            while time.thread_time() < end:
                pass
            gc.collect()

        async def scenario() -> None:
            loop = asyncio.get_running_loop()
            loop.call_soon(slow)
            await asyncio.sleep(0.01)
            loop.call_soon(lambda: None)  # a quick pass: not kept
            await asyncio.sleep(0.01)

        try:
            asyncio.run(scenario())
        finally:
            gc.callbacks[:] = gc_callbacks
        timeline.done()
    passes = [json.loads(line) for line in out.read_text().splitlines()]
    [kept] = [p for p in passes if "test_a_slow_pass_is_kept_with_its_callbacks.<locals>.slow"
              in p["callbacks"]]
    assert kept["cpu_ms"] >= 19 and kept["ms"] >= kept["cpu_ms"] - 1
    n, _, cpu = kept["callbacks"]["test_a_slow_pass_is_kept_with_its_callbacks.<locals>.slow"]
    assert n == 1 and cpu >= 19
    assert kept["callbacks"]["gc 2"][0] == 1  # inside it, counted apart
    assert all(p["ms"] > 5 for p in passes)
