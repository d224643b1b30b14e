"""`LoopShare`: douane's hooks take turns on the event loop instead of running back to back.

asyncio runs every callback that is ready in one pass of its loop before it looks at timers and
sockets again. When many flows reach the same step in one pass (32 streams that start together,
or end together: every request read, every answer's end arriving at the same tick), mitmproxy
starts their hooks in that pass, and douane's steps for all of them (~0.3-0.5 ms each: parse,
policy, audit record, recording snapshot) ran back to back: every other flow, and every timer,
waited 10-15 ms of douane's work on top of mitmproxy's own. Each hook first takes its `turn`: the
first hook of a pass opens the pass's share; a hook that finds the share used up (BUDGET of wall
time since it opened) yields to the loop and runs in a later pass, after the I/O and timers that
were waiting, in the order the hooks arrived. A flow alone never waits: its hook opens a share.
"""

from __future__ import annotations

import asyncio
import time

# douane's share of one pass: a few flows' steps; the rest of the burst goes on in later passes
BUDGET = 0.002


class LoopShare:
    def __init__(self) -> None:
        self._opened: float | None = None  # when this pass's share opened (None: not yet)

    async def turn(self) -> None:
        while True:
            now = time.perf_counter()
            if self._opened is None:
                self._opened = now
                # runs early in the next pass (before the hooks that yield in this one): the
                # first of them opens that pass's share
                asyncio.get_running_loop().call_soon(self._close)
                return
            if now - self._opened < BUDGET:
                return
            await asyncio.sleep(0)

    def _close(self) -> None:
        self._opened = None
