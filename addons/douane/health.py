"""The event loop's lag probe (`LoopProbe`), and douane's `LoopMonitor` built on it.

A timer callback fires every 5 ms and measures how late it runs (a plain callback: a task
sleeping in a loop cost half as much again, ~20 ms of CPU a second in an idle gateway). The largest stall is
logged at shutdown, a stall over 100 ms is logged when it happens, and with
`--set douane_loop_stats=FILE` the figures are written to FILE every second (for benchmarks), with
each of the last 1,000 stalls over 10 ms as `[unix time of the wake-up, ms late, CPU ms]` so a
benchmark can tell which of its phases (start-up, warm-up, a load's start, middle or end) a stall
belongs to. The CPU ms is the main thread's own CPU time during that stall: on a loaded machine a
stall is also time the process waited for a core, which its own work does not explain.

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
INTERVAL = 0.005
WARN_MS = 100.0


class LoopProbe:
    def __init__(self) -> None:
        self.lag_ms = 0.0  # the last sample
        self.max_lag_ms = 0.0
        self.over_10ms = 0
        self.samples = 0
        # (unix time, ms late, CPU ms of the main thread meanwhile) of stalls over 10 ms
        self.stalls: deque[tuple[float, float, float]] = deque(maxlen=1000)
        self._timer: asyncio.TimerHandle | None = None

    def load(self, loader) -> None:
        loader.add_option("douane_loop_stats", str, "",
                          "Write event-loop lag figures (JSON) to this file every second.")

    def running(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._last_write = time.monotonic()
        self._arm()

    def done(self) -> None:
        if self._timer:
            self._timer.cancel()
            self._timer = None
        self._write()
        logger.info("douane: largest event-loop stall %.1f ms (%d over 10 ms in %d samples)",
                    self.max_lag_ms, self.over_10ms, self.samples)

    def _arm(self) -> None:
        self._due, self._cpu = time.monotonic() + INTERVAL, time.thread_time()
        self._timer = self._loop.call_later(INTERVAL, self._tick)

    def _tick(self) -> None:
        now = time.monotonic()
        lag = (now - self._due) * 1000
        self.samples += 1
        self.lag_ms = lag
        if lag > self.max_lag_ms:
            self.max_lag_ms = lag
        if lag > 10:
            self.over_10ms += 1
            self.stalls.append((round(time.time(), 3), round(lag, 1),
                                round((time.thread_time() - self._cpu) * 1000, 1)))
        if lag > WARN_MS:
            logger.warning("douane: the event loop stalled for %.0f ms", lag)
        if now - self._last_write >= 1:
            self._write()
            self._last_write = now
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
