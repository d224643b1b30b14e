"""Red team, stop 31: bodies the recording writer read another way than the gateway did, so a key
the policy refused reached the recording as sent. Through a real gateway with recording: the
request is refused before the upstream, then its recording must hold no part of the key (in any
encoding), only `<SECRET:…>` where it was."""

from __future__ import annotations

import gzip
import json
import time

import httpx
import pytest
from mitmproxy.test import tflow

from douane.protocols import decoding
from douane.recording import writer
from tests.hardening.conftest import assert_refused, recording_gateway
from tests.hardening.test_evasion import _recordings, chat
from tests.test_websocket_e2e import connect, item, realtime_gateway

KEY = "sk-proj-" + "Jd6pXs3Nq9Rf" * 3
ENCODINGS = ("utf-8", "utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be")


@pytest.fixture(scope="module")
def gw(issuer, llm, tmp_path_factory):
    with recording_gateway(issuer, llm, tmp_path_factory.mktemp("redteam31_record")) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def token(issuer, secrets):
    token = issuer.mint("rowan@corp.example", ["engineering"])
    secrets.add(token)
    return token


def _recorded(gw, tag: str) -> bytes:
    """Every recording's bytes once one holds `tag` (in any of ENCODINGS: the body is recorded
    as sent, or re-encoded once redacted)."""
    deadline = time.monotonic() + 30
    while True:
        data = b"".join(p.read_bytes() for p in _recordings(gw))
        if any(tag.encode(e) in data for e in ENCODINGS):
            return data
        assert time.monotonic() < deadline, f"{tag!r} was not recorded"
        time.sleep(0.2)


def _assert_no_key(data: bytes) -> None:
    for encoding in ENCODINGS:
        assert KEY[8:].encode(encoding) not in data, f"the key is recorded in {encoding}"


def _in_utf(encoding: str, bom: bytes = b"") -> callable:
    return lambda tag: bom + json.dumps(chat(f"{tag} deploy with {KEY} now"),
                                        ensure_ascii=False).encode(encoding)


# JSON in UTF-16 or UTF-32 (read so by the gateway, RFC 8259's detection): the writer read it as
# UTF-8, where the key is NUL-interleaved, and recorded it as sent
UTF = {
    "UTF-16 with its BOM": _in_utf("utf-16"),
    "UTF-16LE without a BOM": _in_utf("utf-16-le"),
    "UTF-16BE with a BOM": _in_utf("utf-16-be", b"\xfe\xff"),
    "UTF-32 with its BOM": _in_utf("utf-32"),
    "UTF-32BE without a BOM": _in_utf("utf-32-be"),
    # a lone surrogate code unit in a string (valid JSON `\ud800`, read so by the gateway):
    # strict UTF-16 decoding failed, and the writer fell back to UTF-8
    "UTF-16LE holding a lone surrogate": lambda tag: json.dumps(
        chat(f"{tag} \ud800 deploy with {KEY} now"), ensure_ascii=False).encode(
            "utf-16-le", "surrogatepass"),
}


@pytest.mark.parametrize("case", list(UTF))
def test_a_key_in_a_utf16_or_utf32_body_is_in_no_recording(case, gw, llm, token, secrets):
    """Before: 403, and the recording held the key as sent (UTF-16 both ways)."""
    secrets.add(KEY)
    tag = f"rt31-utf-{list(UTF).index(case)}"
    before = len(llm.requests)
    resp = httpx.post(gw.url + "/v1/chat/completions", content=UTF[case](tag),
                      headers={"authorization": f"Bearer {token}",
                               "content-type": "application/json"})
    record = assert_refused(gw, llm, before, resp, 403)
    assert record["reasons"][0]["rule"] == "detector.secret.api_key", record
    _assert_no_key(_recorded(gw, tag))


# Not JSON, though typed so: refused 400 unread, recorded as sent. The writer read only the
# string literals of a JSON-typed body, and the key sits outside every one.
MALFORMED = {
    "a bare word": '{"model": "gpt-4o", "note": "%s", %s}',
    "a raw newline in a string": '{"model": "gpt-4o", "messages": [{"role": "user", '
    '"content": "%s %s\n"}]}',
    "an unterminated string": '{"model": "gpt-4o", "messages": [{"role": "user", '
    '"content": "%s %s',
    "a comment": '{"model": "gpt-4o", "note": "%s", /* %s */ "messages": []}',
    "after the document": '{"model": "gpt-4o", "note": "%s", "messages": []} %s',
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_key_in_a_body_that_is_not_json_is_in_no_recording(case, gw, llm, token, secrets):
    """Before: 400 `invalid_json`, and the recording held the key (all 5 cases)."""
    secrets.add(KEY)
    tag = f"rt31-malformed-{list(MALFORMED).index(case)}"
    before = len(llm.requests)
    resp = httpx.post(gw.url + "/v1/chat/completions",
                      content=(MALFORMED[case] % (tag, KEY)).encode(),
                      headers={"authorization": f"Bearer {token}",
                               "content-type": "application/json"})
    assert_refused(gw, llm, before, resp, 400)
    data = _recorded(gw, tag)
    _assert_no_key(data)
    assert b"<SECRET:" in data


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", None])
def test_a_key_in_a_utf16_body_of_another_type_is_in_no_recording(ctype, gw, llm, token,
                                                                  secrets):
    """Not JSON: refused unread (415), recorded; without a byte order mark or a charset the
    writer read it as UTF-8 (before: the key recorded in UTF-16 for all three)."""
    secrets.add(KEY)
    tag = f"rt31-plain-{ctype}"
    before = len(llm.requests)
    headers = {"authorization": f"Bearer {token}", **({"content-type": ctype} if ctype else {})}
    resp = httpx.post(gw.url + "/v1/chat/completions", headers=headers,
                      content=f"{tag} deploy with {KEY} now".encode("utf-16-le"))
    assert_refused(gw, llm, before, resp, 415)
    _assert_no_key(_recorded(gw, tag))


def test_clean_bodies_are_recorded_as_sent(gw, llm, token):
    """A clean UTF-16 request and a clean malformed one keep their bytes."""
    utf16 = json.dumps(chat("rt31-clean-utf16 how are you")).encode("utf-16")
    resp = httpx.post(gw.url + "/v1/chat/completions", content=utf16,
                      headers={"authorization": f"Bearer {token}",
                               "content-type": "application/json"})
    assert resp.status_code == 200, resp.text
    malformed = b'{"model": "gpt-4o", "note": "rt31-clean-malformed", oops}'
    resp = httpx.post(gw.url + "/v1/chat/completions", content=malformed,
                      headers={"authorization": f"Bearer {token}",
                               "content-type": "application/json"})
    assert resp.status_code == 400, resp.text
    data = _recorded(gw, "rt31-clean-malformed")
    assert utf16 in _recorded(gw, "rt31-clean-utf16") and malformed in data


@pytest.fixture(scope="module")
def realtime(issuer, tmp_path_factory):
    yield from realtime_gateway(issuer, tmp_path_factory.mktemp("redteam31_ws"), recording={})


def test_a_key_in_a_binary_websocket_message_is_in_no_recording(realtime, issuer, secrets):
    """A binary message is refused unread (the session's error event, nothing upstream), and was
    recorded as sent: the writer redacted text messages only."""
    gw, upstream = realtime
    token = issuer.mint("wren@corp.example", ["engineering"])
    secrets.update({token, KEY})
    client = connect(gw, token)
    assert client.status == 101
    client.send(item("rt31-ws hello"))
    assert client.receive()["delta"] == upstream.reply
    before = len(upstream.received)
    client.send(f"rt31-ws-binary deploy with {KEY}".encode())
    error = client.receive()
    assert error is not None and error["type"] == "error", error
    assert len(upstream.received) == before
    client.close()
    data = _recorded(gw, "rt31-ws-binary")
    _assert_no_key(data)
    assert b"rt31-ws-binary deploy with <SECRET:detector.secret.api_key>" in data


def test_a_compressed_request_refused_unread_is_inflated_within_a_bound(monkeypatch):
    """The gateway decodes what it reads and drops the encoding: a request body still compressed
    in the writer was refused unread, and was inflated up to 64 MB there (200 KB of gzip: 222 ms
    of the writer process per request, five times the gateway's own refusal; the writer falling
    behind makes the gateway answer everyone 503). In-process: what the writer decodes is
    bounded by UNREAD_LIMIT, and a bomb's body is not kept."""
    limits: list[int] = []
    decode = decoding.decode_body
    monkeypatch.setattr(decoding, "decode_body",
                        lambda message, limit: limits.append(limit) or decode(message, limit))
    f = tflow.tflow(resp=True)
    f.request.headers.update({"content-type": "application/json", "content-encoding": "gzip"})
    f.request.raw_content = gzip.compress(b'{"a": "' + b"x" * (8 * 1024**2) + b'"}')
    recorded = writer.recording_of(f.get_state(), frozenset())
    assert limits and max(limits) <= 1024**2, limits
    assert recorded["request"]["content"] == b""
    # within the bound, it is decoded and redacted as before
    f.request.headers["content-encoding"] = "gzip"
    f.request.raw_content = gzip.compress(json.dumps(chat(f"x {KEY}")).encode())
    recorded = writer.recording_of(f.get_state(), frozenset())
    assert b"<SECRET:detector.secret.api_key>" in recorded["request"]["content"]
