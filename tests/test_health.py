"""The event-loop lag probe sees a blocked loop."""

from __future__ import annotations

import asyncio
import json
import time

from mitmproxy.test import taddons

from douane.health import LoopMonitor


def test_probe_measures_a_blocked_loop(tmp_path):
    monitor = LoopMonitor()
    stats = tmp_path / "loop.json"

    async def scenario() -> None:
        with taddons.context(monitor) as tctx:
            tctx.configure(monitor, douane_loop_stats=str(stats))
            monitor.running()
            await asyncio.sleep(0.05)
            assert monitor.max_lag_ms < 40
            time.sleep(0.06)  # a blocking call on the loop
            await asyncio.sleep(0.02)
            monitor.done()

    asyncio.run(scenario())
    assert monitor.max_lag_ms >= 40 and monitor.over_10ms >= 1
    written = json.loads(stats.read_text())
    assert written["max_lag_ms"] >= 40
    assert any(lag >= 40 and abs(at - time.time()) < 60 for at, lag in written["stalls"])
