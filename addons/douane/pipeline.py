"""`Checkpoint`: douane's one mitmproxy addon. It receives every per-flow event and calls the
concerns' steps for that event in the order an `Order` declares (`addons/gateway.py` holds it).

mitmproxy walks every addon object for every event; one addon calling plain methods costs one walk.
Each step is called whatever an earlier one did, as mitmproxy would call the next addon: a step
that answers the flow (`flow.response` set, a refusal) leaves it to the later ones to see it and
stand aside, as each does (`if flow.response ...`). An exception in a step fails closed (a refusal
in the API's shape, a dropped WebSocket message, a closed client connection) and the later steps
still run: the audit trail records the failure. Lifecycle events (load, configure, running, done)
reach the concerns in their listed order; `done` awaits each (Admin drains the flows in flight
before the writers close), and one that fails does not keep the next from stopping.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

from mitmproxy import connection, http

from douane.flowstate import peek, state
from douane.loopshare import LoopShare
from douane.protocols.http1 import HeadRefusal
from douane.refusals import fail_closed

logger = logging.getLogger(__name__)

Step = Callable[[http.HTTPFlow], Any]
ClientStep = Callable[[connection.Client], Any]
LIFECYCLE = ("load", "configure", "running", "done")


@dataclass(frozen=True)
class Order:
    """The steps of each per-flow event, in the order they run."""

    http_connect: tuple[Step, ...] = ()
    requestheaders: tuple[Step, ...] = ()
    request: tuple[Step, ...] = ()
    responseheaders: tuple[Step, ...] = ()
    response: tuple[Step, ...] = ()
    error: tuple[Step, ...] = ()
    websocket_start: tuple[Step, ...] = ()
    websocket_message: tuple[Step, ...] = ()
    websocket_end: tuple[Step, ...] = ()
    # douane's own: a rewritten stream's layer waits for its filters (`protocols.streamwait`)
    douane_stream_wait: tuple[Step, ...] = ()
    # douane's own: a request head refused before any flow existed (`protocols.http1`)
    douane_head_refused: tuple[Callable[[HeadRefusal], Any], ...] = ()
    client_connected: tuple[ClientStep, ...] = ()
    client_disconnected: tuple[ClientStep, ...] = ()


EVENTS = tuple(f.name for f in fields(Order))


def _compiled(steps: Sequence[Step]) -> tuple[tuple[Step, bool], ...]:
    return tuple((step, inspect.iscoroutinefunction(step)) for step in steps)


def _release_documents(flow: http.HTTPFlow) -> None:
    """A body's JSON is shared by the steps of the event that parsed it (`protocols.document`),
    then let go: a flow kept in memory (mitmweb) does not keep its parsed bodies."""
    st = peek(flow)
    if st is not None and st.documents:
        st.documents.clear()


def _fail_websocket(flow: http.HTTPFlow, event: str, where: str, error: Exception) -> None:
    """A WebSocket's answer has left: fail closed on the message at hand, which is not sent."""
    logger.error("douane: %s failed on a WebSocket message (decision %s): %s", where,
                 state(flow).decision_id, type(error).__name__)
    logger.debug("traceback", exc_info=error)
    if event == "websocket_message" and flow.websocket and flow.websocket.messages:
        flow.websocket.messages[-1].drop()


class Checkpoint:
    def __init__(self, concerns: Sequence[object], order: Order):
        self.concerns = tuple(concerns)
        self.order = order
        self._steps = {event: _compiled(getattr(order, event)) for event in EVENTS}
        self._lifecycle = {hook: tuple(getattr(c, hook) for c in self.concerns if hasattr(c, hook))
                           for hook in LIFECYCLE}
        self._share = LoopShare()  # many flows' steps in one pass of the loop take turns

    # --- lifecycle: each concern in its listed order --------------------------------------------

    def load(self, loader) -> None:
        for hook in self._lifecycle["load"]:
            hook(loader)

    def configure(self, updated: set[str]) -> None:
        for hook in self._lifecycle["configure"]:
            hook(updated)

    def running(self) -> None:
        for hook in self._lifecycle["running"]:
            hook()

    async def done(self) -> None:
        # Each concern stops even when one before it failed to: the writers still flush and close.
        for hook in self._lifecycle["done"]:
            try:
                result = hook()
                if inspect.isawaitable(result):
                    await result
            except Exception:
                logger.exception("douane: %s failed", hook.__qualname__)

    # --- per-flow events ------------------------------------------------------------------------

    async def _run(self, event: str, flow: http.HTTPFlow) -> None:
        # a stream's wait only awaits an analysis: its turn comes after it, since the stream's
        # own work (a channel's end) follows in its layer as the hook returns
        if event != "douane_stream_wait":
            await self._share.enter()
        for step, is_async in self._steps[event]:
            try:
                if is_async:
                    await step(flow)
                else:
                    step(flow)
            except Exception as e:
                if event.startswith("websocket"):
                    _fail_websocket(flow, event, step.__qualname__, e)
                else:
                    fail_closed(flow, step.__qualname__, e)
        if event == "douane_stream_wait":
            await self._share.enter()

    async def http_connect(self, flow: http.HTTPFlow) -> None:
        await self._run("http_connect", flow)

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        await self._run("requestheaders", flow)

    async def request(self, flow: http.HTTPFlow) -> None:
        await self._run("request", flow)
        _release_documents(flow)

    async def responseheaders(self, flow: http.HTTPFlow) -> None:
        await self._run("responseheaders", flow)

    async def response(self, flow: http.HTTPFlow) -> None:
        await self._run("response", flow)
        _release_documents(flow)

    async def error(self, flow: http.HTTPFlow) -> None:
        await self._run("error", flow)

    async def websocket_start(self, flow: http.HTTPFlow) -> None:
        await self._run("websocket_start", flow)

    async def websocket_message(self, flow: http.HTTPFlow) -> None:
        await self._run("websocket_message", flow)

    async def websocket_end(self, flow: http.HTTPFlow) -> None:
        await self._run("websocket_end", flow)

    async def douane_stream_wait(self, flow: http.HTTPFlow) -> None:
        await self._run("douane_stream_wait", flow)

    def douane_head_refused(self, refusal: HeadRefusal) -> None:
        for step, _ in self._steps["douane_head_refused"]:
            try:
                step(refusal)
            except Exception as e:  # the refusal has left; its record is what failed
                logger.error("douane: %s failed on refusal %s: %s", step.__qualname__,
                             refusal.decision_id, type(e).__name__)
                logger.debug("traceback", exc_info=e)

    def client_connected(self, client: connection.Client) -> None:
        self._run_client("client_connected", client)

    def client_disconnected(self, client: connection.Client) -> None:
        self._run_client("client_disconnected", client)

    def _run_client(self, event: str, client: connection.Client) -> None:
        """A step failing on a connection closes it (`client.error`: a client whose bounds
        douane failed to set up is not served without them); later steps still run."""
        for step, _ in self._steps[event]:
            try:
                step(client)
            except Exception as e:
                logger.error("douane: %s failed on a connection: %s", step.__qualname__,
                             type(e).__name__)
                logger.debug("traceback", exc_info=e)
                client.error = f"douane: {step.__qualname__} failed"
