"""The event-loop lag probe sees a blocked loop, and what of it was the process's own work."""

from __future__ import annotations

import asyncio
import gc
import json
import time
from pathlib import Path

from mitmproxy.test import taddons

from douane.health import LoopMonitor, LoopProbe

ROOT = Path(__file__).resolve().parents[1]


def busy(cpu_seconds: float) -> None:
    """Blocks the loop on its own work: until this thread has used `cpu_seconds` of CPU."""
    end = time.thread_time() + cpu_seconds
    while time.thread_time() < end:
        pass


def test_probe_measures_a_blocked_loop(tmp_path):
    monitor = LoopMonitor()
    stats = tmp_path / "loop.json"

    async def scenario() -> None:
        with taddons.context(monitor) as tctx:
            tctx.configure(monitor, douane_loop_stats=str(stats))
            monitor.running()
            # idle waiting is no lag: an idle 0.3 s reads far under it (a loaded host's
            # preemptions, tens of ms, made a 40 ms bound after 0.05 s a race)
            await asyncio.sleep(0.3)
            assert monitor.max_lag_ms < 150, monitor.max_lag_ms
            time.sleep(0.06)  # a blocking call on the loop: waiting, not working
            await asyncio.sleep(0.02)
            busy(0.06)  # the loop's own work
            await asyncio.sleep(0.02)
            monitor.done()

    asyncio.run(scenario())
    assert monitor.max_lag_ms >= 40 and monitor.over_10ms >= 2
    written = json.loads(stats.read_text())
    assert written["max_lag_ms"] >= 40
    big = [(lag, cpu) for at, lag, cpu in written["stalls"] if lag >= 40 and time.time() - at < 60]
    # the CPU column tells the two apart (a loaded machine may add stalls of the first kind)
    assert any(cpu < 20 for _, cpu in big), big  # waited
    assert any(cpu >= 50 for _, cpu in big), big  # worked


def test_the_probe_alone_loads_into_bare_mitmproxy(tmp_path):
    """addons/loopprobe.py: the probe, without douane's gc.freeze (a benchmark's bare mitmdump
    must not get douane's tuning)."""
    gc.unfreeze()
    with taddons.context() as tctx:
        script = tctx.script(str(ROOT / "addons" / "loopprobe.py"))
        [probe] = script.addons
        assert type(probe) is LoopProbe
        tctx.configure(probe, douane_loop_stats=str(tmp_path / "loop.json"))

        async def start() -> None:
            probe.running()
            await asyncio.sleep(0.02)
            probe.done()

        asyncio.run(start())
    assert gc.get_freeze_count() == 0
    assert probe.samples >= 1 and json.loads((tmp_path / "loop.json").read_text())["samples"]


def test_an_idle_loop_is_not_woken_by_the_probe(tmp_path):
    """The probe times the loop's passes as they happen: no timer of its own wakes an idle loop
    (a 5 ms one made 60 passes in 0.3 s), and the figures file's timer runs once a second."""
    probe = LoopProbe()
    stats = tmp_path / "loop.json"

    async def scenario() -> None:
        with taddons.context(probe) as tctx:
            probe.running()
            await asyncio.sleep(0.3)
            idle = probe.samples
            tctx.configure(probe, douane_loop_stats=str(stats))
            await asyncio.sleep(1.3)  # one write
            written = json.loads(stats.read_text())
            probe.done()
            assert idle <= 5, idle
            assert written["samples"] <= idle + 5, written

    asyncio.run(scenario())


def test_the_cpu_clock_is_read_only_for_the_figures_file(tmp_path, monkeypatch):
    """The thread's CPU clock is a system call: the probe reads it each pass only while the
    figures file (its only reader) is asked for; lags are timed either way."""
    probe = LoopProbe()
    reads = []
    clock = time.thread_time
    monkeypatch.setattr(time, "thread_time", lambda: reads.append(1) or clock())

    async def scenario() -> None:
        with taddons.context(probe) as tctx:
            probe.running()
            for _ in range(20):
                await asyncio.sleep(0)
            assert probe.samples >= 20 and not reads
            tctx.configure(probe, douane_loop_stats=str(tmp_path / "loop.json"))
            for _ in range(20):
                await asyncio.sleep(0)
            probe.done()
            assert len(reads) >= 20

    asyncio.run(scenario())
