"""A Realtime-style WebSocket upstream and a blocking client, both on wsproto (a mitmproxy
dependency): the upstream records every message it receives and answers each text message with a
`response.output_text.delta` event carrying `reply`."""

from __future__ import annotations

import json
import socket
import socketserver
import threading
from collections.abc import Callable
from typing import Any

from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    RejectConnection,
    Request,
    TextMessage,
)


class RealtimeUpstream:
    def __init__(self) -> None:
        self.received: list[str | bytes] = []
        self.headers: list[dict[str, str]] = []
        self.extensions: list[list[str]] = []  # the extensions each upgrade offered
        self.reply = "Hello over the WebSocket."
        # when set, the event answering each message (given the message), None for no answer
        self.answer: Callable[[str | bytes], dict[str, Any] | None] | None = None
        upstream = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                ws = WSConnection(ConnectionType.SERVER)
                partial: str | bytes = ""  # a message's frames so far (wsproto gives pieces)
                while True:
                    data = self.request.recv(65536)
                    if not data:
                        return
                    ws.receive_data(data)
                    for event in ws.events():
                        if isinstance(event, Request):
                            upstream.headers.append({k.decode().lower(): v.decode()
                                                     for k, v in event.extra_headers})
                            upstream.extensions.append([str(x) for x in event.extensions])
                            self.request.sendall(ws.send(AcceptConnection()))
                        elif isinstance(event, Message):  # answered once whole
                            partial = event.data if not partial else partial + event.data
                            if not event.message_finished:
                                continue
                            upstream.received.append(partial)
                            partial = ""
                            answer = upstream.answer(partial) if upstream.answer else \
                                {"type": "response.output_text.delta", "delta": upstream.reply}
                            if answer is not None:  # None: the upstream says nothing
                                self.request.sendall(ws.send(TextMessage(json.dumps(answer))))
                        elif isinstance(event, CloseConnection):
                            self.request.sendall(ws.send(event.response()))
                            return

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class WsClient:
    """Opens a WebSocket (HTTP/1.1 upgrade) to 127.0.0.1:port and exchanges whole messages."""

    def __init__(self, port: int, path: str, headers: dict[str, str]):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.sock.sendall(self.ws.send(Request(
            host="127.0.0.1", target=path,
            extra_headers=[(k.encode(), v.encode()) for k, v in headers.items()])))
        self.pending: list[Any] = []  # whole messages received
        self.partial: str | bytes = ""
        self.status: int | None = None
        while self.status is None:  # the answer's head may come alone or with its body
            for event in self._events():
                if isinstance(event, AcceptConnection):
                    self.status = 101
                elif isinstance(event, RejectConnection):
                    self.status = event.status_code

    def _events(self) -> list[Any]:
        data = self.sock.recv(65536)
        if not data and self.status is None:
            raise ConnectionError("the proxy closed the connection without answering the upgrade")
        self.ws.receive_data(data or None)
        events = list(self.ws.events())
        for event in events:
            if isinstance(event, Message):
                self.partial = event.data if not self.partial else self.partial + event.data
                if event.message_finished:
                    self.pending.append(self.partial)
                    self.partial = ""
        return events

    def send(self, message: str | bytes) -> None:
        event = TextMessage(message) if isinstance(message, str) else BytesMessage(message)
        self.sock.sendall(self.ws.send(event))

    def receive(self, timeout: float = 5) -> dict[str, Any] | None:
        """The next message as JSON, or None when the peer sends nothing within `timeout`."""
        self.sock.settimeout(timeout)
        try:
            while not self.pending:
                self._events()
        except TimeoutError:
            return None
        return json.loads(self.pending.pop(0))

    def close(self) -> None:
        self.sock.close()
