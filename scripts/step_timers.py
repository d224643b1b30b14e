"""What each of douane's steps costs the main thread: a diagnostic mitmproxy script (not for
production), loaded after the gateway.

    mitmdump ... -s addons/gateway.py -s scripts/step_timers.py --set douane_step_timers=FILE

At `running` it wraps each step of the `Checkpoint` (`pipeline.Order`) and each whole event of it
(the dispatcher, LoopShare and the steps) with the thread's CPU clock; FILE gets, at shutdown, one
JSON object: {"event step": [calls, total CPU µs, median CPU µs]}; "event *" is the whole event,
so the dispatcher's own cost is "*" less the sum of its steps. `douane_step_timers_also` names
functions to time as well, to split a step (`douane.policy.engine:risk,douane.secrets:find`, a
method as `module:Class.name`): each call counted, as it is looked up at call time. The clock is read twice per step
(~1 µs each, a system call): compare runs with it, not against runs without it. An async step that
awaits counts what ran meanwhile: the figures are for requests whose steps do not wait.
"""

from __future__ import annotations

import importlib
import inspect
import json
import statistics
import time
from collections import deque
from pathlib import Path

from mitmproxy import ctx
from mitmproxy.addonmanager import traverse

SAMPLES = 20_000  # per step: the median of the last ones
_times: dict[str, tuple[list[float], deque[float]]] = {}  # name -> ([calls, total], samples)


def _record(name: str, seconds: float) -> None:
    entry = _times.get(name)
    if entry is None:
        entry = _times[name] = ([0, 0.0], deque(maxlen=SAMPLES))
    entry[0][0] += 1
    entry[0][1] += seconds
    entry[1].append(seconds)


def _timed(name: str, step):
    if inspect.iscoroutinefunction(step):
        async def timed_async(*args, **kwargs):
            cpu = time.thread_time()
            try:
                return await step(*args, **kwargs)
            finally:
                _record(name, time.thread_time() - cpu)
        timed_async.__qualname__ = step.__qualname__
        return timed_async

    def timed(*args, **kwargs):
        cpu = time.thread_time()
        try:
            return step(*args, **kwargs)
        finally:
            _record(name, time.thread_time() - cpu)
    timed.__qualname__ = getattr(step, "__qualname__", name)
    return timed


class StepTimers:
    def load(self, loader) -> None:
        loader.add_option("douane_step_timers", str, "",
                          "Write each douane step's CPU time per call (JSON) here at shutdown.")

        loader.add_option("douane_step_timers_also", str, "",
                          "Functions to time too: module:name or module:Class.name, by commas.")

    def running(self) -> None:
        for spec in filter(None, ctx.options.douane_step_timers_also.split(",")):
            module, _, name = spec.partition(":")
            owner = importlib.import_module(module)
            *path, attr = name.split(".")
            for part in path:
                owner = getattr(owner, part)
            timed = _timed(spec, getattr(owner, attr))
            static = isinstance(inspect.getattr_static(owner, attr), staticmethod)
            setattr(owner, attr, staticmethod(timed) if static else timed)
        from douane.pipeline import Checkpoint
        checkpoint = next((a for a in traverse(ctx.master.addons.chain)
                           if isinstance(a, Checkpoint)), None)
        if checkpoint is None:
            return
        for event, steps in checkpoint._steps.items():
            checkpoint._steps[event] = tuple(
                (_timed(f"{event} {getattr(s, '__qualname__', s)}", s), is_async)
                for s, is_async in steps)
        for event in ("requestheaders", "request", "responseheaders", "response"):
            setattr(checkpoint, event, _timed(f"{event} *", getattr(checkpoint, event)))

    def done(self) -> None:
        if ctx.options.douane_step_timers:
            Path(ctx.options.douane_step_timers).write_text(json.dumps({
                name: [calls, round(total * 1e6, 1),
                       round(statistics.median(samples) * 1e6, 2)]
                for name, ([calls, total], samples) in _times.items()}))


addons = [StepTimers()]
