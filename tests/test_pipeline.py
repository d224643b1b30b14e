"""The Checkpoint: one addon calling each concern's steps in the declared order."""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import json

import pytest
from mitmproxy import http
from mitmproxy.proxy.layers.http import HttpRequestHook
from mitmproxy.test import taddons, tflow, tutils

from douane import protocols
from douane.flowstate import peek, state
from douane.pipeline import EVENTS, LIFECYCLE, Checkpoint, Order
from tests.support.gateway import REPO


def load_gateway():
    spec = importlib.util.spec_from_file_location("douane_gateway_script", REPO / "addons" /
                                                  "gateway.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_step_of_every_concern_is_in_the_order():
    """A concern's flow step left out of the order would silently never run (and one listed
    for another concern's event would run at the wrong time)."""
    gateway = load_gateway()
    [checkpoint] = gateway.addons
    assert isinstance(checkpoint, Checkpoint)
    listed = {event: list(getattr(gateway.ORDER, event)) for event in EVENTS}
    for concern in gateway.CONCERNS:
        for event in EVENTS:
            method = getattr(concern, event, None)
            if method is not None:
                assert listed[event].count(method) == 1, f"{type(concern).__name__}.{event}"
    for event, steps in listed.items():
        for step in steps:  # a step named for its work (not for an event) is listed on purpose
            assert step.__name__ == event or step.__name__ not in EVENTS, step
            assert step.__self__ in gateway.CONCERNS, step


def test_concerns_are_not_mitmproxy_addons_of_their_own():
    """Only the Checkpoint is handed to mitmproxy: a concern registered too would see each event
    twice."""
    gateway = load_gateway()
    assert len(gateway.addons) == 1 and not hasattr(gateway.addons[0], "addons")
    assert not set(map(id, gateway.addons)) & set(map(id, gateway.CONCERNS))


class Log:
    """Concerns that write what ran into one list."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def concern(self, name: str, *, refuse: bool = False, fail: bool = False,
                asynchronous: bool = False):
        log = self

        def body(flow):
            log.calls.append(f"{name}{' (answered)' if flow.response else ''}")
            if fail:
                raise RuntimeError("bug")
            if refuse and not flow.response:
                flow.response = http.Response.make(403, b"no")

        class Concern:
            if asynchronous:
                async def request(self, flow):
                    await asyncio.sleep(0)
                    body(flow)
            else:
                def request(self, flow):
                    body(flow)
        Concern.__name__ = name
        return Concern()


def test_steps_run_in_order_async_ones_awaited_in_place():
    log = Log()
    a, b, c = log.concern("a"), log.concern("b", asynchronous=True), log.concern("c")
    checkpoint = Checkpoint([a, b, c], Order(request=(a.request, b.request, c.request)))
    asyncio.run(checkpoint.request(tflow.tflow()))
    assert log.calls == ["a", "b", "c"]


def test_a_refusal_leaves_the_later_steps_called_as_mitmproxy_calls_later_addons():
    """mitmproxy calls every addon's `request` hook even after one set `flow.response`; each
    concern stands aside itself. The Checkpoint keeps exactly that."""
    mitm, ours = Log(), Log()
    names = [("a", False), ("refuser", True), ("c", False)]
    chain = [mitm.concern(n, refuse=r) for n, r in names]
    with taddons.context(*chain) as tctx:
        asyncio.run(tctx.master.addons.trigger_event(HttpRequestHook(tflow.tflow())))
    concerns = [ours.concern(n, refuse=r) for n, r in names]
    checkpoint = Checkpoint(concerns, Order(request=tuple(c.request for c in concerns)))
    asyncio.run(checkpoint.request(tflow.tflow()))
    assert ours.calls == mitm.calls == ["a", "refuser", "c (answered)"]


@pytest.mark.parametrize("asynchronous", [False, True])
def test_an_exception_in_a_step_fails_closed_and_later_steps_still_run(asynchronous):
    log = Log()
    a, bad, audit = log.concern("a"), log.concern("bad", fail=True, asynchronous=asynchronous), \
        log.concern("audit")
    checkpoint = Checkpoint([a, bad, audit], Order(request=(a.request, bad.request,
                                                            audit.request)))
    f = tflow.tflow()
    asyncio.run(checkpoint.request(f))
    assert f.response is not None and f.response.status_code == 500
    assert state(f).decision.action == "error"
    assert state(f).decision_id.encode() in f.response.content
    assert log.calls == ["a", "bad", "audit (answered)"]  # the audit trail records the failure


def test_an_exception_on_a_websocket_message_drops_it():
    class Broken:
        def websocket_message(self, flow):
            raise RuntimeError("bug")

    broken = Broken()
    f = tflow.twebsocketflow()
    checkpoint = Checkpoint([broken], Order(websocket_message=(broken.websocket_message,)))
    asyncio.run(checkpoint.websocket_message(f))
    assert f.websocket.messages[-1].dropped


def test_lifecycle_reaches_the_concerns_in_their_order_and_done_is_awaited():
    calls = []

    class Sync:
        def load(self, loader):
            calls.append(("sync", "load"))

        def configure(self, updated):
            calls.append(("sync", "configure"))

        def running(self):
            calls.append(("sync", "running"))

        def done(self):
            calls.append(("sync", "done"))

    class Draining:
        def configure(self, updated):
            calls.append(("draining", "configure"))

        async def done(self):
            await asyncio.sleep(0.01)
            calls.append(("draining", "done"))

    checkpoint = Checkpoint([Draining(), Sync()], Order())
    checkpoint.load(None)
    checkpoint.configure(set())
    checkpoint.running()
    asyncio.run(checkpoint.done())
    assert calls == [("sync", "load"), ("draining", "configure"), ("sync", "configure"),
                     ("sync", "running"), ("draining", "done"), ("sync", "done")]
    assert not inspect.iscoroutinefunction(Checkpoint.configure)  # mitmproxy calls it in sync
    assert set(LIFECYCLE) == {"load", "configure", "running", "done"}


def json_flow(body: bytes):
    f = tflow.tflow()
    f.request.headers["content-type"] = "application/json"
    f.request.content = body
    return f


def test_a_body_is_parsed_once_for_the_steps_of_its_event(monkeypatch):
    parses = []
    real = protocols.load_json
    monkeypatch.setattr(protocols, "load_json", lambda m, what: parses.append(what) or real(m, what))
    f = json_flow(b'{"messages": [{"role": "user", "content": "hi"}]}')
    state(f)  # a live flow of the gateway
    doc = protocols.document(f, "request")
    assert protocols.document(f, "request") is doc and parses == ["request"]
    doc["messages"][0]["content"] = "edited"
    protocols.write_json(f, "request", doc)  # an edit written back: the next step reads it
    assert protocols.document(f, "request") is doc and parses == ["request"]
    assert json.loads(f.request.content)["messages"][0]["content"] == "edited"
    f.request.content = b'{"other": 1}'  # bytes changed by other means: parsed afresh
    assert protocols.document(f, "request") == {"other": 1} and len(parses) == 2


def test_parsed_bodies_are_let_go_after_the_event():
    f = json_flow(b'{"a": 1}')
    state(f)
    protocols.document(f, "request")
    assert state(f).documents
    asyncio.run(Checkpoint([], Order()).request(f))
    assert not state(f).documents


def test_a_flow_read_back_or_shown_once_decided_keeps_no_parsed_body():
    f = json_flow(b'{"a": 1}')
    assert protocols.document(f, "request") == {"a": 1}
    assert peek(f) is None  # the viewer and the commands do not give it a gateway state
    state(f).audited = True  # a live flow, decided, opened in mitmweb's Douane view
    assert protocols.document(f, "request") == {"a": 1} and not state(f).documents


def test_a_concern_failing_to_stop_does_not_keep_the_next_from_closing():
    closed = []

    class Broken:
        async def done(self):
            raise RuntimeError("bug")

    class Writer:
        def done(self):
            closed.append(True)

    asyncio.run(Checkpoint([Broken(), Writer()], Order()).done())
    assert closed == [True]


def test_an_mcp_listing_is_parsed_once_by_inspection_pins_and_policy(tmp_path, monkeypatch):
    """The real concerns through the real order, in-process: Inspect parses the answer, the tool
    pins and the policy read (and edit) the same document, nothing parses it again."""
    import yaml
    from mitmproxy.addons.proxyserver import Proxyserver

    from douane import config as configmod
    from douane import devissuer

    (tmp_path / "grants.yaml").write_text(yaml.safe_dump({"version": 1, "default": {
        "upstreams": {"crm": {"tools": {"allow": ["lookup"]}}}}}))
    path = tmp_path / "douane.yaml"
    path.write_text(yaml.safe_dump({
        "version": 1, "gateway": {"state_dir": str(tmp_path / "state")},
        "identity": {"dev_issuer": {"enabled": True, "key_file": str(tmp_path / "dev.pem")}},
        "upstreams": {"crm": {"url": "http://crm.internal/mcp", "protocol": "mcp"}},
        "policy": {"files": [str(tmp_path / "grants.yaml")]}}))
    token = devissuer.mint(configmod.load(path, gateway=False).identity.dev_issuer, "alice",
                           ["eng"], 600)
    gateway = load_gateway()
    [checkpoint] = gateway.addons
    from douane import protocols

    parses = []  # every JSON parse of either body, by whatever code (json's or douane's scanner)
    decode, scan = json.JSONDecoder.decode, protocols._decode

    def seen(text: str) -> None:
        parses.extend(side for side, mark in (("request", "tools/list"), ("response", "drop_"))
                      if mark in text)

    def counted(self, text, *args, **kwargs):
        seen(text)
        return decode(self, text, *args, **kwargs)

    def scanned(text):
        seen(text)
        return scan(text)

    monkeypatch.setattr(json.JSONDecoder, "decode", counted)
    monkeypatch.setattr(protocols, "_decode", scanned)
    listing = {"jsonrpc": "2.0", "id": 1, "result": {"tools": [
        {"name": "lookup", "description": "Find a customer", "inputSchema": {"type": "object"}},
        {"name": "drop_tables", "description": "Drop them", "inputSchema": {"type": "object"}}]}}
    with taddons.context(Proxyserver(), checkpoint) as tctx:  # (mitmproxy's body_size_limit)
        tctx.configure(checkpoint, douane_config=str(path))
        f = tflow.tflow(req=tutils.treq(host="crm.internal", port=80, scheme=b"http",
                                        path=b"/mcp", method=b"POST",
                                        content=json.dumps({"jsonrpc": "2.0", "id": 1,
                                                            "method": "tools/list"}).encode()))
        f.request.headers.clear()
        f.request.headers.update({"content-type": "application/json", "accept":
                                  "application/json, text/event-stream",
                                  "authorization": f"Bearer {token}",
                                  "content-length": str(len(f.request.content))})

        async def through() -> None:
            await checkpoint.requestheaders(f)
            await checkpoint.request(f)
            assert f.response is None, f.response and f.response.content
            f.response = tutils.tresp(content=json.dumps(listing).encode())
            f.response.headers["content-type"] = "application/json"
            await checkpoint.responseheaders(f)
            await checkpoint.response(f)

        asyncio.run(through())
    assert parses == ["request", "response"]
    tools = json.loads(f.response.content)["result"]["tools"]
    assert [t["name"] for t in tools] == ["lookup"]  # the policy's edit, on the pins' document
    assert not state(f).documents


def test_an_exception_after_a_refusal_keeps_the_refusal_and_its_reasons():
    """A step failing after another refused the flow leaves that refusal (its status, body and
    reasons) and adds the failure to the decision the audit records."""
    from douane.flowstate import Reason
    from douane.refusals import refuse

    class Refuser:
        def request(self, flow):
            refuse(flow, 403, "denied by policy", "policy_denied", Reason("rule.x", "no"))

    class Broken:
        def request(self, flow):
            raise RuntimeError("bug")

    refuser, broken = Refuser(), Broken()
    checkpoint = Checkpoint([refuser, broken], Order(request=(refuser.request, broken.request)))
    f = tflow.tflow()
    asyncio.run(checkpoint.request(f))
    assert f.response is not None and f.response.status_code == 403
    assert b"policy_denied" in f.response.content
    decision = state(f).decision
    assert decision.action == "refuse"
    assert [r.rule for r in decision.reasons] == ["rule.x", "gateway.error"]


def test_an_exception_on_a_connection_closes_it_and_later_steps_still_run():
    """mitmproxy would log the error and serve the client without what the step sets up (its
    idle and body deadlines): the connection is closed instead (`client.error`)."""
    calls = []

    class Broken:
        def client_connected(self, client):
            raise RuntimeError("bug")

    class After:
        def client_connected(self, client):
            calls.append(client)

    broken, after = Broken(), After()
    checkpoint = Checkpoint([broken, after], Order(client_connected=(broken.client_connected,
                                                                     after.client_connected)))
    client = tflow.tclient_conn()
    checkpoint.client_connected(client)
    assert client.error and "Broken.client_connected failed" in client.error
    assert calls == [client]


@pytest.mark.parametrize("filtered", [False, True])
def test_a_refusal_on_the_upstreams_headers_never_carries_its_body(filtered):
    """mitmproxy reads the upstream's body into the flow's response after responseheaders: a
    refusal given then (a stream filter already attached or not) drops that body and sends its
    own."""
    from douane.refusals import refuse

    f = tflow.tflow()
    f.response = tutils.tresp(content=None)
    if filtered:
        f.response.stream = lambda data: [data]
    refuse(f, 502, "cannot read this stream", "unsupported_stream")
    body = f.response.content
    stream = f.response.stream
    assert callable(stream)
    assert stream(b"data: the upstream's answer\n\n") == []
    assert stream(b"") == body and b"unsupported_stream" in body
