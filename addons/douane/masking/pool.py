"""Analysis off the event loop: a pool of worker processes (threads would share the GIL).

The event loop only awaits (`analyze`); streams use `submit`/`result` (the stream callable cannot
await). A crashed worker breaks the pool: the request in flight fails (and is refused by the
caller), and the pool is rebuilt for the next one.
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
        self._executor: concurrent.futures.ProcessPoolExecutor | None = None

    def executor(self) -> concurrent.futures.ProcessPoolExecutor:
        if self._executor is None:
            # spawn: forking a process that runs an asyncio loop and threads is unsafe
            self._executor = concurrent.futures.ProcessPoolExecutor(
                max_workers=self.settings.workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=engine.init_worker, initargs=(self.settings,))
        return self._executor

    def warm_up(self) -> list[concurrent.futures.Future[list[list[Span]]]]:
        """Start every worker now, so the first request does not wait for spaCy to load."""
        return [self.submit(["warm up"]) for _ in range(self.settings.workers)]

    def submit(self, texts: list[str]) -> concurrent.futures.Future[list[list[Span]]]:
        try:
            return self.executor().submit(engine.analyze_batch, texts)
        except BrokenProcessPool:
            self._reset()
            return self.executor().submit(engine.analyze_batch, texts)

    def result(self, future: concurrent.futures.Future[list[list[Span]]]) -> list[list[Span]]:
        """Wait for a submitted analysis (blocking; bounded by the configured timeout)."""
        try:
            return future.result(timeout=self.settings.timeout_seconds)
        except BrokenProcessPool:
            self._reset()
            raise

    async def analyze(self, texts: list[str]) -> list[list[Span]]:
        future = self.submit(texts)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future),
                                          self.settings.timeout_seconds)
        except BrokenProcessPool:
            self._reset()
            raise

    def _reset(self) -> None:
        logger.error("douane: a masking worker died; the pool is rebuilt")
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        self._executor = None

    def shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
