"""An answer douane delivers unread (a granted binary download) framed by its connection's
close: a cut there reads as its end (HTTP/1's only signal), so such an answer is refused at its
head, whole or cut, 502 in the API's shape, audited `upstream.unframed`, nothing of it sent.
Framed by a length it passes; JSON framed by the close is still read whole (a cut
one is unreadable). Through a real gateway."""

from __future__ import annotations

import httpx
import pytest

from tests.hardening.test_sec30_cut_answers import BINARY, cut, gw, upstream  # noqa: F401

PATH = "/v1/files/file_x/content"


def download(gw, token: str) -> httpx.Response:  # noqa: F811
    return httpx.get(gw.url + PATH, timeout=60, headers={"authorization": f"Bearer {token}"})


@pytest.mark.parametrize("at", [len(BINARY), 700], ids=["whole", "cut"])
def test_a_download_framed_by_the_close_is_refused(gw, upstream, token, at):  # noqa: F811
    upstream.answer = cut("application/octet-stream", BINARY, "close", at)
    try:
        resp = download(gw, token)
    finally:
        upstream.answer = None
    assert resp.status_code == 502, (resp.status_code, resp.content[:200])
    assert BINARY[:64] not in resp.content
    decision_id = resp.headers["x-douane-decision-id"]
    assert resp.json()["error"]["decision_id"] == decision_id
    record = gw.audit_record(decision_id)
    assert record["reasons"][0]["rule"] == "upstream.unframed", record


@pytest.mark.parametrize("framing", ["length"])
def test_a_framed_download_passes_whole(gw, upstream, token, framing):  # noqa: F811
    upstream.answer = cut("application/octet-stream", BINARY, framing, len(BINARY))
    try:
        resp = download(gw, token)
    finally:
        upstream.answer = None
    assert resp.status_code == 200 and resp.content == BINARY
