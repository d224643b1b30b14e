"""Where an event-loop stall comes from: a diagnostic mitmproxy script (not for production).

    mitmdump ... -s addons/gateway.py -s scripts/loop_timeline.py --set douane_loop_timeline=FILE

Times every callback of every pass of the loop (wall and the main thread's CPU). A pass whose
callbacks took over `SLOW_MS` is kept (the last 10,000) with its callbacks' share grouped by
what they are (a hook's task, a connection's reader, a timer), and the garbage collector's
passes in them ("gc N": generation N, inside the callback that allocated); FILE gets them as JSON lines at
shutdown: {"at": unix time the pass started, "ms": wall, "cpu_ms": CPU, "callbacks": {name: [n,
ms, cpu_ms]}}. Loads into a bare mitmdump too. It adds ~2 µs per callback: compare runs with it,
not against runs without it.
"""

from __future__ import annotations

import gc
import json
import re
import time
from asyncio import base_events, events
from collections import deque
from pathlib import Path

from mitmproxy import ctx

SLOW_MS = 5.0
_pass: dict[str, list[float]] = {}  # this pass's callbacks: name -> [n, wall s, CPU s]
_kept: deque[dict] = deque(maxlen=10_000)
_ADDRESS = re.compile(r"\('[^']*', \d+\)|0x[0-9a-f]+|fd=\d+|(?<=Task-)\d+")
# mitmproxy's own, also when this script is loaded again (a reload)
_ORIGINAL_RUN = getattr(events.Handle._run, "__wrapped__", events.Handle._run)
_ORIGINAL_RUN_ONCE = getattr(base_events.BaseEventLoop._run_once, "__wrapped__",
                             base_events.BaseEventLoop._run_once)


def _name(handle: events.Handle) -> str:
    """What a callback is, without what differs per flow (addresses, ports, ids)."""
    callback = getattr(handle, "_callback", None)
    owner = getattr(callback, "__self__", callback)
    name = getattr(owner, "get_name", None)  # a task: its name ("handle_hook(response)", ...)
    return _ADDRESS.sub("…", name() if name else getattr(callback, "__qualname__", repr(owner)))


def _run(self: events.Handle) -> None:
    wall, cpu = time.perf_counter(), time.thread_time()
    try:
        _ORIGINAL_RUN(self)
    finally:
        entry = _pass.setdefault(_name(self), [0, 0.0, 0.0])
        entry[0] += 1
        entry[1] += time.perf_counter() - wall
        entry[2] += time.thread_time() - cpu


def _run_once(self: base_events.BaseEventLoop) -> None:
    _pass.clear()
    started = time.time()
    _ORIGINAL_RUN_ONCE(self)
    wall = sum(e[1] for k, e in _pass.items() if not k.startswith("gc ")) * 1000
    if wall > SLOW_MS:
        _kept.append({"at": round(started, 4), "ms": round(wall, 2),
                      "cpu_ms": round(sum(e[2] for k, e in _pass.items()
                                          if not k.startswith("gc ")) * 1000, 2),
                      "callbacks": {k: [n, round(w * 1000, 2), round(c * 1000, 2)]
                                    for k, (n, w, c) in _pass.items()}})


_gc_started: list[tuple[float, float]] = []


def _gc(phase: str, info: dict) -> None:
    if phase == "start":
        _gc_started.append((time.perf_counter(), time.thread_time()))
    elif _gc_started:
        wall, cpu = _gc_started.pop()
        entry = _pass.setdefault(f"gc {info['generation']}", [0, 0.0, 0.0])
        entry[0] += 1
        entry[1] += time.perf_counter() - wall
        entry[2] += time.thread_time() - cpu


_run.__wrapped__ = _ORIGINAL_RUN  # type: ignore[attr-defined]
_run_once.__wrapped__ = _ORIGINAL_RUN_ONCE  # type: ignore[attr-defined]


class LoopTimeline:
    def load(self, loader) -> None:
        loader.add_option("douane_loop_timeline", str, "",
                          "Write the slow passes of the event loop (JSON lines) here at shutdown.")
        events.Handle._run = _run  # type: ignore[method-assign]
        if _gc not in gc.callbacks:
            gc.callbacks.append(_gc)
        base_events.BaseEventLoop._run_once = _run_once  # type: ignore[method-assign]

    def done(self) -> None:
        if ctx.options.douane_loop_timeline:
            Path(ctx.options.douane_loop_timeline).write_text(
                "".join(json.dumps(p) + "\n" for p in _kept))


addons = [LoopTimeline()]
