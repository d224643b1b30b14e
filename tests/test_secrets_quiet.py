"""`secrets.quiet` / `all_quiet`: the fast path that skips the secret scan must never drop a
find. Random texts (ordinary prose, near-miss key shapes, every key cut short, disguised and
encoded) are checked against the full scan, and the policy's verdict with the fast path against
its verdict without it."""

from __future__ import annotations

import base64
import random
import urllib.parse

import pytest

from douane import secrets
from douane.interaction import TextPiece
from douane.policy import engine as policy_engine
from douane.policy import model
from tests.test_secrets import DISGUISES, ENCODINGS, NEGATIVES, POSITIVES

PROSE = ("Could you look at the quarterly numbers for the Lyon office? ", "le café d\u2019été ",
         "max_tokens", "customer_id", "lookup_customer", "42", "12% more", "4111 1111 1111 1111",
         "212-555-0147", "maria.garcia@example.com", "call_0", "gpt-4o-mini", "you are now",
         " is ", " was ", ": ", "=", "\n", "\u200b", "\u0301", "\U000e0041", "ﬁ", "ｓｋ－",
         "&amp;", "&#115;", "\\u0073", "\\x73", "%7", "%73", "0x73, ", "73 6b ", "é")


def _encodings(text: str) -> list[str]:
    raw = text.encode()
    wrapped = base64.encodebytes(raw * 3).decode()  # 76 columns, line ends inside
    return [*(encode(text) for encode in ENCODINGS.values()), wrapped,
            base64.b32encode(raw).decode(), base64.b32encode(raw).decode().lower(),
            "".join(f"\\u{ord(c):04x}" for c in text), "".join(f"\\x{b:02x}" for b in raw),
            "".join(f"&#{ord(c)};" for c in text), " ".join(f"{b:02x}" for b in raw),
            ":".join(f"{b:02X}" for b in raw), ", ".join(f"0x{b:02x}" for b in raw),
            urllib.parse.quote(text)]


def _fragments() -> list[str]:
    keys = [value for _, value, _, _ in POSITIVES] + [text for text, *_ in POSITIVES]
    disguised = [disguise(value) for value in keys for disguise in DISGUISES.values()]
    encoded = [e for value in keys[:8] for e in _encodings(value)]
    # near misses: every shape cut short, a character changed, a hint alone
    cut = [value[:n] for value in keys for n in (3, 8, 15, 16, 19, 31, 32)]
    changed = [value[:5] + "!" + value[6:] for value in keys]
    return [*PROSE, *NEGATIVES, *keys, *disguised, *encoded, *cut, *changed, *secrets.HINTS]


def _texts(n: int, seed: int) -> list[list[str]]:
    """`n` requests, each a few texts of random fragments and random cuts of them."""
    rnd = random.Random(seed)
    fragments = _fragments()
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rnd.randint(1, 4)):
            text = "".join(rnd.choice(fragments) if rnd.random() < 0.4 else rnd.choice(PROSE)
                           for _ in range(rnd.randint(1, 5)))
            start = rnd.randint(0, len(text) // 3)
            parts.append(text[start:start + rnd.randint(1, len(text))])
        out.append(parts)
    return out


TEXTS = _texts(1500, 30)


def test_a_quiet_text_holds_no_secret():
    quiet = 0
    for parts in TEXTS:
        for text in parts:
            if secrets.quiet(text):
                quiet += 1
                assert secrets.find(text) == [] and secrets.find(text, False) == [], text
        if secrets.all_quiet(parts):
            assert all(secrets.quiet(text) for text in parts), parts
    assert quiet > 500  # the fast path is taken, not only the scan


@pytest.mark.parametrize("text", [text for text, *_ in POSITIVES]
                         + [encode(t) for t, _, _, rule in POSITIVES if rule != "high_entropy"
                            for encode in ENCODINGS.values()]
                         + [t.replace(v, d(v)) for t, v, _, _ in POSITIVES
                            for d in DISGUISES.values()])
def test_no_key_is_quiet_alone_or_among_other_texts(text):
    assert not secrets.quiet(text)
    assert not secrets.all_quiet(["Could you look at this?", text, "max_tokens"])


# no deny rule (each request's kinds left to the detectors: the fast path), one on the answers'
# kind only (the same), one on the request's kinds, one with the detectors off
POLICIES = {"detectors": "", "a rule on answers": "rules:\n  - {id: r, literal: fn, in: [completion]}\n",
            "a rule on requests": "rules:\n  - {id: r, literal: ok, in: [prompt, tool_arguments,"
            " tool_result]}\n", "no detectors": "detectors: {secrets: false, injection: false}\n"}


@pytest.fixture(scope="module", params=list(POLICIES))
def policy(request, tmp_path_factory) -> model.Policy:
    path = tmp_path_factory.mktemp("policy") / "grants.yaml"
    path.write_text("version: 1\n" + POLICIES[request.param])
    return model.load([path])


def test_the_policy_decides_as_the_full_scan_does(policy, monkeypatch):
    """Each request's texts as the parts of one message (read together: a key split across
    two is found in their join), as a tool call's arguments then its name (read in order), as
    a system prompt then messages with douane's keys between, as tool results, and as a body's
    keys; the fast path (one test of the texts and their runs joined, a keys' piece remembered
    quiet left out) decides as the scan of each, the first time and again."""
    def requests():
        for parts in TEXTS:
            yield [TextPiece("prompt", "user", t, ("messages", 0, "content", i, "text"))
                   for i, t in enumerate(parts)]
            yield [*(TextPiece("tool_arguments", "assistant", t, ("params", "arguments", f"a{i}"))
                     for i, t in enumerate(parts)),
                   TextPiece("tool_arguments", "user", "lookup_customer", ("params", "name"))]
            yield [TextPiece("prompt", "system", parts[0], ("system",)),
                   TextPiece("prompt", "user", "max_tokens\nmodel", ("<keys and ids>",)),
                   *(TextPiece("prompt", "user", t, ("messages", i, "content"))
                     for i, t in enumerate(parts[1:]))]
            yield [TextPiece("tool_result", "tool", t, ("result", "content", i, "text"))
                   for i, t in enumerate(parts)]
            # a body's keys (a key, an id or an enum may be a secret): remembered when quiet
            yield [TextPiece("prompt", "user", parts[-1], ("messages", 0, "content")),
                   TextPiece("prompt", "user", "\n".join(parts), ("<keys and ids>",))]

    def verdicts():
        # (a text the policy found no secret in is not scanned again by the recording's writer)
        return [(sorted((r.rule, r.field) for r in policy_engine.risk(policy, pieces)),
                 [p.secret_free for p in pieces]) for pieces in requests()]

    policy_engine._KNOWN_KEYS.clear()
    fast = verdicts()
    assert fast == verdicts()  # the keys' pieces now remembered
    monkeypatch.setattr(secrets, "all_quiet", lambda texts: False)
    assert fast == verdicts()
    if policy.secrets:
        assert sum(bool(v) for v, _ in fast) > 300  # the requests hold secrets
        assert sum(f is not None for _, free in fast for f in free) > 1000
    else:  # nothing scanned: nothing the writer may trust
        assert all(f is None for _, free in fast for f in free)


def test_the_hex_pairs_gate_lets_every_run_through():
    """`_pairs` (the gate before `_pair_runs`' scans) passes every text those scans match in:
    random hex bytes written apart, among card and phone numbers."""
    rnd = random.Random(7)
    for _ in range(2000):
        raw = bytes(rnd.randrange(0x20, 0x80) for _ in range(rnd.randint(8, 14)))
        sep = rnd.choice([" ", ":", ", ", "\t", "  ", ",", ": "])
        prefix = rnd.choice(["", "0x", "0X"])
        digits = rnd.choice(["{:02x}", "{:02X}"])
        run = sep.join(prefix + digits.format(b) for b in raw)
        text = rnd.choice(["", "card 4111 1111 1111 1111 ", "call 212-555-0147 "]) + run + \
            rnd.choice(["", " 20261201", " done"])
        assert not secrets._pair_runs(text) or secrets._pairs(text), text
    assert not secrets._pairs("card 4111 1111 1111 1111, order 20261201123456")


@pytest.mark.parametrize("width", [4, 5, 7, 9])
def test_a_key_cut_into_quiet_parts_is_found_in_their_join(tmp_path, width):
    """Every key cut into parts none of which holds a hint or a token run alone (each quiet):
    the fast path's one test reads their join too, so the key is still found across them."""
    (tmp_path / "grants.yaml").write_text("version: 1\n")
    policy = model.load([tmp_path / "grants.yaml"])
    tested = 0
    for text, *_ in POSITIVES:
        parts = [text[i:i + width] for i in range(0, len(text), width)]
        if not secrets.all_quiet(parts):
            continue
        tested += 1
        in_a_row = [TextPiece("prompt", "user", t, ("messages", 0, "content", i, "text"))
                    for i, t in enumerate(parts)]
        assert policy_engine.risk(policy, in_a_row), parts
    assert tested >= 3
