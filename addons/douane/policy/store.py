"""The `policy:` config section, and the live policy that reloads when its files change.

```yaml
policy:
  files: [grants.yaml]     # relative to the config file; validated by `douane check`
  reload_seconds: 2        # how often the files' modification times are checked
```
A changed file is parsed and validated off the event loop, then swapped in atomically; an invalid
new version is refused with a log line and the previous policy keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from douane.config import ConfigError, View
from douane.policy import model

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PolicySection:
    files: tuple[Path, ...]
    reload_seconds: int
    policy: model.Policy  # as loaded with the config
    upstreams: frozenset[str] | None  # the upstream names the configuration declares


def parse_section(v: View) -> PolicySection:
    v.only("files", "reload_seconds")
    files = tuple(v.doc.resolve(f) for f in v.strings("files"))
    upstreams = frozenset(str(name) for name in v.doc.data.get("upstreams") or {})
    return PolicySection(files, v.get("reload_seconds", int, 2),
                         model.load(list(files), upstreams), upstreams)


class LivePolicy:
    """The current policy, swapped atomically by a reload task."""

    def __init__(self, section: PolicySection):
        self.section = section
        self.current = section.policy
        self._mtimes = self._stat()
        self._task: asyncio.Task[None] | None = None

    def _stat(self) -> tuple[float, ...]:
        return tuple(p.stat().st_mtime_ns if p.exists() else -1 for p in self.section.files)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch())

    def stop(self) -> None:
        if self._task:
            self._task.cancel()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.section.reload_seconds)
            await self.reload_if_changed()

    async def reload_if_changed(self) -> bool:
        mtimes = self._stat()
        if mtimes == self._mtimes:
            return False
        self._mtimes = mtimes
        try:
            new = await asyncio.to_thread(model.load, list(self.section.files),
                                          self.section.upstreams)
        except ConfigError as e:
            logger.error("douane: policy change refused, version %s keeps serving: %s",
                         self.current.version, e)
            return False
        self.current = new
        logger.info("douane: policy version %s loaded", new.version)
        return True
