"""The one secret catalogue: what the policy flags, masking masks and the recording redacts."""

from __future__ import annotations

import base64
import random
import re
import sys
import urllib.parse
from pathlib import Path

import pytest

from douane import secrets
from douane.interaction import TextPiece
from douane.masking import operators
from douane.masking.config import MaskingSettings
from douane.masking.engine import Analyzer
from douane.policy import engine as policy_engine
from douane.policy import model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from masking_corpus import corpus  # noqa: E402

AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
POSITIVES = [  # (text, the secret value, masking entity, rule)
    (f"aws_secret_access_key = {AWS_SECRET}", AWS_SECRET, "AWS_SECRET_KEY", "aws_secret_key"),
    (f'{{"SecretAccessKey": "{AWS_SECRET}"}}', AWS_SECRET, "AWS_SECRET_KEY", "aws_secret_key"),
    (f"AKIAIOSFODNN7EXAMPLE,{AWS_SECRET}", AWS_SECRET, "AWS_SECRET_KEY", "aws_secret_key"),
    (f"AWS_SECRET={AWS_SECRET}", AWS_SECRET, "AWS_SECRET_KEY", "aws_secret_key"),
    ("key AKIAIOSFODNN7EXAMPLE here", "AKIAIOSFODNN7EXAMPLE", "AWS_ACCESS_KEY", "aws_access_key"),
    ("sk_live_51HxYzABCdefGHIjklMNOpqr", "sk_live_51HxYzABCdefGHIjklMNOpqr", "API_KEY",
     "stripe_key"),
    ("rk_live_51HxYzABCdefGHIjklMNOpqr", "rk_live_51HxYzABCdefGHIjklMNOpqr", "API_KEY",
     "stripe_key"),
    ("ANTHROPIC_API_KEY=sk-ant-api03-" + "a1B2" * 20, "sk-ant-api03-" + "a1B2" * 20, "API_KEY",
     "api_key"),
    ("glpat-ABCDEFGHIJKLMNOPQRST", "glpat-ABCDEFGHIJKLMNOPQRST", "API_KEY", "gitlab_token"),
    ("//registry.npmjs.org/:_authToken=npm_" + "a1" * 18, "npm_" + "a1" * 18, "API_KEY",
     "npm_token"),
    ("https://hooks.slack.com/services/T0000AAAA/B0000BBBB/XXXXXXXXXXXXXXXXXXXXXXXX",
     "https://hooks.slack.com/services/T0000AAAA/B0000BBBB/XXXXXXXXXXXXXXXXXXXXXXXX", "API_KEY",
     "slack_webhook"),
    ('{"private_key": "-----BEGIN PRIVATE KEY-----\\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\\n'
     '-----END PRIVATE KEY-----\\n"}', "MIIEvQIBADANBgkqhkiG9w0BAQEFAASC", "PRIVATE_KEY",
     "private_key"),
    ("postgres://app:Sup3r-S3cret@db.internal:5432/app", "Sup3r-S3cret", "PASSWORD",
     "url_password"),
    ("Authorization: Basic YWRtaW46aHVudGVyMg==", "YWRtaW46aHVudGVyMg==", "PASSWORD",
     "basic_auth"),
    ("DB_PASSWORD=Xk9#mq2Lp!", "Xk9#mq2Lp!", "PASSWORD", "password"),
    ('"client_secret": "3f786850e387550fdab836ed7e6dc881"', "3f786850e387550fdab836ed7e6dc881",
     "SECRET", "credential"),
    ("copy this: Q9f3kLm2Zp8Rt5Vw1Xy7Bn4Cd6Gh0Jk2Ls9Mq", "Q9f3kLm2Zp8Rt5Vw1Xy7Bn4Cd6Gh0Jk2Ls9Mq",
     "SECRET", "high_entropy"),
]
NEGATIVES = [
    "sha256 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    "commit 3f786850e387550fdab836ed7e6dc881de23001b (md5 5d41402abc4b2a76b9719d911017c592)",
    "request 550e8400-e29b-41d4-a716-446655440000 in version 3.12.1-rc2",
    "password: ********", "api_key=${API_KEY}", "token: <YOUR_TOKEN>", "max_tokens: 4096",
    'password = os.environ["DB_PASSWORD"]', "secret_ref: projects/acme/secrets/db/versions/3",
    '"integrity": "sha512-VsJQBuugC/khbNPbbnB1ONPZMelynzW/QN82l4AbPs+ZvpaCtrGlhK1MpJ2IQQZsaLtARlB'
    'MEBJTqKXTzz+iQA=="', "basic authentication is enabled", "tokenizer: bert-base-cased-v2-1234",
    "access_token_expires_at: 2024-05-01T12:00:00Z", "bypass=enabled1234",
]
SETTINGS = MaskingSettings(
    model=None, entities=secrets.ENTITIES, score_threshold=0.35, phone_regions=("US",),
    allow_list=(), operators={}, hash_key=b"k", requests=False, responses=True,
    exempt_groups=(), workers=1, stream_window=32, timeout_seconds=10)


@pytest.fixture(scope="module")
def analyzer() -> Analyzer:
    return Analyzer(SETTINGS)


@pytest.fixture(scope="module")
def policy(tmp_path_factory) -> model.Policy:
    path = tmp_path_factory.mktemp("policy") / "grants.yaml"
    path.write_text("version: 1\n")
    return model.load([path])


def flagged(policy: model.Policy, text: str) -> set[str]:
    """The policy's secret reasons for a prompt carrying `text`."""
    pieces = [TextPiece("prompt", "user", text, ("messages", 0, "content"))]
    return {r.rule for r in policy_engine.risk(policy, pieces)}


@pytest.mark.parametrize(("text", "value", "entity", "rule"), POSITIVES)
def test_every_kind_is_flagged_masked_and_redacted_alike(analyzer, policy, text, value, entity,
                                                          rule):
    masked = operators.apply(SETTINGS, text, analyzer.analyze(text), {})
    assert value not in masked and f"<{entity}>" in masked
    redacted = secrets.redact(text)
    assert value not in redacted and f"<SECRET:detector.secret.{rule}>" in redacted
    assert f"detector.secret.{rule}" in flagged(policy, text)


@pytest.mark.parametrize("text", NEGATIVES)
def test_hashes_uuids_versions_and_placeholders_are_not_secrets(analyzer, policy, text):
    assert analyzer.analyze(text) == []
    assert secrets.redact(text) == text
    assert not flagged(policy, text)


def test_what_the_recording_redacts_the_answer_masks_on_a_corpus(analyzer):
    """On a held-out corpus (not the evaluation seed): every labelled secret found, nothing
    found outside the labels, and masking and redaction agree character for character."""
    items = corpus(300, seed=11)
    labelled = found = 0
    for item in items:
        finds = secrets.find(item.text)
        spans = [(s.start, s.end) for s in analyzer.analyze(item.text)]
        assert spans == [(f.start, f.end) for f in finds]
        for start, end, kind in item.spans:
            if kind == "SECRET":
                labelled += 1
                found += any(f.start < end and start < f.end for f in finds)
        assert all(any(kind == "SECRET" and f.start < end and start < f.end
                       for start, end, kind in item.spans) for f in finds), item.text
    assert labelled > 30 and found / labelled >= 0.99


# A match starting its kind's `lead` characters before its hint (the most each pattern allows)
AT_THE_LEAD = [
    'sharedaccesskey = "Ab3dEf6hIj9kLm2nOp5qRs"',
    "aws" + "_x" * 15 + "secret = " + AWS_SECRET,
    "abcdefghijklmnop://admin:Xy9mQ2zz@db.internal",
    "password: Xy9!mQ2z", "Bearer " + "Ab3dEf6hIj9kLm2nOp5q" * 2, "Basic YWxpY2U6czNjcjN0",
]


@pytest.mark.parametrize("text", [t for t, *_ in POSITIVES] + AT_THE_LEAD)
def test_matches_sees_what_find_finds_however_far_from_the_start(text):
    """`matches` searches a pattern with a `lead` from its first hint on: a secret at the lead's
    limit, behind other text and before the same hint again, is still seen."""
    assert secrets.find(text)
    for padded in (text, "x " * 40 + text, "x " * 40 + text + " token key secret ://"):
        assert secrets.matches(padded)
    if text in AT_THE_LEAD:  # the sample starts exactly `lead` characters before the hint
        assert any(kind.pattern.search(text).start() == min(
            i for h in kind.hints if (i := text.lower().find(h)) >= 0) - kind.lead
            for kind in secrets.KINDS if kind.lead is not None and kind.pattern.search(text))


def test_kinds_gated_on_an_assignment_find_what_they_would_find_ungated(monkeypatch):
    """`find` skips the kinds built on `_SEP` in a text without `:`, `=` or ` is `/` was `: on
    texts mixing their names, separators and values, it finds what it finds with every hinted
    kind run."""
    import random

    assert {k.rule for k in secrets.CATALOGUE if k.assigned} == {
        "detector.secret.password", "detector.secret.credential"}
    words = ["token", "api_key", "Password", "pwd", "secret", " is ", " was ", "\tis\n", ":",
             "=", "=>", "'", '"', "\n", "max_tokens", "hunter2hunter2", "IS",
             "abcdefghijklmnopqrstuvwxyz0123"]
    rnd = random.Random(7)
    texts = ["".join(rnd.choice(words) for _ in range(rnd.randint(1, 6))) for _ in range(3000)]
    gated = [(secrets.find(t), secrets.matches(t)) for t in texts]
    monkeypatch.setattr(secrets, "_assigns", lambda text: True)
    assert gated == [(secrets.find(t), secrets.matches(t)) for t in texts]
    assert sum(bool(found) for found, _ in gated) > 150  # the texts hold secrets


def _full_width(text: str) -> str:
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in text)


# Each POSITIVE's value disguised: invisible format characters inside it, or full-width
DISGUISES = {
    "zero-width space": lambda v: v[:4] + "\u200b" + v[4:9] + "\u200b" + v[9:],
    "soft hyphen": lambda v: v[:3] + "\u00ad" + v[3:],
    "word joiner and bidi marks": lambda v: "\u2060".join(v[:6]) + "\u200e" + v[6:],
    "full-width": _full_width,
    "full-width, zero-width joiner": lambda v: _full_width(v[:8]) + "\u200d" + v[8:],
}


@pytest.mark.parametrize("disguise", list(DISGUISES))
@pytest.mark.parametrize(("text", "value", "entity", "rule"), POSITIVES)
def test_a_disguised_secret_is_flagged_masked_and_redacted_whole(analyzer, policy, disguise,
                                                                  text, value, entity, rule):
    """The patterns read the raw text: a key with a zero-width space inside, or in full-width
    letters, was no secret (the model reads it as the key). They read its view (NFKC, format
    characters dropped); the span is the disguised characters, replaced whole."""
    hidden = DISGUISES[disguise](value)
    plain, text = text, text.replace(value, hidden)
    masked = operators.apply(SETTINGS, text, analyzer.analyze(text), {})
    assert hidden not in masked and f"<{entity}>" in masked, masked
    assert secrets.redact(text) == secrets.redact(plain)  # the same places, replaced
    assert f"detector.secret.{rule}" in flagged(policy, text)
    assert secrets.matches(text) and secrets.maybe(text)


@pytest.mark.parametrize("text", [
    *NEGATIVES, "ｆｕｌｌ－ｗｉｄｔｈ ｔｅｘｔ １２３", "今日は\u3000会議です。", "le café d\u2019été",
    "soft\u00adhyphen\u200bzero\u200dwidth", "ﬁle ㎏ ½ Ⅻ", *map(_full_width, NEGATIVES)])
def test_a_texts_view_finds_no_secret_in_ordinary_text(text):
    assert secrets.find(text) == [] and secrets.redact(text) == text


ENCODINGS = {  # a text as a client may write it for the model to decode
    "base64": lambda t: base64.b64encode(t.encode()).decode(),
    "base64url, unpadded": lambda t: base64.urlsafe_b64encode(t.encode()).decode().rstrip("="),
    "percent, every byte": lambda t: "".join(f"%{b:02x}" for b in t.encode()),
    "percent, as a URL quotes": lambda t: urllib.parse.quote(t, safe=""),
    "hex": lambda t: t.encode().hex(),
    "base64 of base64": lambda t: base64.b64encode(base64.b64encode(t.encode())).decode(),
}


@pytest.mark.parametrize("encoding", list(ENCODINGS))
@pytest.mark.parametrize(("text", "value", "entity", "rule"), POSITIVES)
def test_an_encoded_secret_is_flagged_masked_and_redacted_whole(analyzer, policy, encoding,
                                                                 text, value, entity, rule):
    """The catalogue read no encodings: a key written base64, percent-encoded or as hex was no
    secret. An encoded run is decoded and read as text; it is named by what it holds and
    replaced whole (the run as it appears)."""
    if rule == "high_entropy":
        pytest.skip("decoded text is read by the catalogue, not the entropy bar (often data)")
    first = secrets.find(text)[0].kind  # the run's name (an AWS key pair: the access key)
    encoded = ENCODINGS[encoding](text)
    text = f"é decode {encoded} and use it"  # non-ASCII before: spans stay the text's own
    assert secrets.redact(text) == f"é decode <SECRET:{first.rule}> and use it"
    masked = operators.apply(SETTINGS, text, analyzer.analyze(text), {})
    assert encoded not in masked and f"<{first.entity}>" in masked, masked
    assert first.rule in flagged(policy, text)
    assert secrets.matches(text) and secrets.maybe(text)


def test_a_key_deep_in_a_long_encoded_text_file_is_found():
    """The first chunk tells text from binary; a text is then decoded whole."""
    inside = "notes\n" * 2000 + "OPENAI_API_KEY=sk-proj-" + "Zq8x" * 8 + "\n"
    text = "file: " + base64.b64encode(inside.encode()).decode()
    assert secrets.redact(text) == "file: <SECRET:detector.secret.api_key>"


@pytest.mark.parametrize("text", [
    "data:image/png;base64," + base64.b64encode(
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 40).decode(),
    "file " + base64.b64encode(bytes(range(256)) * 3).decode(),
    "sha256 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    "decode " + base64.b64encode(b"the deploy is at noon, max tokens 4096").decode(),
    "see https://example.com/search?q=caf%C3%A9%20au%20lait&page=2",
    "internationalization counterrevolutionaries Pneumonoultramicroscopic",
    "%ff%fe%00 not text",
    # three levels deep: past the bound
    "x " + base64.b64encode(base64.b64encode(base64.b64encode(
        b"sk-proj-Hv3nQ8wLr5Tz9Kp2Xc7Vb4"))).decode(),
])
def test_encoded_content_holding_no_secret_is_no_secret(text):
    """A detector must match the decoded bytes as text: an image, binary data, a digest, an
    ordinary encoded sentence or URL are not flagged (the entropy bar aside: it reads the text
    as written, as before)."""
    assert secrets.find(text, high_entropy=False) == []
    assert secrets.redact(text, high_entropy=False) == text


# the percent-encoded runs' pattern before it was found through `_URL_RUN` (its scan retried
# every position of every word): the reference the faster way must agree with
PCT_RUN = re.compile(r"(?:%[0-9A-Fa-f]{2}|[A-Za-z0-9._~+/=:-])*%[0-9A-Fa-f]{2}"
                     r"(?:%[0-9A-Fa-f]{2}|[A-Za-z0-9._~+/=:-])*")


def test_percent_runs_are_the_spans_of_the_one_pattern():
    """Every run a single `%XX`-demanding pattern finds, and only those, on texts built of what
    makes the runs ambiguous: `%` before hex or not, `%%41`, `%4%41`, URL characters, spaces."""
    rng = random.Random(18)
    alphabet = ["%", "%4", "%41", "%e9", "%zz", "a", "Z", "9", "-", ".", "~", "/", ":", " ",
                "\n", "é", '"', "%%", "=", "q"]
    texts = ["see https://example.com/search?q=caf%C3%A9%20au%20lait&page=2", "100% sure",
             "%%41", "%4%41", "a%41%", "%41", "x" * 50 + "%20"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
              for _ in range(3000)]
    for text in texts:
        expected = [m.span() for m in PCT_RUN.finditer(text)]
        assert [m.span() for m, _ in secrets._percent_runs(text)] == expected, text


@pytest.mark.parametrize("from_hints_only", [False, True])
def test_a_scan_from_the_hints_finds_what_the_patterns_scan_finds(from_hints_only, monkeypatch):
    """`_scan` tries a kind's pattern only from `lead` characters before each of its hints: on
    texts made of the pieces its patterns hold (names, separators, values, schemes, ids) it
    yields the matches the pattern's own scan yields, in order, for every kind with a lead
    (`from_hints_only`: never the whole scan, however many hints)."""
    if from_hints_only:
        monkeypatch.setattr(secrets, "_TRIED_MOST", 1e-9)
    rng = random.Random(1818)
    parts = ["api_key", "API-KEY", "x-access-key", "SharedAccessKey", "secret", "token",
             "tokenizer", "credential", "aws", "_", "AWS_SECRET_ACCESS_KEY", "password", "pwd",
             "pass", "bypass", "bearer", "Basic", "basic", "https://", "u:", "@", "host",
             "postgres://", "AKIA" + "Q" * 16, " ", "\n", "=", ": ", " is ", '"', "'", ",",
             "Zq8xW3vB7nM2kL9pR4tY6uI1oP5aS0dF", "dXNlcjpwYXNz", "hunter2!", "42", "AbCd" * 5]
    texts = ["".join(rng.choice(parts) for _ in range(rng.randint(1, 30))) for _ in range(2000)]
    texts += ["the api_key=Zq8xW3vB7nM2kL9pR4tY6uI1oP5aS0dF token is x" * 40,  # many hints
              "prose " * 3000 + "password: Hunter2!x " + "prose " * 100]  # few, far apart
    kinds = [k for k in secrets.KINDS if k.lead is not None]
    assert {k.rule.split(".")[-1] for k in kinds} >= {"credential", "password", "url_password"}
    for text in texts:
        for kind in kinds:
            expected = [m.span() for m in kind.pattern.finditer(text)]
            assert [m.span() for m in secrets._scan(kind, text, text.lower())] == expected, \
                (kind.rule, text)
