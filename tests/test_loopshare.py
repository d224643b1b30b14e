"""Many flows' steps that become ready in one pass of the event loop take turns (LoopShare)."""

from __future__ import annotations

import asyncio
import time

import pytest
from mitmproxy.test import tflow

from douane.loopshare import LoopShare
from douane.pipeline import Checkpoint, Order


def busy(seconds: float) -> None:
    """A step's own work: this thread's CPU time, whatever else the machine runs."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


class Passes:
    """Counts the steps done in each pass of the loop (a callback that runs once per pass)."""

    def __init__(self) -> None:
        self.done: list[int] = []  # flow numbers, in the order their steps ran
        self.per_pass: list[int] = []
        self._seen = 0

    def start(self) -> None:
        asyncio.get_running_loop().call_soon(self._tick)

    def _tick(self) -> None:
        self.per_pass.append(len(self.done) - self._seen)
        self._seen = len(self.done)
        if len(self.done) < 32:
            asyncio.get_running_loop().call_soon(self._tick)


def burst(checkpoint: Checkpoint, passes: Passes) -> None:
    """32 flows reach the `request` event in the same pass, as 32 streams started together."""
    flows = [tflow.tflow() for _ in range(32)]
    for i, flow in enumerate(flows):
        flow.metadata["n"] = i

    async def scenario() -> None:
        passes.start()
        await asyncio.gather(*(checkpoint.request(flow) for flow in flows))

    asyncio.run(scenario())


def step_of(passes: Passes):
    def request(flow) -> None:
        busy(0.001)
        passes.done.append(flow.metadata["n"])
    return request


def test_a_burst_of_flows_is_spread_over_passes_in_arrival_order():
    passes = Passes()
    burst(Checkpoint((), Order(request=(step_of(passes),))), passes)
    assert passes.done == list(range(32))  # each in its turn, none starved or overtaken
    # 1 ms of work each, a 2 ms share per pass: a few flows per pass, the rest later
    assert max(passes.per_pass) <= 4, passes.per_pass
    assert sum(1 for n in passes.per_pass if n) >= 8


def test_without_turns_the_burst_runs_in_one_pass(monkeypatch):
    """The control: what the share prevents."""
    async def no_turn(self) -> None:
        pass

    monkeypatch.setattr(LoopShare, "turn", no_turn)
    passes = Passes()
    burst(Checkpoint((), Order(request=(step_of(passes),))), passes)
    assert max(passes.per_pass) == 32


def test_a_flow_alone_never_waits():
    async def scenario() -> None:
        share = LoopShare()
        for _ in range(3):  # each in a pass of its own: each opens that pass's share
            turn = share.turn()
            with pytest.raises(StopIteration):
                turn.send(None)  # done without yielding to the loop
            await asyncio.sleep(0.003)

    asyncio.run(scenario())
