"""The event loop's lag probe (`LoopProbe`), and douane's `LoopMonitor` built on it.

A stall is one pass of the event loop longer than 10 ms: from the moment its selector returned
(events ready, timers due) to the moment the loop comes back to the selector, it ran callbacks
and nothing else was served; an event arriving meanwhile waited up to that long. The probe times
each pass by wrapping the loop's `selector.select` (two clock reads per pass, no wake-up of its
own; the thread's CPU clock, a system call, is read only while the figures are asked for): it measures the loop's own work as it happens, where a timer
firing every 5 ms woke an idle gateway 200 times a second (~14 ms of CPU a second) and cost
~30-100 µs per request at concurrency 1, and saw only the part of a stall after its due time.
A pass includes the time the thread was preempted during it (a loaded machine), not the time
it waited for a core after the selector's sleep ended.

The largest stall is logged at shutdown, a stall over 100 ms is logged when it ends, and with
`--set douane_loop_stats=FILE` the figures are written to FILE every second (a timer armed only
then, for benchmarks), with each of the last 1,000 stalls over 10 ms as `[unix time it ended, ms
long, CPU ms]` so a benchmark can tell which of its phases (start-up, warm-up, a load's start,
middle or end) a stall belongs to. The CPU ms is the main thread's own CPU time during that pass:
on a loaded machine a stall is also time the process waited for a core, which its own work does
not explain.

The probe alone loads into a bare mitmdump too (`mitmdump -s addons/loopprobe.py`), so a benchmark
reads bare mitmproxy's stalls with the same instrument as douane's.

douane's `LoopMonitor` adds one thing at start: the objects alive then (modules, the
configuration, the compiled policy, imported libraries) are frozen out of the garbage collector's
reach (`gc.freeze()`): a full collection then scans only what traffic created, instead of pausing
the loop for ~100 ms under load.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import time
from collections import deque
from pathlib import Path

from mitmproxy import ctx

logger = logging.getLogger(__name__)
STALL_MS = 10.0
WARN_MS = 100.0
WRITE_EVERY = 1.0  # seconds between writes of `douane_loop_stats`


class LoopProbe:
    def __init__(self) -> None:
        self.lag_ms = 0.0  # the last pass's length
        self.max_lag_ms = 0.0
        self.over_10ms = 0
        self.samples = 0  # passes timed
        # (unix time it ended, ms long, CPU ms of the main thread meanwhile, None when not read) of
        # stalls over 10 ms
        self.stalls: deque[tuple[float, float, float | None]] = deque(maxlen=1000)
        self._selector = None
        self._timer: asyncio.TimerHandle | None = None
        # each pass's CPU time, for the figures file alone: reading it is a system call per pass
        # (~9 per request at concurrency 1), not the vDSO read of the monotonic clock
        self._cpu_kept = False
        self._cpu: float | None = None

    def load(self, loader) -> None:
        loader.add_option("douane_loop_stats", str, "",
                          "Write event-loop lag figures (JSON) to this file every second.")

    def configure(self, updated: set[str]) -> None:
        if "douane_loop_stats" in updated:
            self._cpu_kept = bool(ctx.options.douane_loop_stats)
            if self._selector is not None:
                self._arm()

    def running(self) -> None:
        self._loop = asyncio.get_running_loop()
        selector = getattr(self._loop, "_selector", None)
        if selector is None or "select" in vars(selector):  # not asyncio's, or probed already
            logger.warning("douane: the event loop's passes cannot be timed; no stall figures")
            return
        self._selector, self._select = selector, selector.select
        self._woke, self._cpu = time.monotonic(), self._cpu_now()
        selector.select = self._timed_select
        self._arm()

    def done(self) -> None:
        if self._timer:
            self._timer.cancel()
            self._timer = None
        if self._selector is not None:
            del self._selector.select  # the class's own again
            self._selector = None
        self._write()
        logger.info("douane: largest event-loop stall %.1f ms (%d over 10 ms in %d passes)",
                    self.max_lag_ms, self.over_10ms, self.samples)

    def _timed_select(self, timeout: float | None = None) -> list:
        lag = (time.monotonic() - self._woke) * 1000
        self.samples += 1
        self.lag_ms = lag
        if lag > self.max_lag_ms:
            self.max_lag_ms = lag
        if lag > STALL_MS:
            self.over_10ms += 1
            cpu = None if self._cpu is None else round((time.thread_time() - self._cpu) * 1000, 1)
            self.stalls.append((round(time.time(), 3), round(lag, 1), cpu))
            if lag > WARN_MS:
                logger.warning("douane: the event loop stalled for %.0f ms", lag)
        events = self._select(timeout)
        self._woke, self._cpu = time.monotonic(), self._cpu_now()
        return events

    def _cpu_now(self) -> float | None:
        return time.thread_time() if self._cpu_kept else None

    def _arm(self) -> None:
        if self._timer is None and ctx.options.douane_loop_stats:
            self._timer = self._loop.call_later(WRITE_EVERY, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self._write()
        self._arm()

    def _write(self) -> None:
        path = ctx.options.douane_loop_stats
        if path:
            Path(path).write_text(json.dumps({"max_lag_ms": round(self.max_lag_ms, 2),
                                              "over_10ms": self.over_10ms,
                                              "samples": self.samples,
                                              "stalls": list(self.stalls)}))


class LoopMonitor(LoopProbe):
    def running(self) -> None:
        gc.freeze()
        super().running()
