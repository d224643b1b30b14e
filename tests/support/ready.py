"""Loaded last by tests/support/gateway.py: logs READY and the listeners' ports (in the order of
the `--mode`s) once mitmproxy has started without an error.

mitmproxy listens before it checks the addons' start-up errors (`errorcheck`, after the `running`
hooks, then exits). This addon's `running` hook comes after every other one and logs READY only
if none of them logged an error, so a launcher waits for READY (or the exit) instead of for a
fixed time after "listening at", whose lines come in no set order when there are several modes.
"""

from __future__ import annotations

import logging

from mitmproxy import ctx

READY = "douane-tests: gateway ready"
logger = logging.getLogger(__name__)


class Ready:
    def running(self) -> None:
        errorcheck = ctx.master.addons.get("errorcheck")
        if errorcheck is None or not errorcheck.logger.has_errored:
            ports = [str(server.listen_addrs[0][1])
                     for server in ctx.master.addons.get("proxyserver").servers]
            logger.info(f"{READY} on ports {' '.join(ports)}")


addons = [Ready()]
