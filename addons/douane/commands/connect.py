"""`douane connect [--port P]`: a local proxy on 127.0.0.1 that hands every CONNECT (and every
plain-HTTP proxy request) to the gateway with a fresh `Proxy-Authorization: Bearer` from the
session `douane login` keeps, so `HTTPS_PROXY=http://127.0.0.1:P` works for a whole day.

It reads only the request head a client sends a proxy; everything after it (the TLS inside a
tunnel) is copied untouched, never decrypted. The gateway checks a tunnel's token only once, at
CONNECT, and refuses requests in it after the token's expiry; so a tunnel whose token is due for
renewal is closed as soon as it falls quiet after an answer (between requests, judged by the
pause: a stream that pauses long after its first bytes near the token's expiry can be cut), and
the client's next request opens a new tunnel with a fresh token.

Other local users can reach 127.0.0.1 too: the forwarder serves only clients that present its key
(`http://douane:KEY@127.0.0.1:P`, kept in $DOUANE_HOME/connect-key, mode 0600), so nobody else on
the machine borrows this person's identity.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hmac
import os
import re
import secrets
import sys
import time
from contextlib import suppress
from urllib.parse import urlsplit

from douane.commands import add_config_option
from douane.commands.login import add_issuer_option, login_for
from douane.login import FRESH_MARGIN, Login, LoginError, Session, home
from douane.statefile import create_once
from douane.untrusted import loggable

MAX_HEAD = 64 * 1024  # bytes of a request head
MAX_HEADERS = 100
HEAD_SECONDS = 30  # to send a request head, or to reach the gateway
# Quiet after the gateway's last bytes that means "between requests": this long when the token
# falls due for renewal, shrinking to the floor at its expiry (after which the gateway refuses any
# new request in the tunnel, so even a short pause is better taken for the end of an answer).
QUIET_SECONDS = 5.0
QUIET_FLOOR = 0.2
CHUNK = 64 * 1024
MAX_CONNECTIONS = 512  # at once; more are closed at the door
REQUEST_LINE = re.compile(r"([A-Z]{1,16}) ([!-~]{1,8192}) HTTP/1\.[01]")
HOP_BY_HOP = {"proxy-authorization", "proxy-connection", "connection", "keep-alive"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("connect", help="a local proxy that adds a fresh token to each connection "
                       "toward the gateway (HTTPS_PROXY=http://127.0.0.1:PORT)")
    p.add_argument("--port", type=int, default=0, help="local port (default: any free one)")
    p.add_argument("--gateway", default=os.environ.get("DOUANE_GATEWAY") or
                   f"http://127.0.0.1:{os.environ.get('DOUANE_PORT', '8080')}",
                   help="the gateway's proxy URL (default: $DOUANE_GATEWAY, else "
                   "http://127.0.0.1:$DOUANE_PORT or 8080)")
    add_issuer_option(p)
    add_config_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    gateway = urlsplit(args.gateway)
    if gateway.scheme != "http" or not gateway.hostname or gateway.username:
        print("douane: --gateway must be http://HOST:PORT (the gateway's proxy port)",
              file=sys.stderr)
        return 2
    try:
        login = login_for(args)
        login.access_token()  # logged in, and the issuer reachable, before listening
    except LoginError as e:
        print(f"douane: {e}", file=sys.stderr)
        return 1
    home().mkdir(mode=0o700, parents=True, exist_ok=True)
    key = create_once(home() / "connect-key", lambda: secrets.token_urlsafe(24).encode()).decode()
    forwarder = Forwarder(login, gateway.hostname, gateway.port or 80, key)
    with suppress(KeyboardInterrupt):
        asyncio.run(forwarder.serve(args.port))
    return 0


class Forwarder:
    def __init__(self, login: Login, host: str, port: int, key: str) -> None:
        self.login, self.host, self.port = login, host, port
        self.credentials = f"douane:{key}"
        self.connections = 0

    async def serve(self, port: int) -> None:
        server = await asyncio.start_server(self.handle, "127.0.0.1", port, limit=MAX_HEAD)
        bound = server.sockets[0].getsockname()[1]
        print(f"douane: forwarding 127.0.0.1:{bound} to the gateway at "
              f"http://{self.host}:{self.port}\n  export HTTPS_PROXY=http://{self.credentials}"
              f"@127.0.0.1:{bound}", file=sys.stderr, flush=True)
        async with server:
            await server.serve_forever()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.connections >= MAX_CONNECTIONS:
            writer.close()
            return
        self.connections += 1
        try:
            await self._forward(reader, writer)
        finally:
            self.connections -= 1

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream: asyncio.StreamWriter | None = None
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_SECONDS)
            except (asyncio.LimitOverrunError, ValueError):
                return await _answer(writer, 431, "the request head is too large")
            except (asyncio.IncompleteReadError, TimeoutError):
                return None
            parsed = _parse(head)
            if parsed is None:
                return await _answer(writer, 400, "not an HTTP/1 proxy request")
            request_line, headers = parsed
            if not self._authorized(headers):
                return await _answer(writer, 407, "use the proxy URL `douane connect` printed")
            tunnel = request_line.startswith("CONNECT ")
            try:
                session = await asyncio.to_thread(self.login.access_token)
            except LoginError as e:
                print(f"douane: {e}", file=sys.stderr, flush=True)
                return await _answer(writer, 502, "douane connect has no fresh token: "
                                     "run `douane login`")
            try:
                up_reader, upstream = await asyncio.wait_for(
                    asyncio.open_connection(self.host, self.port, limit=MAX_HEAD), HEAD_SECONDS)
            except (OSError, TimeoutError) as e:
                print(f"douane: cannot reach the gateway: {loggable(e)}", file=sys.stderr)
                return await _answer(writer, 502, "cannot reach the gateway")
            lines = [request_line, *(f"{n}: {v}" for n, v in headers
                                     if n.lower() not in HOP_BY_HOP),
                     f"Proxy-Authorization: Bearer {session.access_token}"]
            if not tunnel:
                lines.append("Connection: close")  # the next request comes with its own token
            upstream.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
            await _relay(reader, writer, up_reader, upstream, session if tunnel else None)
        except (ConnectionError, OSError):
            pass
        finally:
            for w in (writer, upstream):
                if w is not None:
                    w.close()


    def _authorized(self, headers: list[tuple[str, str]]) -> bool:
        given = [v for n, v in headers if n.lower() == "proxy-authorization"]
        scheme, _, value = given[0].partition(" ") if len(given) == 1 else ("", "", "")
        try:
            presented = base64.b64decode(value.strip(), validate=True)
        except ValueError:
            return False
        return scheme.lower() == "basic" and hmac.compare_digest(presented,
                                                                 self.credentials.encode())


def _parse(head: bytes) -> tuple[str, list[tuple[str, str]]] | None:
    """The request line and header fields of a proxy request head, or None when it is not one."""
    lines = head.decode("latin-1").split("\r\n")[:-2]
    if not lines or not REQUEST_LINE.fullmatch(lines[0]) or len(lines) - 1 > MAX_HEADERS:
        return None
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name) or \
                re.search(r"[\x00-\x08\x0a-\x1f\x7f]", value):
            return None  # no obs-fold, no bare CR/LF, no control characters
        headers.append((name, value.strip()))
    return lines[0], headers


async def _answer(writer: asyncio.StreamWriter, status: int, text: str) -> None:
    reason = {400: "Bad Request", 407: "Proxy Authentication Required",
              431: "Request Header Fields Too Large", 502: "Bad Gateway"}
    body = f"douane connect: {text}\n".encode()
    challenge = 'proxy-authenticate: Basic realm="douane connect"\r\n' if status == 407 else ""
    writer.write(f"HTTP/1.1 {status} {reason[status]}\r\ncontent-type: text/plain\r\n{challenge}"
                 f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode() + body)
    await writer.drain()


class _Quiet:
    """When the gateway last sent bytes, and whether the client has spoken since."""

    def __init__(self) -> None:
        self.last = time.monotonic()
        self.answered = False  # the last bytes came from the gateway


async def _relay(client_reader: asyncio.StreamReader, client: asyncio.StreamWriter,
                 gateway_reader: asyncio.StreamReader, gateway: asyncio.StreamWriter,
                 session: Session | None) -> None:
    """Copy both ways until either side closes; a tunnel (`session`) also ends when its token
    is due for renewal and it is quiet between requests."""
    quiet = _Quiet()

    async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter, answer: bool) -> None:
        while data := await src.read(CHUNK):
            dst.write(data)
            await dst.drain()
            quiet.last, quiet.answered = time.monotonic(), answer

    tasks = [asyncio.ensure_future(copy(client_reader, gateway, False)),
             asyncio.ensure_future(copy(gateway_reader, client, True))]
    if session is not None:
        tasks.append(asyncio.ensure_future(_until_renewal(quiet, session)))
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _until_renewal(quiet: _Quiet, session: Session) -> None:
    window = min(FRESH_MARGIN, session.lifetime / 2)
    await asyncio.sleep(max(0.0, session.expires_at - window - time.time()))
    while True:
        left = max(0.0, session.expires_at - time.time())
        pause = max(QUIET_FLOOR, QUIET_SECONDS * left / window)
        if quiet.answered and time.monotonic() - quiet.last >= pause:
            return
        await asyncio.sleep(0.1)
