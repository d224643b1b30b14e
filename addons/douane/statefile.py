"""Files douane creates once in its state dir (the audit HMAC key, the dev issuer's key)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def create_once(path: Path, make: Callable[[], bytes]) -> bytes:
    """The file's content; when it is absent, `make()` is written to a temporary file (mode
    0600) then linked into place, so processes creating it at once all end up with the one that
    won, whole (never a half-written file, never a crash)."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    data = make()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # unlike rename, never replaces a key another process uses
        except FileExistsError:
            return path.read_bytes()
        return data
    finally:
        os.unlink(tmp)
