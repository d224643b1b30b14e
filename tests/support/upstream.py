"""A local upstream that speaks the OpenAI and Anthropic wire formats, streaming included.

It records every request it receives, so tests can assert what reached it (and what did not).
"""

from __future__ import annotations

import itertools
import json
import re
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

DEFAULT_REPLY = "Hello from the fake upstream."


@dataclass
class ReceivedRequest:
    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def _openai_chat(model: str, text: str) -> dict[str, Any]:
    return {"id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                                         "message": {"role": "assistant", "content": text,
                                                     "refusal": None}}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}}


# a stored object read, changed or deleted by id: `/v1/conversations/{id}[/items[/{item}]]`,
# `/v1/responses/{id}[/input_items]`, `/v1/chat/completions/{id}[/messages]`
STORED = re.compile(r"/(conversations|responses|chat/completions)/([^/]+)(/[^/]+)?")


def _conversation(conversation_id: str) -> dict[str, Any]:
    return {"id": conversation_id, "object": "conversation", "created_at": int(time.time()),
            "metadata": {}}


def _stored(method: str, stored: re.Match[str], model: str, text: str) -> dict[str, Any]:
    kind, object_id, below = stored.groups()
    if below in ("/items", "/input_items", "/messages") and method == "GET":
        return {"object": "list", "data": [], "first_id": None, "last_id": None,
                "has_more": False}
    if method == "DELETE":
        return {"id": object_id, "object": f"{kind}.deleted", "deleted": True}
    if kind == "conversations":
        return _conversation(object_id)
    if kind == "responses":
        return {**_responses(model, text), "id": object_id}
    return {**_openai_chat(model, text), "id": object_id}


def _openai_chat_events(model: str, pieces: list[str]) -> list[str]:
    base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0, "model": model}
    events = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                    "finish_reason": None}]}]
    events += [{**base, "choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]}
               for p in pieces]
    events.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    return [f"data: {json.dumps(e)}\n\n" for e in events] + ["data: [DONE]\n\n"]


def _responses(model: str, text: str) -> dict[str, Any]:
    return {"id": "resp_fake", "object": "response", "created_at": int(time.time()),
            "status": "completed", "model": model,
            "output": [{"id": "msg_fake", "type": "message", "role": "assistant",
                        "status": "completed",
                        "content": [{"type": "output_text", "text": text, "annotations": []}]}],
            "usage": {"input_tokens": 5, "output_tokens": 7, "total_tokens": 12}}


def _responses_events(model: str, pieces: list[str]) -> list[str]:
    text = "".join(pieces)
    out = [("response.created", {"response": {**_responses(model, ""), "status": "in_progress",
                                              "output": []}}),
           ("response.output_item.added", {"output_index": 0, "item": {
               "id": "msg_fake", "type": "message", "role": "assistant", "status": "in_progress",
               "content": []}}),
           ("response.content_part.added", {"item_id": "msg_fake", "output_index": 0,
                                            "content_index": 0, "part": {
                                                "type": "output_text", "text": "",
                                                "annotations": []}})]
    out += [("response.output_text.delta", {"item_id": "msg_fake", "output_index": 0,
                                            "content_index": 0, "delta": p}) for p in pieces]
    out += [("response.output_text.done", {"item_id": "msg_fake", "output_index": 0,
                                           "content_index": 0, "text": text}),
            ("response.completed", {"response": _responses(model, text)})]
    return [f"event: {name}\ndata: {json.dumps({'type': name, 'sequence_number': i, **data})}\n\n"
            for i, (name, data) in enumerate(out)]


def _anthropic(model: str, text: str) -> dict[str, Any]:
    return {"id": "msg_fake", "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
            "stop_sequence": None, "usage": {"input_tokens": 5, "output_tokens": 7}}


def _anthropic_events(model: str, pieces: list[str]) -> list[str]:
    start = _anthropic(model, "")
    start["content"] = []
    out = [("message_start", {"message": start}),
           ("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})]
    out += [("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": p}})
            for p in pieces]
    out += [("content_block_stop", {"index": 0}),
            ("message_delta", {"delta": {"stop_reason": "end_turn", "stop_sequence": None},
                               "usage": {"output_tokens": 7}}),
            ("message_stop", {})]
    return [f"event: {name}\ndata: {json.dumps({'type': name, **data})}\n\n"
            for name, data in out]


def anthropic_stream(message: dict[str, Any], split: Callable[[str], list[str]]) -> list[str]:
    """A whole Messages answer as Anthropic streams it, block by block: a text block's citations
    (`citations_delta`) then its text, a thinking block's thinking then its signature, a tool's
    input JSON, each text in `split` pieces; other blocks (redacted thinking, server tool
    results) whole in their start event."""
    out = [("message_start", {"message": {**message, "content": [], "stop_reason": None}})]
    for i, block in enumerate(message["content"]):
        head, deltas = block, []
        if block["type"] == "text":
            head = {"type": "text", "text": "", **({"citations": []} if "citations" in block
                                                   else {})}
            deltas = [{"type": "citations_delta", "citation": c}
                      for c in block.get("citations") or []]
            deltas += [{"type": "text_delta", "text": p} for p in split(block["text"])]
        elif block["type"] == "thinking":
            head = {"type": "thinking", "thinking": "", "signature": ""}
            deltas = [{"type": "thinking_delta", "thinking": p} for p in split(block["thinking"])]
            deltas.append({"type": "signature_delta", "signature": block["signature"]})
        elif block["type"] in ("tool_use", "server_tool_use"):
            head = {**block, "input": {}}
            deltas = [{"type": "input_json_delta", "partial_json": p}
                      for p in split(json.dumps(block["input"]))]
        out.append(("content_block_start", {"index": i, "content_block": head}))
        out += [("content_block_delta", {"index": i, "delta": d}) for d in deltas]
        out.append(("content_block_stop", {"index": i}))
    out += [("message_delta", {"delta": {"stop_reason": message.get("stop_reason") or "end_turn",
                                         "stop_sequence": None}, "usage": {"output_tokens": 7}}),
            ("message_stop", {})]
    return [f"event: {name}\ndata: {json.dumps({'type': name, **data})}\n\n"
            for name, data in out]


def responses_stream(response: dict[str, Any], split: Callable[[str], list[str]]) -> list[str]:
    """A whole Responses answer as the API streams it, item by item: each message part's text
    (or refusal), reasoning summaries and function call arguments in `split` pieces, then
    `response.completed` with the whole answer."""
    out: list[tuple[str, dict]] = [("response.created", {"response": {
        **response, "status": "in_progress", "output": []}})]
    for o, item in enumerate(response["output"]):
        ids = {"item_id": item["id"], "output_index": o}
        empty = {"message": {"content": []}, "function_call": {"arguments": ""},
                 "reasoning": {"summary": []}}.get(item["type"], {})
        out.append(("response.output_item.added", {"output_index": o, "item": {
            **item, "status": "in_progress", **empty}}))
        if item["type"] == "function_call":
            out += [("response.function_call_arguments.delta", {**ids, "delta": p})
                    for p in split(item["arguments"])]
            out.append(("response.function_call_arguments.done",
                        {**ids, "arguments": item["arguments"]}))
        for c, part in enumerate(item.get("content") or [] if item["type"] == "message" else []):
            field = "refusal" if part["type"] == "refusal" else "text"
            at = {**ids, "content_index": c}
            out.append(("response.content_part.added", {**at, "part": {**part, field: ""}}))
            out += [(f"response.{part['type']}.delta", {**at, "delta": p})
                    for p in split(part[field])]
            out.append((f"response.{part['type']}.done", {**at, field: part[field]}))
            out.append(("response.content_part.done", {**at, "part": part}))
        for n, part in enumerate(item.get("summary") or []):
            at = {**ids, "summary_index": n}
            out.append(("response.reasoning_summary_part.added",
                        {**at, "part": {**part, "text": ""}}))
            out += [("response.reasoning_summary_text.delta", {**at, "delta": p})
                    for p in split(part["text"])]
            out.append(("response.reasoning_summary_text.done", {**at, "text": part["text"]}))
            out.append(("response.reasoning_summary_part.done", {**at, "part": part}))
        out.append(("response.output_item.done", {"output_index": o, "item": item}))
    out.append(("response.completed", {"response": response}))
    return [f"event: {name}\ndata: {json.dumps({'type': name, 'sequence_number': i, **data})}\n\n"
            for i, (name, data) in enumerate(out)]


class Gate:
    """Holds a stream after its `after`-th event (1-based) until the test opens it: "the client
    read X before the upstream sent the rest" holds or fails on the order of events, whatever the
    machine's load (a fixed pace made it a race against the host). A gateway that holds the stream
    back never lets the client open the gate: the upstream goes on after `timeout` and `late`
    says so."""

    def __init__(self, after: int, timeout: float = 30) -> None:
        self.after, self.timeout = after, timeout
        self.reached = threading.Event()  # the stream sent its `after` events and waits
        self._open = threading.Event()
        self.late = False

    def open(self) -> None:
        self._open.set()

    def hold(self) -> None:
        self.reached.set()
        if not self._open.wait(self.timeout):
            self.late = True


def _pieces(text: str, size: int | Sequence[int]) -> list[str]:
    """`text` in pieces of `size` characters (or of each size in turn)."""
    sizes, out, i = itertools.cycle([size] if isinstance(size, int) else size), [], 0
    while i < len(text):
        n = next(sizes)
        out.append(text[i:i + n])
        i += n
    return out or [""]


class FakeUpstream:
    """Threaded HTTP(S) server on 127.0.0.1.

    Routes: POST /v1/chat/completions, /v1/responses (OpenAI), /v1/messages (Anthropic), JSON or
    SSE when the body asks `stream: true`; GET /v1/models lists one model owned by `reply`;
    POST /v1/conversations issues `conv_fake`; a stored conversation (its items), response (its
    input items) or chat completion (its messages) is read, changed or deleted by any id.
    `reply` sets the answer text, `chunk_size` (or sizes used in turn) and `chunk_delay` pace
    streams, `gate` holds one part way; `document`, when set, is the whole answer of /v1/messages or /v1/responses (blocks,
    parts, items of any kind), streamed from it as the API does (`anthropic_stream`,
    `responses_stream`). `canned[path] = (content type, body)` answers that path (any method) with exactly
    that body: a misbehaving server. Anything else answers 404 in OpenAI's error shape. `answer`,
    when set, writes the whole answer itself, headers too (odd framing or encodings):
    answer(handler, request document).
    """

    def __init__(self, tls: bool = False) -> None:
        self.requests: list[ReceivedRequest] = []
        self.reply = DEFAULT_REPLY
        self.chunk_size: int | Sequence[int] = 4
        self.chunk_delay = 0.0
        self.gate: Gate | None = None  # holds the next stream part way (Gate)
        self.stream_ends: list[float] = []  # time.monotonic() when each stream's last byte left
        self.canned: dict[str, tuple[str, bytes]] = {}
        self.document: dict[str, Any] | None = None
        self.answer: Callable[[BaseHTTPRequestHandler, Any], None] | None = None
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                self._handle()

            def do_POST(self) -> None:
                self._handle()

            # recorded like the others: a refusal test must see anything that got through
            do_DELETE = do_PUT = do_PATCH = do_OPTIONS = do_HEAD = do_POST

            def _handle(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                upstream.requests.append(ReceivedRequest(
                    self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                try:
                    req = json.loads(body) if body else {}
                except ValueError:
                    req = {}
                if upstream.answer is not None:
                    upstream.answer(self, req)
                    return
                model = req.get("model", "fake-model") if isinstance(req, dict) else "fake-model"
                stream = isinstance(req, dict) and req.get("stream") is True
                path = self.path.split("?")[0]
                pieces = _pieces(upstream.reply, upstream.chunk_size)
                if path in upstream.canned:
                    ctype, data = upstream.canned[path]
                    self.send_response(200)
                    self.send_header("content-type", ctype)
                    self.send_header("transfer-encoding", "chunked")
                    self.end_headers()
                    self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data))
                elif upstream.document is not None and path.endswith(("/messages", "/responses")):
                    doc = upstream.document
                    events = anthropic_stream if path.endswith("/messages") else responses_stream
                    self._answer(stream, doc, lambda: events(
                        doc, lambda text: _pieces(text, upstream.chunk_size)))
                elif path.endswith("/chat/completions"):
                    self._answer(stream, _openai_chat(model, upstream.reply),
                                 lambda: _openai_chat_events(model, pieces))
                elif path.endswith("/responses"):
                    self._answer(stream, _responses(model, upstream.reply),
                                 lambda: _responses_events(model, pieces))
                elif path.endswith("/messages"):
                    self._answer(stream, _anthropic(model, upstream.reply),
                                 lambda: _anthropic_events(model, pieces))
                elif self.command == "GET" and path.endswith("/models"):
                    self._json(200, {"object": "list", "data": [
                        {"id": model, "object": "model", "owned_by": upstream.reply}]})
                elif self.command == "POST" and path.endswith("/conversations"):
                    self._json(200, _conversation("conv_fake"))
                elif stored := STORED.search(path):
                    self._json(200, _stored(self.command, stored, model, upstream.reply))
                else:
                    self._json(404, {"error": {"message": f"no route {path}",
                                               "type": "invalid_request_error"}})

            def _answer(self, stream: bool, doc: dict, events) -> None:
                if not stream:
                    self._json(200, doc)
                    return
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("cache-control", "no-cache")
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                gate, upstream.gate = upstream.gate, None  # this stream's, once
                for n, event in enumerate(events(), 1):
                    data = event.encode()
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                    self.wfile.flush()
                    if gate and n == gate.after:
                        gate.hold()
                    if upstream.chunk_delay:
                        time.sleep(upstream.chunk_delay)
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
                upstream.stream_ends.append(time.monotonic())

            def _json(self, status: int, doc: dict) -> None:
                data = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.scheme = "https" if tls else "http"
        if tls:
            self.server.socket = _tls_context().wrap_socket(self.server.socket, server_side=True)
        self.url = f"{self.scheme}://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def received_bytes(self) -> bytes:
        """Everything the upstream received, headers and bodies, for leak checks."""
        return b"\n".join(
            json.dumps(r.headers).encode() + b"\n" + r.body for r in self.requests)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Server(ThreadingHTTPServer):
    # one thread accepts (and shakes hands over TLS): with the default backlog of 5, connections
    # opened together past it wait for a SYN retry (1 s, then 3 s)
    request_queue_size = 64


def _tls_context() -> ssl.SSLContext:
    """A self-signed certificate for 127.0.0.1 (mitmdump runs with ssl_insecure in TLS tests)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    folder = Path(tempfile.mkdtemp(prefix="douane-upstream-tls-"))
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    return context
