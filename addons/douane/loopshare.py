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

The thread's CPU clock is a system call (no vDSO), read twice per event before (~8 a request at
concurrency 1): it is read at most once per pass, at its first step, and only when other
callbacks are still to run in that pass (asyncio's ready queue); again only when a later flow
of the pass arrives after BUDGET of wall time (the CPU used is at most the wall time elapsed,
read from the monotonic clock, a vDSO call). What ran between two flows' steps in the pass
(mitmproxy's own work for them) counts too.
"""

from __future__ import annotations

import asyncio
import time

# douane's share of one pass: a few flows' steps; the rest of the burst goes on in later passes
BUDGET = 0.002  # CPU seconds


class LoopShare:
    def __init__(self) -> None:
        # the pass's clocks (wall, CPU: None when not read) at douane's first step in it; None: no
        # step ran in it yet
        self._start: tuple[float, float | None] | None = None

    async def enter(self) -> None:
        """Waits for a pass with share left; then the flow's steps run."""
        while True:
            if self._start is None:
                loop = asyncio.get_running_loop()
                # asyncio's queue of ready callbacks empty: nothing else runs in this pass (what
                # is queued from now on runs in the next), so no other flow's steps can follow
                # these in it and its CPU clock is not read (a loop without that queue: read)
                alone = not getattr(loop, "_ready", True)
                self._start = (time.perf_counter(), None if alone else time.thread_time())
                # runs early in the next pass, before the steps that wait in this one
                loop.call_soon(self._next_pass)
                return
            # the CPU used is at most the wall time elapsed (the bound itself when not read)
            wall, cpu = self._start
            if time.perf_counter() - wall < BUDGET or \
                    cpu is not None and time.thread_time() - cpu < BUDGET:
                return
            await asyncio.sleep(0)

    def _next_pass(self) -> None:
        self._start = None
