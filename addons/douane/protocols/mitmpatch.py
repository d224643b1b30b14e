"""douane wraps a few of mitmproxy's own functions (where its reader has no bound, or where a
stream must wait off the loop). A wrap is only right for the code it was written against, so each
is checked at start against mitmproxy's version and the source of every function it relies on,
and refused on any other: its behaviour would otherwise change silently."""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable
from typing import Any

from mitmproxy import version

VERSION = "12.2."


def check(need: str, why: str, functions: dict[str, Callable[..., Any]],
          expected: dict[str, str]) -> None:
    """ValueError unless this is mitmproxy `VERSION`x and each of `functions` has the sha256 of
    its source `expected` (by name). `need` and `why` say what needs them, for the message."""
    wrong = [name for name, function in functions.items()
             if hashlib.sha256(inspect.getsource(function).encode()).hexdigest()
             != expected[name]]
    if not version.VERSION.startswith(VERSION) or wrong:
        raise ValueError(
            f"douane: {need} mitmproxy {VERSION}x as douane knows it ({why}); this is mitmproxy "
            f"{version.VERSION}" + (f", with a different {', '.join(wrong)}" if wrong else ""))
