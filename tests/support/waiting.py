"""Waiting for a condition in tests: polled with a deadline, never a bare sleep."""

from __future__ import annotations

import time
from collections.abc import Callable


def until(condition: Callable[[], object], timeout: float = 10, step: float = 0.01) -> bool:
    """True as soon as `condition()` is; False when `timeout` seconds pass first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(step)
    return True
