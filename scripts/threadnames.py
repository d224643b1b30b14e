"""A mitmproxy script for benches: each Python thread started after it loads is named, for the
kernel, as Python names it (CPython 3.13 leaves every thread named after the process), so
/proc/<pid>/task/<tid>/comm tells the audit writer from the recording feeder. Loaded with
`-s` before douane's addons (scripts/bench-recording --threads)."""

from __future__ import annotations

import ctypes
import threading

PR_SET_NAME = 15
_libc = ctypes.CDLL(None, use_errno=True)
_set_native_id = threading.Thread._set_native_id


def _named(self: threading.Thread) -> None:
    _set_native_id(self)
    _libc.prctl(PR_SET_NAME, self.name.encode()[:15], 0, 0, 0)  # (the kernel keeps 15 bytes)


threading.Thread._set_native_id = _named  # type: ignore[method-assign]
