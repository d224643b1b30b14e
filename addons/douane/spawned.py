"""Starting a writer process (multiprocessing's spawn) without the gateway's main script.

Spawn runs the parent's `__main__` again in the child (as `__mp_main__`), so that what it
defines can be unpickled there. The gateway's is mitmdump's script, whose import loads
mitmproxy's tools: ~40 MB of a writer's memory and most of its start-up, for a child whose
target is a function of a douane module and which unpickles only douane's and mitmproxy's
classes (imported by that module)."""

from __future__ import annotations

import sys
from multiprocessing.process import BaseProcess


def start(process: BaseProcess) -> None:
    main = sys.modules["__main__"]
    path = main.__dict__.pop("__file__", None)  # (what spawn reads to run it again)
    try:
        process.start()
    finally:
        if path is not None:
            main.__file__ = path
