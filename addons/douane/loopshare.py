"""`LoopShare`: douane's steps for many flows take turns on the event loop.

asyncio runs every callback that is ready in one pass of its loop before it looks at timers and
sockets again. When many flows reach the same event in one pass (32 streams that start together,
or end together: every request read, every answer's end arriving at the same tick), mitmproxy
starts their hooks in that pass, and douane's steps for all of them (~0.3-0.5 ms each: parse,
policy, audit record, recording snapshot) ran back to back: every other flow, and every timer,
waited 10-15 ms of douane's work on top of mitmproxy's own.

Each event's steps run after `enter`. The CPU time the loop's thread has used since douane's first
step of the pass is counted against it; once BUDGET is used, a flow's steps wait for a later pass
(after the I/O and timers that were waiting), in the order the flows arrived. CPU time, not wall
time: a machine busy elsewhere does not make douane wait longer. A flow alone never waits: the
first steps of a pass always run.

The thread's CPU clock is a system call (no vDSO), ~1 µs idle and 15-30 µs of CPU on a loaded
2-core VM, where reading it twice per event cost ~170 µs per request: it is read once per pass,
at its first step, and again only when a later flow of the pass arrives after BUDGET of wall
time (the CPU used is at most the wall time elapsed, read from the cheap monotonic clock).
What ran between two flows' steps in the pass (mitmproxy's own work for them) counts too.
"""

from __future__ import annotations

import asyncio
import time

# douane's share of one pass: a few flows' steps; the rest of the burst goes on in later passes
BUDGET = 0.002  # CPU seconds


class LoopShare:
    def __init__(self) -> None:
        # the pass's clocks (wall, CPU) at douane's first step in it; None: no step ran in it yet
        self._start: tuple[float, float] | None = None

    async def enter(self) -> None:
        """Waits for a pass with share left; then the flow's steps run."""
        while True:
            if self._start is None:
                self._start = (time.perf_counter(), time.thread_time())
                # runs early in the next pass, before the steps that wait in this one
                asyncio.get_running_loop().call_soon(self._next_pass)
                return
            wall, cpu = self._start
            if time.perf_counter() - wall < BUDGET or time.thread_time() - cpu < BUDGET:
                return
            await asyncio.sleep(0)

    def _next_pass(self) -> None:
        self._start = None
