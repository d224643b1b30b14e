"""Review, stop 30: the shortcuts landed in front of the secrets scans (1fcdf8d: one
`secrets.all_quiet` test of a request's texts joined skips the per-text scan; 7d9c043: the
recording writer skips a value the policy found no secret in, `TextPiece.secret_free`). A key
hidden in one text among many clean ones, in each way the catalogue reads, must still be refused
and recorded redacted; a clean request still passes. Through a real gateway with recording."""

from __future__ import annotations

import base64
import time

import httpx
import pytest

from tests.hardening.conftest import recording_gateway
from tests.hardening.test_evasion import _recordings, chat

KEY = "sk-proj-" + "Tn5Gb8Yw1Hs4" * 3
HIDDEN = {  # each a text the model reads as holding KEY
    "plain": KEY,
    "base64": base64.b64encode(KEY.encode()).decode(),
    "hex apart": " ".join(f"{b:02x}" for b in KEY.encode()),
    "an é inside": KEY[:14] + "é" + KEY[15:],
    "tag characters": "".join(chr(0xE0000 + ord(c)) for c in KEY),
    "a zero-width space inside": KEY[:10] + "\u200b" + KEY[10:],
    "percent-encoded": "".join(f"%{b:02X}" for b in KEY.encode()),
}


@pytest.fixture(scope="module")
def gw(issuer, llm, tmp_path_factory):
    with recording_gateway(issuer, llm, tmp_path_factory.mktemp("review30_fastpaths")) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def token(issuer, secrets):
    token = issuer.mint("remy@corp.example", ["engineering"])
    secrets.add(token)
    return token


CLEAN = ["Could you look at the quarterly numbers for the Lyon office?",
         "La réunion est déplacée à jeudi, merci d'avance.", "order 4111 2222 3333 4444 shipped",
         "call 212-555-0147 after 5", "the build id is Xq7Lm2Pz9Kd4Wf8"]


@pytest.mark.parametrize("case", list(HIDDEN))
def test_a_key_among_many_clean_texts_is_refused_and_redacted(case, gw, llm, token, secrets):
    secrets.add(KEY)
    texts = [*CLEAN * 8, f"deploy with {HIDDEN[case]} today", *CLEAN * 8]
    before = len(llm.requests)
    resp = httpx.post(gw.url + "/v1/chat/completions", json=chat(*texts),
                      headers={"authorization": f"Bearer {token}"})
    assert resp.status_code == 403, resp.text
    assert len(llm.requests) == before
    record = gw.audit_record(resp.headers["x-douane-decision-id"])
    assert record["reasons"][0]["rule"] == "detector.secret.api_key", record
    marker = b"deploy with <SECRET:detector.secret.api_key> today"
    deadline = time.monotonic() + 30
    while not any(marker in p.read_bytes() for p in _recordings(gw)):
        assert time.monotonic() < deadline, "the refused request was not recorded redacted"
        time.sleep(0.2)
    assert not any(HIDDEN[case][-24:].encode() in p.read_bytes() for p in _recordings(gw))


def test_the_same_clean_texts_pass(gw, llm, token):
    resp = httpx.post(gw.url + "/v1/chat/completions", json=chat(*CLEAN * 16),
                      headers={"authorization": f"Bearer {token}"})
    assert resp.status_code == 200, resp.text
