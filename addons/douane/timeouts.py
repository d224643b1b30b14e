"""`ClientTimeouts`: a client connection that holds the gateway without making progress is closed.

mitmproxy's only timeout is `tcp_timeout` (600 s of silence): a client sending a byte now and
then, or none at all, holds its connection for ever. douane's limits (`gateway.timeouts`):
- idle: a connection with no request in progress receives nothing for this long (from its opening
  or the end of its last answer);
- headers: a request's headers are complete within this long of its first byte;
- body: a request's body is complete within this long of its headers.
Answers may take as long as the upstream needs (the connection is busy then, not idle). A WebSocket
is left to its own policing. A watchdog task checks every second; its work is one pass over the
open client connections.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from mitmproxy import connection, ctx, http

from douane.flowstate import Reason, state
from douane.settings import Settings

logger = logging.getLogger(__name__)
TICK = 1.0


@dataclass
class _Client:
    conn: connection.Client
    ready_since: float  # time.time() the connection was last without a request in progress
    settled: bool = True  # ready_since moved past the end of the last answer's own activity
    first_byte: float | None = None  # first activity seen since ready_since (to the tick)
    busy: dict[str, tuple[http.HTTPFlow, float | None]] = field(default_factory=dict)
    # flow id -> (flow, deadline of its body; None once the body is complete)
    exempt: bool = False  # a WebSocket


class ClientTimeouts:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.clients: dict[str, _Client] = {}
        self._task: asyncio.Task[None] | None = None

    def running(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch())

    def done(self) -> None:
        if self._task:
            self._task.cancel()

    def client_connected(self, client: connection.Client) -> None:
        # (mitmproxy's own start-up events on the connection count as activity: settle first)
        self.clients[client.id] = _Client(client, time.time(), settled=False)

    def client_disconnected(self, client: connection.Client) -> None:
        self.clients.pop(client.id, None)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        c = self.clients.get(flow.client_conn.id)
        if c is not None:
            c.busy[flow.id] = (flow, time.time() + self.settings.config.limits.body_timeout)

    def request(self, flow: http.HTTPFlow) -> None:
        c = self.clients.get(flow.client_conn.id)
        if c is not None and flow.id in c.busy:
            c.busy[flow.id] = (flow, None)

    def response(self, flow: http.HTTPFlow) -> None:
        self._finished(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._finished(flow)

    def http_connect(self, flow: http.HTTPFlow) -> None:
        self._finished(flow)  # the tunnel's first request comes next

    def websocket_start(self, flow: http.HTTPFlow) -> None:
        c = self.clients.get(flow.client_conn.id)
        if c is not None:
            c.exempt = True

    def _finished(self, flow: http.HTTPFlow) -> None:
        c = self.clients.get(flow.client_conn.id)
        if c is not None:
            c.busy.pop(flow.id, None)
            if not c.busy:
                c.ready_since, c.first_byte, c.settled = time.time(), None, False

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            try:
                late = self._check(time.time())
            except Exception:  # the watchdog must outlive any one connection's oddity
                logger.exception("douane: the client timeout watchdog failed a check")
                continue
            for handler in late:
                # One at a time, the loop free between them: a thousand connections opened
                # together time out together, and their teardowns would be one long stall.
                await handler.on_timeout()
                await asyncio.sleep(0)

    def _check(self, now: float) -> list[Any]:
        """The connection handlers to close."""
        limits = self.settings.config.limits
        handlers = ctx.master.addons.get("proxyserver").connections
        late_handlers = []
        for c in list(self.clients.values()):
            handler = handlers.get(c.conn.id)
            if handler is None or c.exempt:
                continue
            why = None
            if c.busy:
                late = [f for f, deadline in c.busy.values() if deadline and deadline < now]
                for f in late:
                    state(f).decide("refuse", Reason("protocol.timeout", "request body too slow"),
                                    status=408)
                why = "request body not complete in time" if late else None
            elif not c.settled:  # sending the last answer counts as activity too: not a new byte
                c.ready_since = max(c.ready_since, handler.timeout_watchdog.last_activity)
                c.settled = True
            elif c.first_byte is None:
                if handler.timeout_watchdog.last_activity > c.ready_since:
                    c.first_byte = now
                elif now - c.ready_since > limits.idle_timeout:
                    why = "idle"
            if c.first_byte is not None and not c.busy and now - c.first_byte > limits.header_timeout:
                why = "request headers not complete in time"
            if why:
                self.clients.pop(c.conn.id, None)
                logger.info("douane: closing client connection %s: %s",
                            c.conn.peername[0] if c.conn.peername else "?", why)
                late_handlers.append(handler)
        return late_handlers
