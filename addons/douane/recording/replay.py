"""Recorded requests re-sent through the gateway with mitmproxy's own client replay.

Recordings are scrubbed, so a replayed request carries no credential: the operator's token is put
in its place and the gateway authenticates, decides, audits and records the replay as a new flow of
whoever the token names. A flow recorded by a reverse-mode gateway is re-addressed to the gateway
URL with the token as a bearer; one recorded by a proxy-mode gateway goes to its original host with
the gateway as upstream proxy and the token as proxy password. The replay runs in this process
(the token never lands in a file or a command line).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from mitmproxy import ctx, http, options
from mitmproxy.proxy import mode_specs
from mitmproxy.tools.dump import DumpMaster
from mitmproxy.utils import asyncio_utils

from douane.recording.writer import SCRUBBED


def reverse_mode(flow: http.HTTPFlow) -> bool:
    return isinstance(flow.client_conn.proxy_mode, mode_specs.ReverseMode)


def prepare(flow: http.HTTPFlow, gateway: str, token: str) -> http.HTTPFlow:
    """A copy ready to replay: scrubbed headers dropped, the token in, addressed to the gateway."""
    copy = flow.copy()
    request = copy.request
    for name in {k.lower() for k, v in request.headers.items(multi=True) if v == SCRUBBED}:
        del request.headers[name]
    if reverse_mode(flow):
        url = urlsplit(gateway)
        request.scheme, request.host = url.scheme, url.hostname or "127.0.0.1"
        request.port = url.port or (443 if url.scheme == "https" else 80)
        request.headers["authorization"] = f"Bearer {token}"
    else:  # mitmproxy's upstream layer takes the proxy from the client connection's mode
        copy.client_conn.proxy_mode = mode_specs.ProxyMode.parse(f"upstream:{gateway}")
    return copy


class _Replay:
    """Queues the flows on mitmproxy's ClientPlayback, then stops the master when all are done."""

    def __init__(self, flows: Sequence[http.HTTPFlow], timeout: float):
        self.flows, self.timeout = flows, timeout

    def running(self) -> None:
        asyncio_utils.create_task(self._run(), name="douane replay", keep_ref=True)

    async def _run(self) -> None:
        ctx.master.commands.call("replay.client", self.flows)
        deadline = time.monotonic() + self.timeout
        while ctx.master.commands.call("replay.client.count") and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        ctx.master.shutdown()


def replay(flows: Sequence[http.HTTPFlow], gateway: str, token: str, ca: Path | None = None,
           timeout: float = 120) -> list[http.HTTPFlow]:
    """Send `flows` (recorded, in order) through the gateway; returns them with their new
    responses (or errors)."""
    via_proxy = bool(flows) and not reverse_mode(flows[0])
    prepared = [prepare(f, gateway, token) for f in flows]
    opts = options.Options()

    async def run() -> None:
        master = DumpMaster(opts, with_termlog=False, with_dumper=False)
        settings = {"server": False}
        if via_proxy:
            settings |= {"mode": [f"upstream:{gateway}"], "upstream_auth": f"douane:{token}"}
        if ca:
            settings["ssl_verify_upstream_trusted_ca"] = str(ca)
        opts.update(**settings)
        master.addons.add(_Replay(prepared, timeout))
        await master.run()

    asyncio.run(run())
    return prepared
