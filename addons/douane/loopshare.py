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

A flow that waits parks in a queue of the flows that wait, oldest first. Only the oldest are
called (their futures resolved) to run in the next pass: one more than the last pass that used
its share up admitted (twice as many once all those called ran and share was left). Each used to
poll instead, every waiting flow woken on every pass: a burst of N flows, k a pass, cost
~N^2/2k wake-ups (10.3 a request at 32 connections). asyncio runs a pass's callbacks in the
order they were queued: the caller (`_call`) is queued after the flows it calls, so it runs once
they have had their turn in the next pass, and those refused there (the share used up) have
queued their wake-up again (called again, in their place): it calls the next ones behind them,
and so the flows that wait run in the order they arrived. A flow that arrives while others wait
parks behind them, unless the caller has run in this pass and share is left: the flows called
for this pass have had their turn and the others cannot run in it, so it takes share no waiting
flow could use (parking it too left passes half used: ~1.5x the passes at 32 connections).
While any flow waits a caller is queued: none is left parked; a cancelled one is taken out of
the queue.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

# douane's share of one pass: a few flows' steps; the rest of the burst goes on in later passes
BUDGET = 0.002  # CPU seconds


class _Turn:
    """A waiting flow's place in the queue."""

    __slots__ = ("called", "future", "gone")

    def __init__(self, future: asyncio.Future) -> None:
        self.future = future  # resolved when it is called
        self.called = False  # it runs in the next pass (or runs in this one, before `_call`)
        self.gone = False  # cancelled before its call, and taken out of the queue


class LoopShare:
    def __init__(self) -> None:
        self._started = False  # a step ran in this pass
        self._cpu: float | None = None  # the CPU clock at the pass's first step (None: not read)
        # (wall clock, CPU used by then): the CPU used in the pass is at most that plus the wall
        # time since
        self._bound = (0.0, 0.0)
        self._full = False  # the pass's share is used up
        self._resetting = False  # `_next_pass` is queued
        self._admitted = 0  # flows whose steps ran in this pass
        # the flows that wait, oldest first; the first `_called` of them run in the next pass
        self._waiting: deque[_Turn] = deque()
        self._called = 0
        self._per_pass = 1  # how many to call: as many as a pass takes
        self._calling = False  # `_call` is to run
        self._front = False  # `_call` has run in this pass: the called flows have had their turn

    async def enter(self) -> None:
        """Waits for a pass with share left, after the flows that wait already (or after those
        called for this pass); then the flow's steps run."""
        if (not self._waiting or self._front) and self._admit():
            return
        await self._wait()

    def _admit(self) -> bool:
        if not self._started:
            loop = asyncio.get_running_loop()
            # asyncio's queue of ready callbacks empty: nothing else runs in this pass (what is
            # queued from now on runs in the next), so no other flow's steps can follow these in
            # it and its CPU clock is not read (a loop without that queue: read)
            alone = not getattr(loop, "_ready", True)
            self._started = True
            self._admitted = 1
            self._bound = (time.perf_counter(), 0.0)  # (before the CPU clock: a bound)
            self._cpu = None if alone else time.thread_time()
            self._reset(loop)
            return True
        if not self._full and self._has_share():
            self._admitted += 1
            return True
        self._full = True
        return False

    async def _wait(self) -> None:
        loop = asyncio.get_running_loop()
        turn = _Turn(loop.create_future())
        self._waiting.append(turn)
        if not self._calling:
            self._calling = True
            loop.call_soon(self._call)
        try:
            await turn.future
            while not self._admit():  # the flows called before it used the share up
                await asyncio.sleep(0)  # called again for the next pass, in its place
        finally:  # admitted, or cancelled
            if turn.called:
                self._waiting.remove(turn)
                self._called -= 1
            elif not turn.gone:  # cancelled before its call
                self._waiting.remove(turn)

    def _call(self) -> None:
        """Runs after the flows called for this pass (their wake-ups were queued before it):
        calls the next ones for the next pass, after those called again."""
        self._calling = False
        loop = asyncio.get_running_loop()
        self._reset(loop)  # (this pass's share and `_front` are not the next one's)
        if self._full:  # the share was used up: a pass takes as many as it admitted, and one
            self._per_pass = self._admitted + 1  # more: refused, it waits at the front
        waiting = self._waiting
        if (not self._full and self._called == 0 and self._per_pass < len(waiting)
                and self._started and self._has_share()):
            self._per_pass *= 2  # every flow called was admitted, and share is left
        while self._called < self._per_pass and self._called < len(waiting):
            turn = waiting[self._called]
            if turn.future.cancelled():  # its task leaves the queue when it runs
                del waiting[self._called]
                turn.gone = True
                continue
            turn.future.set_result(None)
            turn.called = True
            self._called += 1
        self._front = True
        if waiting:
            self._calling = True
            loop.call_soon(self._call)

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

    def _reset(self, loop: asyncio.AbstractEventLoop) -> None:
        """Queues `_next_pass` once: it runs early in the next pass, before the flows called for
        it (queued before they are called)."""
        if not self._resetting:
            self._resetting = True
            loop.call_soon(self._next_pass)

    def _next_pass(self) -> None:
        self._started = self._full = self._front = self._resetting = False
