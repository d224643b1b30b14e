"""Many flows' steps that become ready in one pass of the event loop take turns (LoopShare)."""

from __future__ import annotations

import asyncio
import random
import time

import pytest
from mitmproxy.test import tflow

from douane import loopshare
from douane.loopshare import BUDGET, LoopShare
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
    # 1 ms of CPU each, a 2 ms share per pass: 2 flows per pass (the one that used it up ran)
    assert max(passes.per_pass) <= 2, passes.per_pass
    assert sum(1 for n in passes.per_pass if n) >= 8


def test_without_a_share_the_burst_runs_in_one_pass(monkeypatch):
    """The control: what the share prevents."""
    monkeypatch.setattr(loopshare, "BUDGET", float("inf"))
    passes = Passes()
    burst(Checkpoint((), Order(request=(step_of(passes),))), passes)
    assert max(passes.per_pass) == 32


def test_steps_that_wait_use_no_share():
    """An analysis or an approval awaited is no work on the loop: 32 such flows all start their
    steps in the first pass."""
    passes = Passes()

    async def request(flow) -> None:
        passes.done.append(flow.metadata["n"])
        await asyncio.sleep(0.002)
        busy(0.001)  # after the wait: in a later pass, not counted against the first one

    burst(Checkpoint((), Order(request=(request,))), passes)
    assert max(passes.per_pass) == 32, passes.per_pass  # all in one pass


def test_a_flow_alone_never_waits():
    async def scenario() -> None:
        share = LoopShare()
        for _ in range(3):
            entering = share.enter()
            with pytest.raises(StopIteration):
                entering.send(None)  # done without yielding to the loop
            busy(0.003)  # uses this pass's share up
            await asyncio.sleep(0)  # the next pass has a share of its own

    asyncio.run(scenario())


def test_the_cpu_clock_is_read_only_where_other_flows_may_share_the_pass(monkeypatch):
    """The thread's CPU clock is a system call: a flow alone in its pass (nothing else ready to
    run in it) does not read it; in a pass several flows reach, the first reads it once and
    later ones within BUDGET of wall time (which bounds the CPU used) do not."""
    reads = []
    clock = time.thread_time
    monkeypatch.setattr(loopshare.time, "thread_time", lambda: reads.append(1) or clock())
    # wall time within BUDGET for the whole pass, however long a loaded host holds the process
    wall = iter(n * BUDGET / 100 for n in range(10_000))
    monkeypatch.setattr(loopshare.time, "perf_counter", lambda: next(wall))

    async def scenario() -> None:
        share = LoopShare()
        for _ in range(3):  # three passes, a flow alone in each
            await share.enter()
            await asyncio.sleep(0)
        assert not reads
        await asyncio.gather(*(share.enter() for _ in range(4)))  # four flows in one pass
        assert len(reads) == 1

    asyncio.run(scenario())


def test_a_loaded_machine_reads_the_cpu_clock_only_when_its_bound_runs_out(monkeypatch):
    """Where wall time runs far ahead of the loop's CPU time (other processes take the cores), a
    reading bounds the next ones (the CPU used is at most what it read plus the wall time since):
    16 flows in one pass, 0.5 ms of wall time between them and almost no CPU, read the clock
    once per BUDGET of wall time, not once per flow, and all run in that pass."""
    reads = []
    clock = time.thread_time
    monkeypatch.setattr(loopshare.time, "thread_time", lambda: reads.append(1) or clock())
    wall = iter(n * 0.0005 for n in range(10_000))
    monkeypatch.setattr(loopshare.time, "perf_counter", lambda: next(wall))
    admitted = []

    async def flow(n: int) -> None:
        await share.enter()
        admitted.append(n)

    async def scenario() -> None:
        await asyncio.gather(*(flow(n) for n in range(16)))

    share = LoopShare()
    asyncio.run(scenario())
    assert admitted == list(range(16))
    # 16 flows over ~8 ms of wall time: the first reading, then one per ~2 ms
    assert 2 <= len(reads) <= 6, len(reads)


def test_stream_ends_after_their_wait_take_turns():
    """A masked stream's end: the layer pauses on `douane_stream_wait` and does the end's work
    as the hook returns. 32 ends in one pass take turns after their wait (none of them waits for
    an analysis here), so their work is spread over passes like other steps'."""
    passes = Passes()
    checkpoint = Checkpoint((), Order(douane_stream_wait=(lambda flow: None,)))
    flows = [tflow.tflow() for _ in range(32)]

    async def end(n: int, flow) -> None:
        await checkpoint.douane_stream_wait(flow)
        busy(0.001)  # the end's work in the stream's layer, as the hook returns
        passes.done.append(n)

    async def scenario() -> None:
        passes.start()
        await asyncio.gather(*(end(n, flow) for n, flow in enumerate(flows)))

    asyncio.run(scenario())
    assert passes.done == list(range(32))
    assert max(passes.per_pass) <= 3, passes.per_pass


class CountingLoop(asyncio.SelectorEventLoop):
    """Counts the callbacks scheduled on it: a task's every wake-up is one."""

    def __init__(self) -> None:
        super().__init__()
        self.callbacks = 0

    def call_soon(self, *args, **kwargs):
        self.callbacks += 1
        return super().call_soon(*args, **kwargs)


def test_a_waiting_flow_is_woken_about_once_not_on_every_pass():
    """32 flows in one pass, 2 run per pass: the 30 that wait used to be woken on every pass
    until their turn (~N^2/4: ~240 wake-ups); parked in a queue, each is called about once."""
    passes = Passes()
    checkpoint = Checkpoint((), Order(request=(step_of(passes),)))
    flows = [tflow.tflow() for _ in range(32)]
    for i, flow in enumerate(flows):
        flow.metadata["n"] = i
    counted = {}

    async def scenario() -> None:
        passes.start()
        loop = asyncio.get_running_loop()
        before = loop.callbacks
        await asyncio.gather(*(checkpoint.request(flow) for flow in flows))
        counted["callbacks"] = loop.callbacks - before

    with asyncio.Runner(loop_factory=CountingLoop) as runner:
        runner.run(scenario())
    assert passes.done == list(range(32))
    # per flow: its task's start, the gather's callback, one call; per pass: the share's reset,
    # the caller and the test's tick; a few calls again for a pass whose share ran out early
    assert counted["callbacks"] <= 32 * 3 + 3 * len(passes.per_pass) + 8, counted


def run_waves(costs: list[list[float]], cancel: dict[int, set[int]] | None = None):
    """Flows arrive in waves, one wave per pass while earlier ones wait (costs[p]: the CPU each
    flow of pass p's wave uses); `cancel[p]`: the flows whose tasks are cancelled at pass p.
    Returns (arrival order, the order their steps ran, steps per pass, the flows cancelled
    before their steps ran, the flows that waited: their steps ran in a later pass)."""
    arrived: list[int] = []
    done: list[int] = []
    per_pass: list[int] = []
    cancel = cancel or {}
    cost: dict[int, float] = {}
    ticks = [0]  # passes, counted by a callback queued again in each
    arrival: dict[int, int] = {}
    waited: list[int] = []

    def request(flow) -> None:
        n = flow.metadata["n"]
        busy(cost[n])
        done.append(n)
        if ticks[0] != arrival[n]:
            waited.append(n)

    checkpoint = Checkpoint((), Order(request=(request,)))
    total = sum(len(wave) for wave in costs)

    async def flow(n: int) -> None:
        f = tflow.tflow()
        f.metadata["n"] = n
        arrived.append(n)
        arrival[n] = ticks[0]
        await checkpoint.request(f)

    def tick() -> None:
        ticks[0] += 1
        if len(done) + len(gone) < total:
            asyncio.get_running_loop().call_soon(tick)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        loop.call_soon(tick)
        tasks: dict[int, asyncio.Task] = {}
        seen = 0
        p = 0
        while len(done) + sum(t.cancelled() for t in tasks.values()) < total:
            if p < len(costs):
                for c in costs[p]:
                    n = len(tasks)
                    cost[n] = c
                    tasks[n] = loop.create_task(flow(n))
            for n in cancel.get(p, ()):
                tasks[n].cancel()
            await asyncio.sleep(0)  # one pass
            per_pass.append(len(done) - seen)
            seen = len(done)
            p += 1
            assert p < 10_000, "a flow waits forever"
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        gone.update(n for n, task in tasks.items() if task.cancelled())

    gone: set[int] = set()
    asyncio.run(asyncio.wait_for(scenario(), 60))
    return arrived, done, per_pass, gone, waited


def test_the_flows_that_wait_keep_their_order_across_many_passes_as_new_flows_arrive():
    """Waves of new flows arrive while earlier ones wait, their steps of uneven cost (a called
    flow may find the share used up by those before it): the flows that wait run in the order
    they arrived (a new flow runs at once only on share the flows called for its pass left)."""
    rng = random.Random(18)
    for _ in range(5):
        costs = [[rng.choice((0.0001, 0.0004, 0.001, 0.0015)) for _ in range(rng.randrange(9))]
                 for _ in range(12)]
        arrived, done, per_pass, _, waited = run_waves(costs)
        assert arrived == sorted(arrived)
        assert waited == sorted(waited), (costs, per_pass)
        assert len(waited) > len(done) / 2  # the waves' demand is ~4x the share
        assert sorted(done) == arrived


@pytest.mark.parametrize("cancelled", [
    {1: {2}},  # the flow that called itself for the next pass
    {2: {3}},  # the first of the flows the last one called
    {2: {4}},  # the last called: its call goes on to the next
    {1: {10, 11, 12}},  # flows not called yet
    {1: {2}, 2: {5, 6, 7, 8}, 3: {9}},  # called and not, over several passes
    {p: {n} for p, n in enumerate(range(8, 31, 3))},  # one a pass
])
def test_a_cancelled_flow_loses_no_other_flows_call(cancelled):
    """A flow cancelled while it waits, called or not, is taken out of the queue: every other
    flow still gets its turn, in order, and the burst takes no more passes than without it."""
    arrived, done, per_pass, gone, _ = run_waves([[0.001] * 32], cancelled)
    assert gone == set().union(*cancelled.values())  # each while it waited
    assert done == [n for n in arrived if n not in gone]
    assert len(per_pass) <= 20, per_pass


def test_a_flow_alone_after_a_burst_never_waits():
    """Once a burst's flows have all had their turns, a flow alone runs at once again."""

    async def flow() -> None:
        await share.enter()
        busy(0.001)

    async def scenario() -> None:
        await asyncio.gather(*(flow() for _ in range(8)))  # 2 a pass: 6 wait
        for _ in range(3):
            busy(0.003)
            await asyncio.sleep(0)
        for _ in range(3):
            entering = share.enter()
            with pytest.raises(StopIteration):
                entering.send(None)
            await asyncio.sleep(0)

    share = LoopShare()
    asyncio.run(scenario())
