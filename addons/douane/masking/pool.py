"""Analysis off the event loop: pools of worker processes.

The event loop only awaits (`analyze`); streams use `submit`/`result` (the stream callable cannot
await). Two executors: the main one (`workers` processes) takes every analysis that is awaited or
collected later; the urgent one (one more process) takes only analyses the event loop blocks on (a
stream channel's end, `StreamMasker.finish`), so that wait is its own analysis, never the queue of
every other stream's. A crashed worker breaks its executor: the analyses in flight on it fail (and
are refused by the caller), and it is rebuilt at the next submit. A hung worker (an analysis
past the timeout, `MaskingPool.overran`) is killed and replaced alone: only the analyses in
flight on it fail.

An executor (`Workers`) talks to each process over its own pipe: the caller's thread writes the
job; the event loop reads the answers (`loop.add_reader`) and resolves their futures in its own
pass, or, where no loop reads, whoever waits for an answer. concurrent.futures' process pool
routes every job through a manager thread and a queue feeder thread as well, two more thread
hand-offs per analysis: 0.23 ms at p50 and 3.3 ms at p90 for an echo on the loaded 2-core
machine, against 0.08 and 0.15 ms over a pipe; a reader thread per pipe cost a hand-off still.

Analyses are batched by load, on each executor: while a worker is free, an analysis goes at
once; while every one is busy, analyses gather and leave together when one frees up. spaCy runs
once over a batch, so its cost per text falls as the load rises (`scripts/bench-masking`: 1.5x
the chars/s in batches of 16), and 32 streams' proposals cost a few batches instead of 32
separate analyses. The urgent worker too: 32 stream ends arriving together were 32 analyses one
after the other, each paying spaCy's fixed cost per call, the last end waiting for all of them.
Processes, not threads: spaCy's NER holds the GIL (2 threads ran it at 0.9-1.2x one thread's
speed).

Workers are forked from a zygote: one spawned process that builds the analyser once (spaCy, the
recognisers: ~2.1 s of CPU) and forks each worker from it, its analyser ready; the workers share
its pages copy-on-write. The zygote analyses only its fixed warm-up text, never a user's: a worker
starts with nothing anyone sent (what it learns from the texts it reads stays in its own pages).
Workers run niced (`WORKER_NICENESS`): the event loop, which serves every flow, gets a core first.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import functools
import gc
import io
import itertools
import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.reduction
import os
import pickle
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures.process import BrokenProcessPool

from douane.masking import engine, split
from douane.masking.config import MaskingSettings
from douane.masking.engine import Span

logger = logging.getLogger(__name__)

Analysis = concurrent.futures.Future[list[list[Span]]]
Wait = Callable[[concurrent.futures.Future, float | None], None]
# Behind the event loop for the CPU, as the recording writer: on 2 cores two busy workers took
# the core the loop needed (32 masked streams: stalls of 130 ms with 32 ms of the loop's own CPU)
WORKER_NICENESS = 10


class Workers:
    """`size` analysis processes, each behind its own pipe; a job goes to the one with the
    fewest in flight. A process that dies breaks the whole set, as a process pool would: its
    jobs and every later submit fail with BrokenProcessPool (the pool then builds a new set).

    No thread of its own reads the pipes: the pool's event loop does (`attach`), the answer read
    in the loop's own pass, or whoever waits for an answer where no loop reads (`read_ready`,
    under the pool's `reading` lock). A reader thread per pipe cost each answer a wake-up of the
    thread and another of the loop (a write to its self-pipe), and took the GIL from the loop."""

    def __init__(self, size: int, zygote: Zygote, reading: threading.RLock, wait: Wait):
        self._lock = threading.Lock()
        self._reading, self._wait = reading, wait
        self._ids = itertools.count()
        self._pending: list[dict[int, concurrent.futures.Future]] = []
        self._pipes: list[_Reader] = []
        self._sending: list[threading.Lock] = []  # one writer at a time on each pipe
        # by pipe: since when its worker has had a job and answered nothing (`hung`)
        self._busy_since: list[float] = []
        self._broken: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop that reads the pipes
        self._closed = False
        self._zygote = zygote  # (a killed worker's replacement, `kill`)
        for _ in range(size):
            self._pipes.append(_Reader(zygote.fork()))
            self._sending.append(threading.Lock())
            self._pending.append({})
            self._busy_since.append(0.0)

    def submit(self, fn, *args) -> concurrent.futures.Future:
        future: concurrent.futures.Future = _Answer(self._wait)
        future.set_running_or_notify_cancel()
        with self._lock:
            if self._broken is not None:
                raise BrokenProcessPool(str(self._broken))
            i = min(range(len(self._pipes)), key=lambda k: len(self._pending[k]))
            job = next(self._ids)
            if not self._pending[i]:
                self._busy_since[i] = time.monotonic()
            self._pending[i][job] = future
        try:
            # not under the set's lock: a large job waits for a busy worker to read it
            # (the pool sends only to a worker with no job: it reads the job as it comes, and is
            # writing no answer that its sender, here the loop, would have to read first)
            with self._sending[i]:
                self._pipes[i].send(pickle.dumps((job, fn, args), pickle.HIGHEST_PROTOCOL))
        except OSError as e:  # the process is gone (reading its pipe says so too)
            with self._lock:
                self._pending[i].pop(job, None)
            raise BrokenProcessPool(f"a masking worker is gone: {e}") from e
        return future

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """On `loop`'s thread: the loop reads the pipes from now on (and no longer an earlier
        loop, stopped: one loop at a time)."""
        with self._reading:
            if self._closed or loop is self._loop:
                return
            self._detach()
            self._loop = loop
            for i, pipe in enumerate(self._pipes):
                loop.add_reader(pipe.fileno(), self._readable, i)

    def _detach(self) -> None:
        if self._loop is not None:
            for pipe in self._pipes:
                self._loop.remove_reader(pipe.fileno())  # (a closed loop has none left)
            self._loop = None

    def fileno_of(self) -> dict[int, int]:
        """The pipes' descriptors, by pipe (none once the set is closed)."""
        return {} if self._closed else {pipe.fileno(): i for i, pipe in enumerate(self._pipes)}

    def _readable(self, i: int) -> None:
        """The loop's callback. A thread reading the pipes meanwhile (`MaskingPool.wait`, while
        the loop was not running) reads this answer too."""
        if self._reading.acquire(blocking=False):
            try:
                self.read(i)
            finally:
                self._reading.release()

    def read(self, i: int) -> None:
        """Under the `reading` lock: the answers that came in on pipe `i`, to their futures."""
        if self._closed:
            return
        try:
            answers = self._pipes[i].read()
        except Exception as e:  # an answer that cannot be read back (unpickling raised):
            # whose job it was is unknown, so the set breaks
            self._break(BrokenProcessPool(f"a masking worker's answer could not be read "
                                          f"({type(e).__name__})"))
            return
        if answers is None:
            self._break(BrokenProcessPool("a masking worker process terminated abruptly"))
            return
        self._busy_since[i] = time.monotonic()
        for job, ok, value in answers:
            with self._lock:
                future = self._pending[i].pop(job, None)
            if future is not None:
                (future.set_result if ok else future.set_exception)(value)

    def hung(self, limit: float) -> list[int]:
        """The pipes whose worker, started (its pid known), has had a job and answered nothing
        for over `limit` seconds."""
        now = time.monotonic()
        with self._lock:
            if self._broken is not None:
                return []
            return [i for i, pending in enumerate(self._pending)
                    if pending and self._pipes[i].pid is not None
                    and now - self._busy_since[i] > limit]

    def kill(self, i: int, error: BaseException) -> int | None:
        """SIGKILL to pipe `i`'s worker (a hung one reads no pipe's end): the analyses in flight
        on it fail with `error`, and a worker forked anew from the zygote takes its pipe; the
        other workers' analyses go on, their answers still arrive. Where its pipe cannot be
        swapped here (the zygote is gone; a loop running in another thread reads the pipes), the
        set breaks as for a worker that died: every analysis in flight on it fails. Its pid."""
        pid = self._pipes[i].pid
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):  # (it died meanwhile)
                os.kill(pid, signal.SIGKILL)
        loop = self._loop
        if loop is not None and loop.is_running() and not _on(loop):
            self._break(error)
            return pid
        try:
            fresh = _Reader(self._zygote.fork())
        except BrokenProcessPool:
            self._break(error)
            return pid
        with self._reading:  # nobody reads the pipe while it is swapped
            with self._lock:
                gone = self._closed or self._broken is not None
                if not gone:
                    failed = list(self._pending[i].values())
                    self._pending[i] = {}
                    old, self._pipes[i] = self._pipes[i], fresh
                    self._busy_since[i] = 0.0
            if gone:
                fresh.close()  # (its worker exits at its pipe's end)
                return pid
            if self._loop is not None:
                self._loop.remove_reader(old.fileno())
                self._loop.add_reader(fresh.fileno(), self._readable, i)
            with self._sending[i]:
                old.close()
        for future in failed:
            if not future.done():
                future.set_exception(error)
        return pid

    def _break(self, error: BaseException) -> None:
        with self._lock:
            self._broken = self._broken or error
            failed = [f for pending in self._pending for f in pending.values()]
            for pending in self._pending:
                pending.clear()
        for future in failed:
            if not future.done():
                future.set_exception(error)
        self._stop()

    def shutdown(self) -> None:
        self._break(BrokenProcessPool("the masking pool was shut down"))

    def _stop(self) -> None:
        """Each process exits after the job it is on (nobody reads its answer), or at its pipe's
        end. The pipes are closed where they are read: on the loop's thread while it runs (a
        descriptor closed under its selector could be reused by a new set's pipe)."""
        for pipe, sending in zip(self._pipes, self._sending, strict=True):
            with sending, contextlib.suppress(OSError):  # gone already, or closed
                pipe.send(pickle.dumps(None))
        loop = self._loop
        if loop is not None and loop.is_running() and not _on(loop):
            with contextlib.suppress(RuntimeError):  # (closed meanwhile: nothing reads)
                loop.call_soon_threadsafe(self._close)
                return
        self._close()

    def _close(self) -> None:
        with self._reading:
            if self._closed:
                return
            self._detach()
            self._closed = True
            for pipe, sending in zip(self._pipes, self._sending, strict=True):
                with sending:
                    pipe.close()


def _on(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether this thread is `loop`'s, running."""
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


class _Reader:
    """The gateway's end of a worker's pipe (a socket pair): jobs sent whole, answers read as
    they come without ever blocking (`MSG_DONTWAIT`; the socket itself stays blocking for
    sends), each taken once all its bytes are in, framed as `multiprocessing.connection` frames
    them (the worker's end is one)."""

    CHUNK = 1 << 16

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self._buffer = bytearray()
        self.pid: int | None = None  # the worker's, its first message (`_zygote`)

    def fileno(self) -> int:
        return self._sock.fileno()

    def send(self, data: bytes) -> None:
        n = len(data)
        header = struct.pack("!i", n) if n <= 0x7FFFFFFF else struct.pack("!iQ", -1, n)
        if n <= 16384:
            self._sock.sendall(header + data)
        else:  # (not copied)
            self._sock.sendall(header)
            self._sock.sendall(data)

    def read(self) -> list | None:
        """The answers complete now ([] for none yet); None at the pipe's end."""
        while True:
            try:
                data = self._sock.recv(self.CHUNK, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # (reset by a worker that died)
                return None
            if not data:
                return None
            self._buffer += data
            if len(data) < self.CHUNK:
                break
        answers, taken = [], 0
        buffer = self._buffer
        while len(buffer) - taken >= 4:
            (size,), start = struct.unpack_from("!i", buffer, taken), taken + 4
            if size == -1:
                if len(buffer) - taken < 12:
                    break
                (size,), start = struct.unpack_from("!Q", buffer, taken + 4), taken + 12
            if len(buffer) < start + size:
                break
            taken = start + size
            with memoryview(buffer) as view, view[start:taken] as answer:
                answers.append(pickle.loads(answer))
        del buffer[:taken]
        if self.pid is None and answers:
            self.pid = answers.pop(0)
        return answers

    def close(self) -> None:
        self._sock.close()


class Zygote:
    """The spawned process the workers are forked from (`_zygote`). A fork request does not wait:
    the new worker's pipe end is passed over the zygote's socket, and jobs sent meanwhile wait in
    the pipe (the first ones until the zygote has loaded). A zygote that is gone makes `fork`
    raise BrokenProcessPool."""

    def __init__(self, settings: MaskingSettings):
        # spawn: forking a process that runs an asyncio loop and threads is unsafe
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_zygote, args=(child, settings),
                                        name="douane-masking-zygote", daemon=True)
        self._process.start()
        child.close()
        self._lock = threading.Lock()  # one request at a time on the socket

    def fork(self) -> socket.socket:
        """The gateway's end of a new worker's pipe."""
        conn, child = socket.socketpair()
        try:
            with self._lock:
                self._conn.send_bytes(b"fork")
                multiprocessing.reduction.send_handle(self._conn, child.fileno(),
                                                      self._process.pid)
        except (OSError, ValueError) as e:
            conn.close()
            raise BrokenProcessPool(f"the masking zygote is gone: {e}") from e
        finally:
            child.close()  # the zygote has its own copy (in flight or received)
        return conn

    def shutdown(self) -> None:
        """The zygote exits at the end of its socket; workers already forked go on until their
        pipes end."""
        with self._lock:
            self._conn.close()


def _zygote(conn: multiprocessing.connection.Connection, settings: MaskingSettings) -> None:
    # Ctrl-C reaches the whole process group: the zygote and its workers end with their pipes
    # (the pool's shutdown, or the gateway's exit), after the job they are on
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    engine.init_worker(settings)  # its fixed warm-up text only: never a user's
    split.prepare()  # (fixed texts too)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the workers
    gc.freeze()  # the analyser's objects out of the collector's reach: their pages stay shared
    while True:
        try:
            conn.recv_bytes()
            fd = multiprocessing.reduction.recv_handle(conn)
        except (EOFError, OSError):
            os._exit(0)
        if os.fork() == 0:
            try:  # a worker never returns to this loop
                conn.close()
                # nothing of the zygote's but its pipe: the write end of the zygote's exit
                # sentinel would keep the gateway's join of the zygote waiting for every worker
                os.closerange(3, fd)
                os.closerange(fd + 1, os.sysconf("SC_OPEN_MAX"))
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                os.nice(WORKER_NICENESS)
                worker = multiprocessing.connection.Connection(fd)
                worker.send_bytes(pickle.dumps(os.getpid()))  # the one the gateway may kill
                engine.serve(_Pipe(worker))
            finally:
                os._exit(1)
        os.close(fd)


class _Pipe:
    """A worker's end of its pipe, as `engine.serve` uses it: each answer is pickled by
    `_Answers`, not by the pipe's own `send` (multiprocessing's ForkingPickler builds a pickler
    with a copy of the reducers' table for each message). Jobs come pickled plainly too
    (`Workers.submit`); reading them back is the same `pickle.loads` either way."""

    def __init__(self, conn: multiprocessing.connection.Connection):
        self._conn = conn

    def recv(self):
        return self._conn.recv()

    def send(self, answer) -> None:
        out = io.BytesIO()
        _Answers(out, pickle.HIGHEST_PROTOCOL).dump(answer)
        self._conn.send_bytes(out.getbuffer())


class _Answers(pickle.Pickler):
    """Spans as their four fields, read back by `_span`: a dataclass's default pickling goes
    through copyreg and a dict of its fields each (the benchmark's answer, 4 spans: ~45 us to
    pickle and ~24 to read back, against ~11 and ~12, isolated at a load of ~8)."""

    def reducer_override(self, obj):
        if type(obj) is Span:
            return _span, (obj.start, obj.end, obj.entity, obj.score)
        return NotImplemented


_new = object.__new__
_set = object.__setattr__


def _span(start: int, end: int, entity: str, score: float) -> Span:
    """A Span as unpickling builds one by default (its fields set in a new instance's dict, no
    `__init__`: a frozen dataclass's sets each field through `object.__setattr__`), in one call."""
    span = _new(Span)
    _set(span, "__dict__", {"start": start, "end": end, "entity": entity, "score": score})
    return span


class _Wakes:
    """Answers for one event loop's awaited analyses, handed over at once where the loop reads
    them, else (a thread that read them while waiting, `MaskingPool.wait`) in one wake-up of
    the loop for all that finish before it runs; for all of a batch together (`held`).
    `asyncio.wrap_future` makes a wake-up per answer, a write to the loop's self-pipe each,
    even from the loop's own thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._done: list[tuple[asyncio.Future, Analysis]] = []
        self._held = 0  # batches being answered: the wake-up waits for their end
        self._asked = False  # a wake-up is on its way

    def add(self, waiter: asyncio.Future, future: Analysis) -> None:
        """`future`'s done callback, in whichever thread finished it."""
        with self._lock:
            self._done.append((waiter, future))
        self._wake()

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        with self._lock:
            self._held += 1
        try:
            yield
        finally:
            with self._lock:
                self._held -= 1
            self._wake()

    def _wake(self) -> None:
        with self._lock:
            wake = self._done and not self._held and not self._asked
            self._asked = self._asked or bool(wake)
        if wake and _on(self.loop):  # (read by the loop: handed over in the same pass)
            self._settle()
        elif wake:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody awaits
                self.loop.call_soon_threadsafe(self._settle)

    def _settle(self) -> None:
        with self._lock:
            done, self._done, self._asked = self._done, [], False
        for waiter, future in done:
            if waiter.done():  # timed out, or its task was cancelled
                continue
            if future.cancelled():
                waiter.cancel()
            elif (error := future.exception()) is not None:
                waiter.set_exception(error)
            else:
                waiter.set_result(future.result())


class IdleCores:
    """How many of the cores this process may run on stood idle lately, from the kernel's
    counters (/proc/stat's line of each, read at most every `EVERY` seconds; none where they
    cannot be read): a split analysis (`MaskingPool._split`) is quicker only where a second core
    would otherwise wait, and costs CPU that a busy host's other flows would pay. Not every
    core's sum: pinned to 2 cores of a host with 64 idle (a container's cpuset), the 2 may be
    busy. Nor more than a CPU quota leaves (cgroup v2's `cpu.max`, the tightest of this
    process's cgroup and its ancestors'): a container given 1 CPU of an idle 2-core host has
    no second core, whatever /proc/stat says; its cgroup's own use (`cpu.stat`) is taken from
    the quota."""

    EVERY = 0.2  # (the counters tick every 10 ms: 40 ticks on 2 cores)
    STAT = "/proc/stat"
    CGROUP = "/proc/self/cgroup"
    CGROUPS = "/sys/fs/cgroup"  # cgroup v2's mount

    def __init__(self) -> None:
        self._quota = self._find_quota()
        self._at = time.monotonic()
        self._last = self._read()
        self.cores = 0.0

    @classmethod
    def _find_quota(cls) -> tuple[float, str] | None:
        """(cores, the cpu.stat of the cgroup it limits) of the tightest quota, if any."""
        try:
            with open(cls.CGROUP) as f:
                path = next((line[3:].strip() for line in f if line.startswith("0::")), None)
        except OSError:
            return None
        if path is None:
            return None
        tightest = None
        folder = os.path.normpath(cls.CGROUPS + "/" + path)
        while True:
            try:
                with open(os.path.join(folder, "cpu.max")) as f:
                    quota, period = f.read().split()
                cores = int(quota) / int(period) if quota != "max" else None
            except (OSError, ValueError, ZeroDivisionError):  # (the root has none)
                cores = None
            if cores is not None and (tightest is None or cores < tightest[0]):
                tightest = (cores, os.path.join(folder, "cpu.stat"))
            if len(folder) <= len(os.path.normpath(cls.CGROUPS)):
                return tightest
            folder = os.path.dirname(folder)

    def _read(self) -> tuple[int, int, int, float | None] | None:
        """(idle, all) ticks of this process's cores (idle and iowait, out of user to steal),
        how many they are, and the CPU seconds the quota's cgroup used (None: no quota)."""
        idle = total = cores = 0
        try:
            mine = os.sched_getaffinity(0)
            with open(self.STAT, "rb") as f:
                f.readline()  # (every core's sum)
                for line in f:
                    if not line.startswith(b"cpu"):
                        break
                    name, *fields = line.split()
                    if int(name[3:]) in mine:
                        ticks = [int(n) for n in fields[:8]]
                        if len(ticks) < 8:
                            return None
                        idle, total, cores = idle + ticks[3] + ticks[4], total + sum(ticks), \
                            cores + 1
            used = None
            if self._quota is not None:
                with open(self._quota[1], "rb") as f:
                    used = next(int(line.split()[1]) for line in f
                                if line.startswith(b"usage_usec ")) / 1e6
        except (OSError, ValueError, IndexError, StopIteration):
            return None  # (a quota whose use cannot be read: no core counted idle)
        return (idle, total, cores, used) if cores else None

    def idle(self) -> float:
        now = time.monotonic()
        if now - self._at >= self.EVERY:
            counters = self._read()
            if counters and self._last and counters[1] > self._last[1]:
                idle, total = counters[0] - self._last[0], counters[1] - self._last[1]
                self.cores = idle / total * counters[2]
                if self._quota is not None and counters[3] is not None \
                        and self._last[3] is not None:
                    seconds = total / counters[2] / os.sysconf("SC_CLK_TCK")  # of wall time
                    used = (counters[3] - self._last[3]) / seconds
                    self.cores = max(0.0, min(self.cores, self._quota[0] - used))
            self._at, self._last = now, counters
        return self.cores


class MaskingPool:
    READ_FOR = 0.05  # seconds a waiting thread reads the pipes at a time, then looks again
    # idle cores an analysis is split at (`_split`): at c=1 on 2 cores the other one is ~0.8
    # idle, at c=32 none
    SPLIT_IDLE = 0.5
    # a worker that has answered nothing for the timeout is killed this long after an analysis
    # timed out (`overran`), at most `RESTARTS` times a minute: no fork storm from texts that
    # hang the analyser, resent
    GRACE = 1.0
    RESTARTS = 5

    def __init__(self, settings: MaskingSettings):
        self.settings = settings
        self.idle = IdleCores()
        self._parts = split.groups(settings.entities, bool(settings.model))
        self._zygote: Zygote | None = None
        self._executors: dict[bool, Workers] = {}  # by urgent
        self._lock = threading.Lock()
        self._reading = threading.RLock()  # whoever reads the workers' pipes (`Workers`)
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop that reads them
        # by urgent: analyses not yet sent, and batches on the executor's workers
        self._waiting: dict[bool, list[tuple[list[str], Analysis]]] = {False: [], True: []}
        self._batches_out = {False: 0, True: 0}
        self._wakes: _Wakes | None = None  # the awaiting loop's, made on it
        self._closed = False
        self._kills: collections.deque[float] = collections.deque()  # in the last minute

    def executor(self, urgent: bool = False) -> Workers:
        if urgent not in self._executors:
            size = 1 if urgent else self.settings.workers
            if self._zygote is None:
                self._zygote = Zygote(self.settings)
            try:
                self._executors[urgent] = Workers(size, self._zygote, self._reading, self.wait)
            except BrokenProcessPool:  # the zygote died (its workers go on): a new one
                logger.error("douane: the masking zygote died; it is restarted")
                self._zygote.shutdown()
                self._zygote = Zygote(self.settings)
                self._executors[urgent] = Workers(size, self._zygote, self._reading, self.wait)
            loop = self._loop
            if loop is not None and _on(loop):
                self._executors[urgent].attach(loop)
            elif loop is not None:  # (a batch sent by the dispatcher's thread)
                with contextlib.suppress(RuntimeError):  # closed: the waiters read
                    loop.call_soon_threadsafe(self._executors[urgent].attach, loop)
        return self._executors[urgent]

    def _attach(self) -> None:
        """Called on every submit: the running loop, if any, reads the workers' pipes."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if loop is not self._loop:
            self._loop = loop
            for executor in list(self._executors.values()):
                executor.attach(loop)

    def wait(self, future: concurrent.futures.Future, timeout: float | None) -> None:
        """Until `future` is done or `timeout` passes. The loop, running in another thread,
        reads its answer; otherwise (no loop, one stopped, or this is the loop's thread, which
        then reads for every flow) this thread reads the pipes meanwhile."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not future.done():
            left = self.READ_FOR if deadline is None else min(self.READ_FOR,
                                                               deadline - time.monotonic())
            if left <= 0:
                return
            loop = self._loop
            if loop is not None and loop.is_running() and not _on(loop):
                concurrent.futures.wait([future], left)
            elif self._reading.acquire(timeout=left):
                try:
                    self._read_ready(left)
                finally:
                    self._reading.release()

    def _read_ready(self, timeout: float) -> None:
        """Under the reading lock: the answers that come in on any pipe within `timeout`."""
        pipes = {fd: (executor, i) for executor in list(self._executors.values())
                 for fd, i in executor.fileno_of().items()}
        for fd in multiprocessing.connection.wait(list(pipes), timeout):
            executor, i = pipes[fd]
            executor.read(i)

    def warm_up(self) -> list[Analysis]:
        """Start every worker now, so the first request does not wait for spaCy to load; load
        here what streams read in this process (spaCy's stop words), not on the event loop."""
        engine.not_a_name_words()
        return [*(self.submit(["warm up"]) for _ in range(self.settings.workers)),
                self.submit(["warm up"], urgent=True)]

    def submit(self, texts: list[str], urgent: bool = False) -> Analysis:
        """An analysis of `texts` (one span list per text), on the urgent worker or the main
        ones: at once while one is free, else in the next batch. Cancellable until it leaves."""
        self._attach()
        future: Analysis = _Answer(self.wait)
        with self._lock:
            self._waiting[urgent].append((texts, future))
        self._dispatch()
        return future

    def result(self, future: Analysis) -> list[list[Span]]:
        """Wait for a submitted analysis (blocking; bounded by the configured timeout)."""
        try:
            return future.result(timeout=self.settings.timeout_seconds)
        except TimeoutError:
            self.overran()
            raise

    async def analyze(self, texts: list[str]) -> list[list[Span]]:
        loop = asyncio.get_running_loop()
        if self._wakes is None or self._wakes.loop is not loop:
            self._wakes = _Wakes(loop)
        self._attach()
        future, waiter = self._split(texts) or self.submit(texts), loop.create_future()
        future.add_done_callback(functools.partial(self._wakes.add, waiter))
        try:
            return await asyncio.wait_for(waiter, self.settings.timeout_seconds)
        except TimeoutError:
            self.overran()
            raise
        finally:
            future.cancel()  # one still queued is not analysed for nothing (else a no-op)

    async def settled(self, futures: list[concurrent.futures.Future], timeout: float) -> bool:
        """Whether every one of `futures` (the pool's analyses; any done future) is done within
        `timeout`, on the loop without blocking it (a stream's end, `Mask.douane_stream_wait`).
        Handed over as `analyze`'s answers are: where the loop reads the answers, in the pass
        that read them, a batch's ends all at once. `asyncio.wrap_future` and `asyncio.wait` wrote
        the loop's self-pipe once per answer, even from the loop's own thread, and the answers of
        a batch woke their ends one callback chain each in the pass after."""
        pending = [f for f in futures if not f.done()]
        if not pending:
            return True
        loop = asyncio.get_running_loop()
        if self._wakes is None or self._wakes.loop is not loop:
            self._wakes = _Wakes(loop)
        self._attach()
        waiter, left, lock = loop.create_future(), [len(pending)], threading.Lock()
        wakes = self._wakes

        def one_done(_: concurrent.futures.Future) -> None:  # in whichever thread finished it
            with lock:
                left[0] -= 1
                last = not left[0]
            if last:
                wakes.add(waiter, _SETTLED)

        for future in pending:
            future.add_done_callback(one_done)
        try:
            await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            return False
        return True

    def overran(self) -> None:
        """An analysis ran past the timeout (and failed closed): `GRACE` seconds later, a worker
        hung on its job is killed (`_recover`). Not waited for: on the loop, a timer."""
        loop = self._loop
        if loop is not None and loop.is_running():
            with contextlib.suppress(RuntimeError):  # (closed meanwhile)
                loop.call_soon_threadsafe(loop.call_later, self.GRACE, self._recover)
                return
        timer = threading.Timer(self.GRACE, self._recover)
        timer.daemon = True
        timer.start()

    def _recover(self) -> None:
        """Each worker that has had a job and answered nothing for the timeout is killed and
        replaced by a worker forked from the zygote (ready at once: the zygote has loaded): what
        is in flight on it fails, and is refused; the other workers' analyses go on
        (`Workers.kill`). Without it, a hung worker's batch stayed counted as out: with one worker,
        or once each hung, every masked flow timed out."""
        limit = self.settings.timeout_seconds
        for executor in list(self._executors.values()):
            for i in executor.hung(limit):
                now = time.monotonic()
                with self._lock:
                    while self._kills and now - self._kills[0] > 60:
                        self._kills.popleft()
                    refused = len(self._kills) >= self.RESTARTS
                    if not refused:
                        self._kills.append(now)
                if refused:
                    logger.error("douane: a masking worker has answered nothing for over %s s; "
                                 "not restarted (%d restarts in the last minute): masking fails "
                                 "closed until it answers", limit, self.RESTARTS)
                    continue
                pid = executor.kill(i, BrokenProcessPool(
                    f"a masking worker answered nothing for over {limit} s and was killed"))
                logger.error("douane: a masking worker (pid %s) answered nothing for over %s s: "
                             "killed, and replaced", pid, limit)

    def _split(self, texts: list[str]) -> Analysis | None:
        """On an idle pool (nothing waiting, no batch out) of two workers or more, on a host
        with a core to spare (`IdleCores`): the analysis in `split.PARTS` parts at once, one per
        worker, combined as one analysis gives it (in the reader thread of the last part in),
        when each part has something to read (`split.worth`); else None. At c=1 a second core
        would stand by while one worker reads the whole answer; a split costs more CPU in all
        (each part reads the text: ~0.5 ms for the benchmark's answer, with the hand-offs),
        which under load the other flows would pay."""
        if self.settings.workers < split.PARTS or self.idle.idle() < self.SPLIT_IDLE \
                or not split.worth(texts, self._parts):
            return None
        with self._lock:
            if self._closed or any(self._waiting.values()) or any(self._batches_out.values()):
                return None
            self._batches_out[False] += split.PARTS
        future: Analysis = _Answer(self.wait)
        future.set_running_or_notify_cancel()  # (parts already sent are not called back)
        parts = _Parts(texts, future)
        for part in range(split.PARTS):
            try:
                sent = self._send_to(False, texts, split.analyze_part, part)
            except Exception as e:  # the executor could not even be rebuilt
                parts.failed(e)
                self._batch_done(False, [], None)
                continue
            sent.add_done_callback(functools.partial(self._part_done, parts, part))
        return future

    def _part_done(self, parts: _Parts, part: int, sent: Analysis) -> None:
        self._batch_done(False, [], None)
        try:
            result = sent.result()
        except BaseException as e:  # a crashed worker, a failed analysis, a shutdown
            parts.failed(e)
            return
        parts.done(part, result)

    def shutdown(self) -> None:
        with self._lock:
            self._closed = True
            waiting = [f for each in self._waiting.values() for _, f in each]
            self._waiting = {False: [], True: []}
        for future in waiting:
            future.cancel()
        for executor in self._executors.values():
            executor.shutdown()
        self._executors.clear()
        if self._zygote is not None:
            self._zygote.shutdown()
            self._zygote = None

    def _take_batch(self) -> tuple[bool, list[tuple[list[str], Analysis]]] | None:
        """Under the lock: the next batch and the executor (urgent or not) free to take it, if
        any. Urgent analyses first, on the urgent worker or else on a free main one (a burst of
        stream ends uses every worker), then the main ones."""
        if self._closed:
            return None
        for kind, urgent in ((True, True), (True, False), (False, False)):
            waiting = self._waiting[kind]
            if waiting and self._batches_out[urgent] < (1 if urgent else self.settings.workers):
                # urgent ones are shared out over every worker: each end waits for its share,
                # not for all of them on the first worker free while the others stand idle
                n = -(-len(waiting) // (self.settings.workers + 1)) if kind else len(waiting)
                batch, self._waiting[kind] = waiting[:n], waiting[n:]
                self._batches_out[urgent] += 1
                return urgent, batch
        return None

    def _dispatch(self) -> None:
        """Sends the batches that can leave now (a submit, a worker given back), in the caller's
        thread: the event loop's mostly, which reads the answers (`Workers.attach`). A thread of
        its own took each batch gathered while every worker was busy: woken, it waited for the
        GIL the loop held, and the worker given back stood idle meanwhile."""
        while True:
            with self._lock:
                taken = self._take_batch()
            if taken is None:
                return
            self._send_batch(*taken)

    def _send_batch(self, urgent: bool, batch: list[tuple[list[str], Analysis]]) -> None:
        """Outside the lock (submitting may wait for the executor's lock)."""
        batch = [(texts, f) for texts, f in batch if f.set_running_or_notify_cancel()]
        if not batch:  # every one was cancelled before it left
            self._give_back(urgent)
            return
        try:
            sent = self._send_to(urgent, [text for texts, _ in batch for text in texts])
        except Exception as e:  # the executor could not even be rebuilt: fail these analyses
            for _, future in batch:
                future.set_exception(e)
            self._give_back(urgent)
            return
        sent.add_done_callback(functools.partial(self._batch_done, urgent, batch))

    def _give_back(self, urgent: bool) -> None:
        with self._lock:
            self._batches_out[urgent] -= 1

    def _batch_done(self, urgent: bool, batch: list[tuple[list[str], Analysis]],
                    sent: Analysis | None) -> None:
        """A worker given back (`sent`: its batch's answer, None for a split's part): what
        waits leaves on it before this batch's answers are handed over."""
        self._give_back(urgent)
        self._dispatch()
        if sent is None:
            return
        try:
            results = sent.result()
        except BaseException as e:  # a crashed worker, a failed analysis, a shutdown
            for _, future in batch:
                future.set_exception(e)
            return
        start = 0
        with self._wakes.held() if self._wakes else contextlib.nullcontext():
            for texts, future in batch:
                future.set_result(results[start:start + len(texts)])
                start += len(texts)

    def _send_to(self, urgent: bool, texts: list[str], fn=None, *args) -> Analysis:
        fn = fn or engine.analyze_batch  # (read at the call: a test's fault script replaces it)
        try:
            return self.executor(urgent).submit(fn, texts, *args)
        except BrokenProcessPool:
            logger.error("douane: a masking worker died; its pool is rebuilt")
            self._executors.pop(urgent).shutdown()
            return self.executor(urgent).submit(fn, texts, *args)


_SETTLED: concurrent.futures.Future = concurrent.futures.Future()  # `settled`'s all done
_SETTLED.set_result(None)


class _Answer(concurrent.futures.Future):
    """A future of the pool's whose `result` and `exception` wait through `MaskingPool.wait`:
    where no event loop reads the workers' pipes, the waiting thread does."""

    def __init__(self, wait: Wait):
        super().__init__()
        self._wait = wait

    def result(self, timeout: float | None = None):
        self._wait(self, timeout)
        return super().result(timeout=0)

    def exception(self, timeout: float | None = None):
        self._wait(self, timeout)
        return super().exception(timeout=0)


class _Parts:
    """A split analysis's parts (`MaskingPool._split`), done in any order by the workers'
    reader threads: the last one in combines them; the first failure fails the analysis."""

    def __init__(self, texts: list[str], future: Analysis):
        self.texts, self.future = texts, future
        self._lock = threading.Lock()
        self._parts: list[list[split.Part] | None] = [None] * split.PARTS
        self._left = split.PARTS
        self._failed = False

    def done(self, part: int, result: list[split.Part]) -> None:
        with self._lock:
            self._parts[part] = result
            self._left -= 1
            if self._left or self._failed:
                return
        try:
            combined = split.combine(self.texts, self._parts)
        except Exception as e:  # (a bug: the analysis fails, the flow is refused)
            self.future.set_exception(e)
            return
        self.future.set_result(combined)

    def failed(self, error: BaseException) -> None:
        with self._lock:
            first, self._failed = not self._failed, True
        if first:
            self.future.set_exception(error)

