"""The `recording:` config section.

```yaml
recording:
  dir: recordings                # default <state_dir>/recordings
  session: connection            # connection | window: what one .mitm file holds (see below)
  window_minutes: 60             # session: window
  scrub_headers: [x-internal-trace]   # scrubbed in addition to the built-in list
  on_error: refuse               # refuse | continue: traffic while recordings cannot be written
  retention_days: 30             # `douane sessions prune` deletes older recordings
  max_bytes: 10g                 # ... and the oldest beyond this total
  originals:                     # off by default: keep unmasked originals for auditors only
    public_key: auditors.pub.pem # RSA >= 2048 bits; the gateway can seal, never read
```
A session is an MCP session (`Mcp-Session-Id`) when there is one, else a client connection
(`session: connection`) or a fixed time window per user (`session: window`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from douane.config import View
from douane.recording import originals


@dataclass(frozen=True)
class RecordingSettings:
    dir: Path
    session: str
    window_minutes: int
    scrub_headers: tuple[str, ...]
    on_error: str
    retention_days: int
    max_bytes: int
    originals_key: bytes | None = field(default=None, repr=False)  # auditors' PEM public key

    @property
    def index_path(self) -> Path:
        return self.dir / "index.sqlite3"


def parse(v: View) -> RecordingSettings:
    v.only("dir", "session", "window_minutes", "scrub_headers", "on_error", "retention_days",
           "max_bytes", "originals")
    session = v.get("session", str, "connection")
    if session not in ("connection", "window"):
        raise v.error("expected connection or window", "session")
    on_error = v.get("on_error", str, "refuse")
    if on_error not in ("refuse", "continue"):
        raise v.error("expected refuse or continue", "on_error")
    state_dir = v.doc.resolve(v.doc.root().sub("gateway").get("state_dir", str, ".douane"))
    directory = v.doc.resolve(v.get("dir", str)) if "dir" in v.data else state_dir / "recordings"
    return RecordingSettings(directory, session, v.get("window_minutes", int, 60),
                             tuple(h.lower() for h in v.strings("scrub_headers", ())), on_error,
                             v.get("retention_days", int, 30), v.size("max_bytes", 10 * 1024**3),
                             _originals_key(v.sub("originals")) if "originals" in v.data else None)


def _originals_key(v: View) -> bytes:
    v.only("public_key")
    path = v.path_value("public_key")
    try:
        pem = path.read_bytes()
    except OSError as e:
        raise v.error(f"cannot read {path}: {e.strerror}", "public_key") from None
    try:
        originals.public_key(pem)
    except ValueError as e:
        raise v.error(f"{path}: {e}", "public_key") from None
    return pem
