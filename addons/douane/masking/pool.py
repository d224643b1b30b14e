"""Analysis off the event loop: pools of worker processes (threads would share the GIL).

The event loop only awaits (`analyze`); streams use `submit`/`result` (the stream callable cannot
await). Two executors: the main one (`workers` processes) takes every analysis that is awaited or
collected later; the urgent one (one more process) takes only analyses the event loop blocks on (a
stream channel's end, `StreamMasker.finish`), so that wait is its own analysis, never the queue of
every other stream's. A crashed worker breaks its executor: the analyses in flight on it fail (and
are refused by the caller), and it is rebuilt at the next submit.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import multiprocessing
from concurrent.futures.process import BrokenProcessPool

from douane.masking import engine
from douane.masking.config import MaskingSettings
from douane.masking.engine import Span

logger = logging.getLogger(__name__)


class MaskingPool:
    def __init__(self, settings: MaskingSettings):
        self.settings = settings
        self._executors: dict[bool, concurrent.futures.ProcessPoolExecutor] = {}  # by urgent

    def executor(self, urgent: bool = False) -> concurrent.futures.ProcessPoolExecutor:
        if urgent not in self._executors:
            # spawn: forking a process that runs an asyncio loop and threads is unsafe
            self._executors[urgent] = concurrent.futures.ProcessPoolExecutor(
                max_workers=1 if urgent else self.settings.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=engine.init_worker, initargs=(self.settings,))
        return self._executors[urgent]

    def warm_up(self) -> list[concurrent.futures.Future[list[list[Span]]]]:
        """Start every worker now, so the first request does not wait for spaCy to load."""
        return [*(self.submit(["warm up"]) for _ in range(self.settings.workers)),
                self.submit(["warm up"], urgent=True)]

    def submit(self, texts: list[str],
               urgent: bool = False) -> concurrent.futures.Future[list[list[Span]]]:
        try:
            return self.executor(urgent).submit(engine.analyze_batch, texts)
        except BrokenProcessPool:
            logger.error("douane: a masking worker died; its pool is rebuilt")
            self._executors.pop(urgent).shutdown(wait=False, cancel_futures=True)
            return self.executor(urgent).submit(engine.analyze_batch, texts)

    def result(self, future: concurrent.futures.Future[list[list[Span]]]) -> list[list[Span]]:
        """Wait for a submitted analysis (blocking; bounded by the configured timeout)."""
        return future.result(timeout=self.settings.timeout_seconds)

    async def analyze(self, texts: list[str]) -> list[list[Span]]:
        return await asyncio.wait_for(asyncio.wrap_future(self.submit(texts)),
                                      self.settings.timeout_seconds)

    def shutdown(self) -> None:
        for executor in self._executors.values():
            executor.shutdown(wait=False, cancel_futures=True)
        self._executors.clear()
