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
(mitmproxy's own work for them) counts too. Each reading bounds the next ones: the CPU used is at
most what it read plus the wall time since, so a later flow reads the clock again only once that
bound reaches BUDGET (on a loaded machine, where wall time runs far ahead of the loop's CPU time,
every flow of a busy pass read it: the read was a tenth of the loop's samples at 32 masked
connections), and once the share is used up the flows that come later in the pass read none.
"""

from __future__ import annotations

import asyncio
import time

# douane's share of one pass: a few flows' steps; the rest of the burst goes on in later passes
BUDGET = 0.002  # CPU seconds


class LoopShare:
    def __init__(self) -> None:
        self._started = False  # a step ran in this pass
        self._cpu: float | None = None  # the CPU clock at the pass's first step (None: not read)
        # (wall clock, CPU used by then): the CPU used in the pass is at most that plus the wall
        # time since
        self._bound = (0.0, 0.0)
        self._full = False  # the pass's share is used up

    async def enter(self) -> None:
        """Waits for a pass with share left; then the flow's steps run."""
        while True:
            if not self._started:
                loop = asyncio.get_running_loop()
                # asyncio's queue of ready callbacks empty: nothing else runs in this pass (what
                # is queued from now on runs in the next), so no other flow's steps can follow
                # these in it and its CPU clock is not read (a loop without that queue: read)
                alone = not getattr(loop, "_ready", True)
                self._started = True
                self._bound = (time.perf_counter(), 0.0)  # (before the CPU clock: a bound)
                self._cpu = None if alone else time.thread_time()
                # runs early in the next pass, before the steps that wait in this one
                loop.call_soon(self._next_pass)
                return
            if not self._full and self._has_share():
                return
            self._full = True
            await asyncio.sleep(0)

    def _has_share(self) -> bool:
        at, used = self._bound
        now = time.perf_counter()
        if used + now - at < BUDGET:
            return True
        if self._cpu is None:  # not read: the wall time is the bound
            return False
        used = time.thread_time() - self._cpu
        self._bound = (now, used)
        return used < BUDGET

    def _next_pass(self) -> None:
        self._started = self._full = False
