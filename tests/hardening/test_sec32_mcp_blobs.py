"""Security, stop 32: an MCP blob typed `application/octet-stream` (or untyped binary) carrying
UTF-16 or UTF-32 text was no text to douane: with a byte-order mark its bytes are not UTF-8 (read
as binary, passed unread: 4 deny cases and 2 masking cases fail on 0ba8e27); without one, ASCII
in UTF-16 is valid UTF-8 with a zero byte between its letters (the deny rules' normalisation
dropped the zeros, masking did not: a name and an e-mail address left unmasked). The client's
model reads it all the same. Such a blob is now read as the text it decodes to (`fields._wide`: every
character printable or white space), so the deny rules and masking read it; a blob that is
neither text nor media still passes as binary. Through a real gateway onto a misbehaving MCP
server (and masking's workers)."""

from __future__ import annotations

import base64
import json
import random

import pytest

from douane.protocols import fields
from tests.hardening.test_mcp_side_doors import (  # noqa: F401
    HEADERS,
    call,
    client,
    rules,
    setup,
    sse,
)

PHRASE = "The plan is Project Nightingale."
PII = "Reach John Smith at john.smith@example.com"
ENCODINGS = ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le"]


def blob(text: str, encoding: str, mime: str = "application/octet-stream") -> dict:
    return {"content": [{"type": "resource", "resource": {
        "uri": "file:///notes.bin", "mimeType": mime,
        "blob": base64.b64encode(text.encode(encoding)).decode()}}]}


def answer(evil, result: dict, streamed: bool = False) -> None:
    message = {"jsonrpc": "2.0", "id": 1, "result": result}
    evil.canned["/rpc"] = sse(message) if streamed else ("application/json",
                                                         json.dumps(message).encode())


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("mime", ["application/octet-stream", "application/x-custom"])
def test_the_denied_phrase_in_a_wide_text_blob_is_blocked(setup, encoding, mime):  # noqa: F811
    """Before (0ba8e27): 200, the blob delivered as sent."""
    gw, _, evil, staff = setup
    answer(evil, blob(PHRASE, encoding, mime))
    with client(gw, staff) as c:
        resp = c.post(evil.url + "/rpc", headers=HEADERS, json=call("echo", 1, text="a"))
    assert base64.b64encode(PHRASE.encode(encoding)).decode() not in resp.text
    assert "blocked by policy" in resp.text, resp.text[:300]
    decision_id = resp.headers["x-douane-decision-id"]
    assert decision_id in resp.text
    record = gw.audit_record(decision_id)
    assert record["action"] == "block" and rules(record) == ["deny.codename"], record


@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le"])
def test_pii_in_a_wide_text_blob_is_not_delivered(setup, encoding, streamed):  # noqa: F811
    """Masking cannot edit a value inside base64: the answer is refused, the stream cut."""
    gw, _, evil, staff = setup
    answer(evil, blob(PII, encoding), streamed)
    with client(gw, staff) as c:
        resp = c.post(evil.url + "/rpc", headers=HEADERS, json=call("echo", 1, text="a"))
    assert base64.b64encode(PII.encode(encoding)).decode() not in resp.text
    record = gw.audit_record(resp.headers["x-douane-decision-id"])
    assert rules(record) == ["protocol.stream_ended" if streamed else "mask.file"], record


def test_a_binary_blob_still_passes(setup):  # noqa: F811
    """A zip's bytes are neither text nor media: delivered (douane reads no archive)."""
    gw, _, evil, staff = setup
    data = bytes.fromhex("504b0304140000000800") + bytes(range(256)) * 4
    evil.canned["/rpc"] = ("application/json", json.dumps({"jsonrpc": "2.0", "id": 1, "result": {
        "content": [{"type": "resource", "resource": {"uri": "file:///a.zip",
                                                      "mimeType": "application/zip",
                                                      "blob": base64.b64encode(data).decode()}}]}}
    ).encode())
    with client(gw, staff) as c:
        resp = c.post(evil.url + "/rpc", headers=HEADERS, json=call("echo", 1, text="a"))
    assert resp.status_code == 200 and base64.b64encode(data).decode() in resp.text, resp.text[:300]


@pytest.mark.parametrize("size", [64, 512, 4096])
def test_random_bytes_are_rarely_read_as_wide_text(size):
    """Random bytes of 64 or more almost never decode to printable UTF-16/32 (an unpaired
    surrogate, an unassigned or control character): binary stays binary."""
    rng = random.Random(size)
    read = sum(fields._wide(rng.randbytes(size)) is not None for _ in range(500))
    assert read <= 5, read
