"""Security, stop 33: a refusal quoted the client's value it refused whole: a 30 KB Content-Type
came back in the 415's body, a 30 KB path in the 403 for an undeclared upstream, and a control
character in either reached the terminal that printed the error. A refusal now quotes at most
`untrusted.ECHO_CHARS` (a host and path `routing.HOST_CHARS`) of such a value, escaped, and any
message at most `refusals.MESSAGE_CHARS`, escaped. Through a real gateway (raw HTTP/1.1: no
client sends a control character in a header)."""

from __future__ import annotations

import json
import socket
from urllib.parse import urlsplit

import pytest

from douane.refusals import MESSAGE_CHARS, bounded
from douane.routing import HOST_CHARS
from douane.untrusted import ECHO_CHARS
from tests.hardening.conftest import assert_refused, reverse_gateway

HUGE = 30_000
BODY = json.dumps({"model": "gpt-4o-mini", "max_tokens": 5,
                   "messages": [{"role": "user", "content": "hi"}]}).encode()


@pytest.fixture(scope="module")
def gw(issuer, llm, tmp_path_factory):
    from tests.hardening.conftest import POLICY
    with reverse_gateway(issuer, llm, tmp_path_factory.mktemp("sec33echo"), POLICY) as g:
        yield g


@pytest.fixture(scope="module")
def token(issuer, secrets):
    token = issuer.mint("echo@corp.example", ["engineering"])
    secrets.add(token)
    return token


class Answer:
    def __init__(self, raw: bytes):
        head, _, self.content = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status_code = int(lines[0].split()[1])
        self.headers = {k.lower(): v.strip() for k, _, v in
                        (line.partition(":") for line in lines[1:])}
        self.text = self.content.decode("utf-8", "replace")

    def message(self) -> str:
        return json.loads(self.content)["error"]["message"]


def send(gw, target: str, headers: dict[str, bytes], body: bytes = BODY) -> Answer:
    """One HTTP/1.1 request written as given (header values as raw bytes)."""
    url = urlsplit(gw.url)
    lines = [f"POST {target} HTTP/1.1".encode(), f"host: {url.netloc}".encode(),
             b"content-length: %d" % len(body), b"connection: close",
             *(k.encode() + b": " + v for k, v in headers.items())]
    with socket.create_connection((url.hostname, url.port), timeout=60) as s:
        s.sendall(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        chunks = []
        while data := s.recv(65536):
            chunks.append(data)
    return Answer(b"".join(chunks))


def assert_bounded(message: str, value: str, most: int) -> None:
    assert len(message) < most + 200, len(message)
    assert value[:most + 1] not in message  # cut where quoted
    assert not any(c < " " or "\x7f" <= c <= "\x9f" for c in message), message


@pytest.mark.parametrize("ctype", ["text/x-" + "a" * HUGE,
                                   "text/" + "\x1b[31m" * (HUGE // 5)])
def test_a_huge_content_type_is_cut_and_escaped_in_the_415(gw, llm, token, ctype):
    """Before: the 415 quoted all 30,000 characters (the escape codes raw once decoded)."""
    before = len(llm.requests)
    resp = send(gw, "/v1/chat/completions", {"authorization": f"Bearer {token}".encode(),
                                             "content-type": ctype.encode()})
    assert_refused(gw, llm, before, resp, 415)
    message = resp.message()
    assert_bounded(message, ctype, ECHO_CHARS)
    assert f"({len(ctype)} characters)" in message, message


def test_a_control_character_in_a_content_type_is_escaped(gw, llm, token):
    before = len(llm.requests)
    resp = send(gw, "/v1/chat/completions", {"authorization": f"Bearer {token}".encode(),
                                             "content-type": b"text/\x1b[2Jred"})
    assert_refused(gw, llm, before, resp, 415)
    assert "\x1b" not in resp.message() and "\\x1b[2jred" in resp.message()


def test_a_huge_path_to_no_upstream_is_cut_in_the_403(gw, llm, token):
    """Before: the 403 quoted the whole 30,000-character path."""
    before = len(llm.requests)
    path = "/nowhere/" + "b" * HUGE
    resp = send(gw, path, {"authorization": f"Bearer {token}".encode(),
                           "content-type": b"application/json"})
    assert_refused(gw, llm, before, resp, 403)
    assert_bounded(resp.message(), path, HOST_CHARS)


def test_any_message_is_bounded_and_escaped():
    """The backstop for a value quoted where no cut was made."""
    message = bounded("why: " + "\x1b" * 10 * MESSAGE_CHARS)
    assert len(message) < 5 * MESSAGE_CHARS and "\x1b" not in message
