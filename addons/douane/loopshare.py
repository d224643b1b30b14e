"""`LoopShare`: douane's steps for many flows take turns on the event loop.

asyncio runs every callback that is ready in one pass of its loop before it looks at timers and
sockets again. When many flows reach the same event in one pass (32 streams that start together,
or end together: every request read, every answer's end arriving at the same tick), mitmproxy
starts their hooks in that pass, and douane's steps for all of them (~0.3-0.5 ms each: parse,
policy, audit record, recording snapshot) ran back to back: every other flow, and every timer,
waited 10-15 ms of douane's work on top of mitmproxy's own.

Each event's steps run between `enter` and `leave`. The CPU time steps use without
leaving the pass is counted against it; once BUDGET is used, a flow's steps wait for a later pass
(after the I/O and timers that were waiting), in the order the flows arrived. CPU time, not wall
time: a machine busy elsewhere does not make douane wait longer. A flow whose steps wait (an
analysis, an approval) is not counted: its CPU time cannot be told from that of what ran
meanwhile (its work before the wait is mostly small). mitmproxy's own work is not douane's share.
A flow alone never waits: the first steps of a pass always run.
"""

from __future__ import annotations

import asyncio
import time

# douane's share of one pass: a few flows' steps; the rest of the burst goes on in later passes
BUDGET = 0.002  # CPU seconds


class LoopShare:
    def __init__(self) -> None:
        self._counting = False  # steps ran in this pass (a reset is scheduled for the next one)
        self._spent = 0.0  # their CPU time
        self._pass = 0

    async def enter(self) -> tuple[int, float]:
        """Waits for a pass with share left; then the flow's steps run (`leave` after them)."""
        while self._counting and self._spent >= BUDGET:
            await asyncio.sleep(0)
        if not self._counting:
            self._counting = True
            # runs early in the next pass, before the steps that wait in this one
            asyncio.get_running_loop().call_soon(self._next_pass)
        return self._pass, time.thread_time()

    def leave(self, entered: tuple[int, float]) -> None:
        pass_, cpu = entered
        if pass_ == self._pass:  # the steps did not wait: all of their time was this pass's
            self._spent += time.thread_time() - cpu

    def _next_pass(self) -> None:
        self._counting, self._spent = False, 0.0
        self._pass += 1
