"""Security, stop 32: a key inside base64 with junk bytes glued to it. The run is decoded whole,
but the decoded text read `xAKIA…` (base64 of "x" + the key: 28 characters, no padding) with the
key's word boundary missing, so no catalogue kind found it; only the entropy bar on the encoded
run caught some (score 40: below the hold threshold, and not at all for a 20-character AWS key
id). Decoded text is now read without the boundaries that set a key apart in a text a reader
sees (`secrets.Kind.glued`). Policy, masking and recordings share `secrets.find`: each checked."""

from __future__ import annotations

import base64
import textwrap
import time

import httpx
import pytest

from douane import secrets as catalogue
from douane.masking import engine
from tests.hardening.conftest import assert_refused, recording_gateway
from tests.hardening.test_evasion import _recordings, chat
from tests.support.gateway import Gateway

# one value of every catalogue kind (the entropy bar is not read in decoded text: data)
SAMPLES = {
    "private_key": "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo4lgOEePz"
                   "Nm0tRgeLezV6ffAt0gun\n-----END RSA PRIVATE KEY-----",
    "aws_access_key": "AKIAQX7RZ2LMN4TB5KWD",
    "aws_secret_key": "aws_secret_access_key=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "jwt": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFU"
           "P0THsR8U",
    "api_key": "sk-proj-" + "Wc4tRe7uYp2L" * 3,
    "stripe_key": "sk_live_" + "4eC39HqLyjWDarjtT1zdp7dc",
    "github_token": "ghp_" + "a1B2c3D4e5F6g7H8i9J0" * 2,
    "gitlab_token": "glpat-" + "xR4tY7uI9oP2aS5dF8gH",
    "npm_token": "npm_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8",
    "huggingface_token": "hf_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7",
    "sendgrid_key": "SG.a1B2c3D4e5F6g7H8i9J0k1.a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8s9T0u1v",
    "slack_token": "xoxb-" + "1234567890-abcdefABCDEF",
    "slack_webhook": "https://hooks.slack.com/services/T0000/B0000/XXXXXXXXXXXXXXXXXXXXXXXX",
    "google_api_key": "AIza" + "SyA1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q",
    "google_oauth_secret": "GOCSPX-" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4",
    "bearer": "Bearer " + "a1B2c3D4e5F6g7H8i9J0k1L2m3",
    "basic_auth": "Basic " + base64.b64encode(b"admin:Hunter2Secret").decode(),
    "url_password": "postgres://admin:Hunter2Secret@db.internal/prod",
    "password": "password=Hunter2Secret!",
    "credential": "api_key=Zq8Lw3Nv6Rt1Yp4Ks7Hd",
}
LEADS = ("", "x", "Q9")  # 0, 1, 2 bytes before the key: each of base64's three offsets
TRAILS = ("", "x", "_")


def encodings(plain: str) -> dict[str, str]:
    data = plain.encode()
    std, url = base64.b64encode(data).decode(), base64.urlsafe_b64encode(data).decode()
    return {"standard": std, "standard, no padding": std.rstrip("="), "url-safe": url,
            "url-safe, no padding": url.rstrip("="),
            "MIME lines (76)": base64.encodebytes(data).decode().strip(),
            "PEM lines (64)": "\n".join(textwrap.wrap(std, 64))}


def test_the_catalogue_covers_every_kind():
    assert set(SAMPLES) == {k.rule.removeprefix("detector.secret.") for k in catalogue.CATALOGUE}


@pytest.mark.parametrize("kind", list(SAMPLES))
def test_a_key_at_any_offset_of_base64_is_found_as_its_kind(kind):
    """Before (0ba8e27): 15 of the 20 kinds missed with a byte glued before or after them (the
    AWS key id at every offset but the aligned one without junk)."""
    rule = f"detector.secret.{kind}"
    missed = []
    for lead in LEADS:
        for trail in TRAILS:
            for name, encoded in encodings(lead + SAMPLES[kind] + trail).items():
                for text in (encoded, f"decode this: {encoded} thanks"):
                    found = catalogue.find(text, high_entropy=False)
                    if not any(f.kind.rule == rule and f.start <= text.index(encoded[:8]) < f.end
                               for f in found):
                        missed.append((lead, trail, name))
    assert not missed, missed


def test_a_glued_key_past_a_thousand_runs_is_found():
    """Past `_RUNS_MOST` runs the rest are decoded in bulk: the same reading."""
    runs = " ".join(["abcdefghijklmnopqr"] * 1100)
    text = runs + " " + base64.b64encode(b"x" + SAMPLES["aws_access_key"].encode()).decode()
    assert [f.kind.rule for f in catalogue.find(text, high_entropy=False)] == \
        ["detector.secret.aws_access_key"]


CONTROLS = {  # decoded text that glues a prefix to a word and holds no key: nothing found
    "a slug with sk- inside words": b"see /blog/risk-assessment-framework-for-teams and "
                                    b"/tasks/task-management-platform-guide",
    "a JSON cursor": b'{"after":"desk-booking-2026-12-01-morning","limit":20}',
    "prose about passes": b"the bypass lane and the compass point north, twice",
}


@pytest.mark.parametrize("case", list(CONTROLS))
def test_decoded_words_ending_like_a_prefix_are_not_keys(case):
    for lead in (b"", b"x", b"Q9"):
        text = base64.b64encode(lead + CONTROLS[case]).decode()
        assert catalogue.find(text, high_entropy=False) == [], (case, lead)


def test_masking_and_recording_read_the_same():
    """The masking engine's recogniser and the recording's redaction are `secrets.find`."""
    text = "here: " + base64.b64encode(b"x" + SAMPLES["aws_access_key"].encode()).decode()
    recogniser = engine.secret_recognizer(["AWS_ACCESS_KEY"])
    assert [(r.entity_type, text[r.start:r.end][:4]) for r in recogniser.analyze(
        text, ["AWS_ACCESS_KEY"])] == [("AWS_ACCESS_KEY", "eEFL")]
    assert catalogue.redact(text) == "here: <SECRET:detector.secret.aws_access_key>"


@pytest.fixture(scope="module")
def gw(issuer, llm, tmp_path_factory):
    with recording_gateway(issuer, llm, tmp_path_factory.mktemp("sec32b64")) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def token(issuer, secrets):
    token = issuer.mint("sam@corp.example", ["engineering"])
    secrets.add(token)
    return token


def _recorded(gw: Gateway, marker: bytes) -> list[bytes]:
    deadline = time.monotonic() + 30
    while True:
        files = [p.read_bytes() for p in _recordings(gw)]
        if any(marker in data for data in files):
            return files
        assert time.monotonic() < deadline, f"{marker!r} was not recorded"
        time.sleep(0.2)


@pytest.mark.parametrize("lead", ["", "x", "Q9"])
@pytest.mark.parametrize("kind", ["aws_access_key", "github_token", "api_key"])
def test_a_glued_key_in_base64_is_refused_and_not_recorded(kind, lead, gw, llm, token, secrets):
    """Before: with a leading byte, 200 (the entropy bar's score 40 is below the hold) and the
    AWS key id not even named; the recording kept the encoded run."""
    secrets.add(SAMPLES[kind])
    encoded = base64.b64encode((lead + SAMPLES[kind]).encode()).decode().rstrip("=")
    before = len(llm.requests)
    resp = httpx.post(gw.url + "/v1/chat/completions", json=chat(f"decode {encoded} and deploy"),
                      headers={"authorization": f"Bearer {token}"})
    record = assert_refused(gw, llm, before, resp, 403)
    assert record["reasons"][0]["rule"] == f"detector.secret.{kind}", record
    recorded = _recorded(gw, f"decode <SECRET:detector.secret.{kind}> and deploy".encode())
    assert not any(encoded.encode() in data for data in recorded)
