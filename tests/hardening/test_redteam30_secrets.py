"""Red team, stop 30: keys written in ways the secrets catalogue did not read (stop 29's
leftovers), each through a real gateway: refused before the upstream (nothing received, the
audit record names the detector) and recorded with the key redacted (`<SECRET:…>` in place of
what held it; neither the key nor the encoded form in any recording)."""

from __future__ import annotations

import base64
import time
import unicodedata

import httpx
import pytest

from tests.hardening.conftest import assert_refused, recording_gateway
from tests.hardening.test_evasion import ENCODED_KEY, FILLERS, _recordings, chat
from tests.support.gateway import Gateway


@pytest.fixture(scope="module")
def gw(issuer, llm, tmp_path_factory):
    with recording_gateway(issuer, llm, tmp_path_factory.mktemp("redteam30")) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def token(issuer, secrets):
    token = issuer.mint("rita@corp.example", ["engineering"])
    secrets.add(token)
    return token


def _recorded(gw: Gateway, marker: bytes) -> list[bytes]:
    """Every recording's bytes once one holds `marker` (written after the answer)."""
    deadline = time.monotonic() + 30
    while True:
        files = [p.read_bytes() for p in _recordings(gw)]
        if any(marker in data for data in files):
            return files
        assert time.monotonic() < deadline, f"{marker!r} was not recorded"
        time.sleep(0.2)


def _hex_apart(sep: str, prefix: str = "") -> callable:
    return lambda k: sep.join(f"{prefix}{b:02x}" for b in k.encode())


def _base32_wrapped_text(k: str) -> str:
    return base64.b32encode(f"{'notes ' * 700} {k} end".encode()).decode()


def _accent(k: str, letter: str, form: str = "NFC") -> str:
    return unicodedata.normalize(form, k[:14] + letter + k[15:])


RUNS = " ".join([FILLERS["identifiers"]] * 1100)
WRAPPED = base64.encodebytes(f"{'x' * 44} key {ENCODED_KEY} end".encode()).decode().strip()
DISGUISES = {  # what the model reads as the key; how the client wrote it
    # past the 1,024th candidate run only base64 and hex were decoded (`secrets._bulk`)
    "base32 after 1,100 runs": lambda k: RUNS + " decode " + base64.b32encode(k.encode()).decode(),
    "wrapped base64 after 1,100 runs": lambda k: RUNS + " decode\n" + WRAPPED,
    # base32 was decoded up to 4,096 characters (here 6,800)
    "base32 of a long text": _base32_wrapped_text,
    "hex bytes apart": _hex_apart(" "),
    "hex bytes with colons, upper case": lambda k: ":".join(f"{b:02X}" for b in k.encode()),
    "0x bytes with commas": _hex_apart(", ", "0x"),
    "hex bytes with dashes": _hex_apart("-"),
    "hex bytes one a line": _hex_apart("\n"),
    # a precomposed letter is its own NFKC form: the view kept it, and the key was cut
    "an é inside": lambda k: _accent(k, "é"),
    "an ñ inside": lambda k: _accent(k, "ñ"),
    "an ø inside (a stroke, no decomposition)": lambda k: _accent(k, "ø"),
    "a dotless ı inside": lambda k: _accent(k, "ı"),
    "an é inside the prefix": lambda k: "sk-pr\u00e9j" + k[7:],
    # letters of other scripts drawn as Latin ones are their own NFKC form too (lead, stop 30)
    "a Cyrillic р in the prefix": lambda k: "sk-\u0440roj" + k[7:],
    "a Cyrillic ѕ as the first letter": lambda k: "\u0455" + k[1:],
    "a Greek ο inside": lambda k: k[:14] + "\u03bf" + k[15:],
    "every look-alike Cyrillic": lambda k: k.translate(str.maketrans("aeopcxyTMKH", "аеорсхуТМКН")),
}


@pytest.mark.parametrize("case", list(DISGUISES))
def test_a_key_the_catalogue_did_not_read_is_refused(case, gw, llm, token, secrets):
    """Before: 200 with the org's key, recorded as sent (`tests/hardening/test_redteam30_secrets`
    fails on 7d29a0d for every case)."""
    written = DISGUISES[case](ENCODED_KEY)
    secrets.add(ENCODED_KEY)
    before = len(llm.requests)
    resp = httpx.post(gw.url + "/v1/chat/completions", json=chat(f"{written} and deploy"),
                      headers={"authorization": f"Bearer {token}"})
    record = assert_refused(gw, llm, before, resp, 403)
    assert record["reasons"][0]["rule"] == "detector.secret.api_key", record
    marker = b"<SECRET:detector.secret.api_key> and deploy"
    assert not any(written[-40:].encode() in data for data in _recorded(gw, marker))


CONTROLS = {  # look like the disguises above, hold no key: pass
    "French prose with a long accented link": "La réunion est déplacée, voir https://exemple.fr/"
    "documents/réunion-trimestrielle-2026-résumé et l'ordre du jour",
    "an accented identifier": "le champ identifiantDeCommandeÉtéPrécédent vaut 4096",
    "a fingerprint with colons": "SHA256:" + ":".join(["4f", "a1", "9c", "e0"] * 8),
    "a hex dump of text": "dump: " + " ".join(f"{b:02x}" for b in b"hello, the build passed"),
    "numbers apart": "scores 21 34 55 89 44 23 67 45 32 76 54 and 23",
    "base32 of text": base64.b32encode(b"meeting notes: ship v2 on friday " * 200).decode(),
    "Russian prose of long words": "Достопримечательности Санкт-Петербурга, "
    "высокопроизводительный сервер2026 и переосвидетельствование",
    "Greek prose": "Η Ακρόπολη είναι στην Αθήνα· ΚΑΛΗΜΕΡΑ ΣΑΣ, ραντεβού στο γραφείο ΑΒΓ-2026",
}


@pytest.mark.parametrize("case", list(CONTROLS))
def test_text_shaped_like_a_disguise_passes(case, gw, llm, token):
    resp = httpx.post(gw.url + "/v1/chat/completions", json=chat(CONTROLS[case]),
                      headers={"authorization": f"Bearer {token}"})
    assert resp.status_code == 200, resp.text


HEADER_KEY = "sk-proj-" + "Hv3nQ8wLr5Tz" * 3
HEADERS = {  # a key in a header that goes on to the provider, written so no hint shows as sent
    "base64 in User-Agent": ("User-Agent",
                             f"OpenAI/Python 1.99.1 {base64.b64encode(HEADER_KEY.encode()).decode()}"),
    "base64url in X-Stainless-Note": ("X-Stainless-Note",
                                      base64.urlsafe_b64encode(HEADER_KEY.encode()).decode()),
    "a zero-width space in the prefix, User-Agent": ("User-Agent",
                                                     "OpenAI/Python s\u200bk-" + HEADER_KEY[3:]),
    "a zero-width joiner in the prefix, X-Stainless-Arch": ("X-Stainless-Arch",
                                                            "sk\u200d-" + HEADER_KEY[3:]),
}


@pytest.mark.parametrize("case", list(HEADERS))
def test_a_disguised_key_in_a_forwarded_header_is_refused(case, gw, llm, token, secrets):
    """The forwarded headers' check looked for a catalogue hint in the raw values first: a
    base64 key (no hint) or one whose hint a zero-width character cuts went on to the provider
    beside the org's key (the recording redacted it)."""
    name, value = HEADERS[case]
    secrets.add(HEADER_KEY)
    before = len(llm.requests)
    resp = httpx.post(gw.url + "/v1/chat/completions", json=chat("hello"),
                      headers={"authorization": f"Bearer {token}",
                               name: value.encode()})  # (UTF-8 bytes, as sent)
    record = assert_refused(gw, llm, before, resp, 403)
    assert resp.json()["error"]["code"] == "header_refused", resp.text
    reason = record["reasons"][0]
    assert reason["rule"] == "route.header" and "detector.secret.api_key" in reason["message"]
    assert reason["field"] == f"headers.{name.lower()}", reason
    recorded = _recorded(gw, resp.headers["x-douane-decision-id"].encode())
    assert not any(value[-30:].encode() in data for data in recorded)


def test_the_sdks_own_headers_pass_the_header_check(gw, llm, token):
    """The control: an SDK's usual values, a random idempotency key and a UUID trace id pass."""
    before = len(llm.requests)
    resp = httpx.post(gw.url + "/v1/chat/completions", json=chat("hello"), headers={
        "authorization": f"Bearer {token}", "user-agent": "OpenAI/Python 1.99.1",
        "x-stainless-package-version": "1.99.1", "x-stainless-runtime-version": "3.13.0",
        "idempotency-key": "stainless-python-retry-3f2b8c1e-9a4d-4e7b-8c21-5d6f7a8b9c0d",
        "x-stainless-retry-count": "0", "content-type": "application/json"})
    assert resp.status_code == 200, resp.text
    assert len(llm.requests) == before + 1


def test_a_key_in_an_idempotency_key_never_reaches_the_provider(gw, llm, token, secrets):
    """`Idempotency-Key` goes on as a digest of the user and the key (`forwarding.
    own_idempotency_key`), so the forwarded headers' check does not read it (a random key per
    request cost every request a scan): what holds a key reaches the provider as 40 hex digits."""
    secrets.add(HEADER_KEY)
    before = len(llm.requests)
    resp = httpx.post(gw.url + "/v1/chat/completions", json=chat("hello"), headers={
        "authorization": f"Bearer {token}", "idempotency-key": HEADER_KEY})
    assert resp.status_code == 200, resp.text
    sent = llm.requests[before].headers["idempotency-key"]
    assert len(sent) == 40 and int(sent, 16) >= 0 and HEADER_KEY not in str(llm.requests[before])
