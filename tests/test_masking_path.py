"""What a masked answer sends to the analyser (masking/addon.py): texts nothing could be found in
stay home, a text repeated in one answer goes once, and no value is left unmasked for it."""

from __future__ import annotations

import asyncio
import random

import pytest

from douane.flowstate import FlowState
from douane.interaction import TextPiece
from douane.masking.addon import RESPONSE_KINDS, Mask, could_hold_a_value
from douane.masking.config import NER_ENTITIES
from douane.masking.engine import Analyzer
from douane.settings import Settings
from tests.test_masking import SETTINGS

PATTERN_ONLY = tuple(e for e in SETTINGS.entities if e not in NER_ENTITIES)
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
# a value of every configured type (with the context some need): the pre-send rule must never
# keep one back
VALUES = {
    "PERSON": "Maria Garcia",
    "LOCATION": "Lisbon",
    "EMAIL_ADDRESS": "maria.garcia@example.com",
    "PHONE_NUMBER": "212-555-0147",
    "CREDIT_CARD": "4111 1111 1111 1111",
    "US_SSN": "SSN 536-22-1845",
    "IP_ADDRESS": "192.168.10.24",
    "IBAN_CODE": "DE89 3704 0044 0532 0130 00",
    "PRIVATE_KEY": "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBg\n-----END PRIVATE KEY-----",
    "AWS_ACCESS_KEY": "AKIAIOSFODNN7EXAMPLE",
    "AWS_SECRET_KEY": f"aws_secret_access_key = {AWS_SECRET}",
    "JWT": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
    "API_KEY": "sk-proj-abcdefghijklmnopqrstuvwxyz0123",
    "BEARER_TOKEN": "Authorization: Bearer abcdefghijklmnopqrstuvwxyz012345",
    "PASSWORD": "postgres://app:Sup3r-S3cret@db.internal:5432/app",
    "SECRET": "client_secret=9f86d081884c7d659a2feaa0c55ad015a3bf",
}
# digits-only values: sent for their digits alone (no letters), also without NER
DIGIT_VALUES = ("212-555-0147", "+44 20 7946 0958", "4111111111111111", "536-22-1845",
                "192.168.10.24", "::1", "2001:db8::8a2e:370:7334", "10.0.0.1")
# what an answer's structured fields hold that no recogniser can find anything in (a full date
# has the 7 digits a phone number may have, a clock two colons as IPv6 has: those are sent)
VALUE_FREE = ("42", "3.14", "-17", "2024-05", "12:30", "$1,200",
              "100%", "#12345", "v2", "1 2 3 4 5 6", "+33 1 23", "N/A", "—", "✓", "[1, 2, 3]",
              "1e-9", "0x1F", "3 x 4 = 12", "١٢٣", "")


@pytest.fixture(scope="module")
def analyzer() -> Analyzer:
    return Analyzer(SETTINGS)


class AnalyzerPool:
    """The pool's interface over an analyser in this process; records what it was sent."""

    def __init__(self, analyzer: Analyzer):
        self.analyzer, self.sent = analyzer, []

    async def analyze(self, texts: list[str]) -> list:
        self.sent.append(list(texts))
        return self.analyzer.analyze_many(texts)


def mask(analyzer: Analyzer, pieces: list[TextPiece]) -> tuple[list[TextPiece], AnalyzerPool]:
    m = Mask(Settings())
    m.masking, m.pool = SETTINGS, AnalyzerPool(analyzer)
    return asyncio.run(m._mask(FlowState("dcn_t", 0.0), pieces)), m.pool


@pytest.mark.parametrize("entity", sorted(VALUES))
def test_a_value_of_every_type_is_sent_and_masked_in_every_field_kind(analyzer, entity):
    value = VALUES[entity]
    assert could_hold_a_value(value, SETTINGS.entities)
    pieces = [TextPiece(kind, None, value, ("x", i)) for i, kind in enumerate(RESPONSE_KINDS)]
    changed, _ = mask(analyzer, pieces)
    assert changed == pieces
    for piece in pieces:
        secret = value.split(" = ")[-1].split("Bearer ")[-1].split("SSN ")[-1]
        assert secret not in piece.text and f"<{entity}" in piece.text, piece.text
    if entity not in NER_ENTITIES:  # masking without the NER model (ner_missing: pattern_only)
        assert could_hold_a_value(value, PATTERN_ONLY)


@pytest.mark.parametrize("value", DIGIT_VALUES)
def test_values_without_letters_are_sent_for_their_digits(value):
    assert could_hold_a_value(value, SETTINGS.entities)
    assert could_hold_a_value(value, PATTERN_ONLY)
    assert could_hold_a_value(f'{{"n": "{value}"}}', PATTERN_ONLY)


def _no_two_letters(rng: random.Random) -> str:
    """Text of digits, punctuation, spaces and lone letters: numbers, dates, amounts, codes."""
    alphabet = "0123456789" * 3 + " .,:;-+/()[]#%$€£_=*'\"\n" + "aAxXeEkKT" + "٣٤"
    out = []
    for _ in range(rng.randint(1, 30)):
        c = rng.choice(alphabet)
        if c.isalpha() and out and out[-1].isalpha():
            c = " "
        out.append(c)
    return "".join(out)


def test_what_is_kept_back_holds_nothing_the_analyser_finds(analyzer):
    """The rule is sound against the real analyser: every text it keeps back (fixed cases and
    random ones built to come close: digit runs, `:` and `.` groups, lone letters) analyses to
    no detection."""
    rng = random.Random(17)
    texts = [*VALUE_FREE, *(_no_two_letters(rng) for _ in range(1500))]
    free = [t for t in texts if not could_hold_a_value(t, SETTINGS.entities)]
    assert all(t in free for t in VALUE_FREE)
    assert len(free) > 500, "the generator must exercise the rule"
    found = analyzer.analyze_many(free)
    assert [(t, s) for t, s in zip(free, found, strict=True) if s] == []


def test_value_free_and_repeated_texts_make_no_round_trip(analyzer):
    answer = "Ask Maria Garcia at maria.garcia@example.com."
    pieces = [TextPiece("tool_result", "tool", text, ("content", i)) for i, text in
              enumerate([answer, "42", "2024-05", answer, "Call 212-555-0147.", answer])]
    changed, pool = mask(analyzer, pieces)
    assert pool.sent == [[answer, "Call 212-555-0147."]]
    masked = "Ask <PERSON> at <EMAIL_ADDRESS>."
    assert [p.text for p in changed] == [masked, masked, "Call <PHONE_NUMBER>.", masked]
    assert [p.text for p in pieces][1:3] == ["42", "2024-05"]
    _, pool = mask(analyzer, [TextPiece("completion", None, t, ("x", i))
                              for i, t in enumerate(VALUE_FREE)])
    assert pool.sent == []


def test_a_chat_history_is_analysed_once_across_turns(analyzer):
    """With `requests: true` each turn re-sends the earlier messages: only the new one is sent to
    the workers, and every turn is masked as if analysed whole. Answers are always analysed."""
    from douane.masking import addon

    m = Mask(Settings())
    m.masking, m.pool = SETTINGS, AnalyzerPool(analyzer)
    history = ["My name is Maria Garcia.", "Write to maria.garcia@example.com", "Call 212-555-0147"]
    turns = []
    for n in range(1, len(history) + 1):
        pieces = [TextPiece("prompt", "user", t, ("messages", i)) for i, t in
                  enumerate(history[:n])]
        asyncio.run(m._mask(FlowState("dcn_t", 0.0), pieces, m.recent))
        turns.append([p.text for p in pieces])
    assert m.pool.sent == [[t] for t in history]
    assert turns[-1] == ["My name is <PERSON>.", "Write to <EMAIL_ADDRESS>", "Call <PHONE_NUMBER>"]
    assert turns[1] == turns[-1][:2]
    for _ in range(2):
        asyncio.run(m._mask(FlowState("dcn_t", 0.0), [TextPiece("completion", None, history[0],
                                                                ("x",))]))
    assert m.pool.sent[-2:] == [[history[0]], [history[0]]]
    recent = addon.Recent()
    for i in range(addon.RECENT + 1):
        recent.put(recent.digest(str(i)), [])
    assert recent.get(recent.digest("0")) is None and recent.get(recent.digest("1")) == []
    assert recent.digest("a") != addon.Recent().digest("a"), "a key of its own per start"


def test_a_text_another_user_sent_lately_is_analysed_again(analyzer):
    """Red team: the recent analyses were shared by every user, so a prompt answered sooner told
    its sender that someone had sent the same text lately (a timing oracle across users). Each
    user's texts are now their own; one user's history still is analysed once."""
    from douane.flowstate import Identity

    m = Mask(Settings())
    m.masking, m.pool = SETTINGS, AnalyzerPool(analyzer)
    text = "My name is Maria Garcia, call 212-555-0147"
    for user in ("alice@corp", "alice@corp", "mallory@corp", "alice@corp"):
        st = FlowState("dcn_t", 0.0)
        st.identity = Identity(user, (), "issuer", user, "bearer")
        pieces = [TextPiece("prompt", "user", text, ("messages", 0))]
        asyncio.run(m._mask(st, pieces, m.recent))
        assert pieces[0].text == "My name is <PERSON>, call <PHONE_NUMBER>"
    assert m.pool.sent == [[text], [text]]  # alice's, then mallory's own


@pytest.mark.parametrize("hidden", [
    "".join(chr(0xE0000 + ord(c)) for c in "Maria Garcia"), "M\u200da\u200dr\u200di\u200da"])
def test_a_name_in_invisible_characters_is_sent(analyzer, hidden):
    """No two letters stand together in the text as it is, yet the view holds a name: sent."""
    assert could_hold_a_value(hidden, SETTINGS.entities)
    pieces = [TextPiece("completion", None, f"It is {hidden}.", ("x", 0))]
    changed, _ = mask(analyzer, pieces)
    assert changed == pieces and hidden not in pieces[0].text
