"""The phone matcher's cheap checks of a digit group (masking/phone.py `NationalShapes`) decide
what the checks they stand for decide: a group they call hopeless is one phonenumbers' own
functions make no number of the region, and the matcher finds the same numbers with them as
with those functions (properties over generated digit strings and texts, and the corpus)."""

from __future__ import annotations

import random
import re
import sys
from pathlib import Path

import pytest
from phonenumbers.phonenumbermatcher import _formatting_rule_has_first_group_only
from phonenumbers.phonenumberutil import (
    _choose_formatting_pattern_for_number,
    _maybe_strip_national_prefix_carrier_code,
)

from douane.masking import phone
from douane.masking.config import DEFAULT_PHONE_REGIONS

sys.path.insert(0, str(Path(__file__).parent.parent / "scripts"))
from masking_corpus import corpus  # noqa: E402

# the default regions, and regions with national-prefix rewrites (AG, AR, BR), wide national
# prefixes (GB's 180020, AU's 1831, JP's), other lengths (CN, RU)
REGIONS = (*DEFAULT_PHONE_REGIONS, "AG", "AR", "JP", "CN", "RU")
# how digit groups start: trunk and international prefixes, country codes, carrier codes
STARTS = ["", "", "", "0", "00", "000", "1", "011", "0011", "0049", "180020", "1831", "1832",
          "90", "015", "0800", "44", "49", "33", "55", "91", "34", "39", "31", "61", "52", "54",
          "81", "86", "7", "8", "9", "268", "0203", "03", "06", "07", "2", "5"]


class Unfiltered:
    """`NationalShapes.hopeless` as phonenumbers' own functions decide it: every national
    number `_maybe_strip_national_prefix_carrier_code` can make, each tried against the shape,
    and the national-prefix check by `_choose_formatting_pattern_for_number`; no bound on
    lengths, no ending tried first."""

    def __init__(self, shapes: phone.NationalShapes, region: str):
        self.shapes = shapes
        md = phone.PhoneMetadata.metadata_for_region(region)
        main = phone.PhoneMetadata.metadata_for_region(
            phone.COUNTRY_CODE_TO_REGION_CODE[md.country_code][0])
        self.metadata = (md,) if main is md else (md, main)
        self.formats = main.number_format

    def national_numbers(self, digits: str) -> set[str]:
        out = {digits}
        if digits.startswith(self.shapes.cc):
            out.add(digits[len(self.shapes.cc):])
        for _ in range(2):
            out |= {_maybe_strip_national_prefix_carrier_code(n, md)[1]
                    for n in out for md in self.metadata}
        return out

    def prefix_missing(self, digits: str) -> bool:
        if digits[:1] == "0" or digits.startswith(self.shapes.cc) or any(
                _maybe_strip_national_prefix_carrier_code(digits, md)[2]
                for md in self.metadata):
            return False
        rule = _choose_formatting_pattern_for_number(self.formats, digits)
        return (rule is not None and bool(rule.national_prefix_formatting_rule)
                and not rule.national_prefix_optional_when_formatting
                and not _formatting_rule_has_first_group_only(
                    rule.national_prefix_formatting_rule))

    def hopeless(self, digits: str) -> bool:
        shapes = self.shapes
        if not shapes.usable or shapes.international.match(digits):
            return False
        return (not any(map(shapes.shaped, self.national_numbers(digits)))
                or self.prefix_missing(digits))


def _digits(rng: random.Random) -> str:
    return rng.choice(STARTS) + "".join(rng.choice("0123456789")
                                        for _ in range(rng.randint(0, 18)))


def _corpus_digits() -> list[str]:
    runs = (re.sub(r"\D", "", m) for item in corpus(200, seed=2)
            for m in re.findall(r"[\d().\-/ ]{3,}", item.text))
    return sorted({d for d in runs if d})


@pytest.mark.slow
def test_the_cheap_checks_call_hopeless_only_what_phonenumbers_makes_no_number():
    """Over 100,000 generated digit strings (every region's prefixes, 1-22 digits) and the
    corpus's digit runs, in 17 regions: the same verdict as `Unfiltered`, both ways (a group
    called hopeless that is a number would be lost; one not called hopeless that is none costs
    a parse), and both verdicts occur."""
    rng = random.Random(20261202)
    strings = [_digits(rng) for _ in range(100_000)] + _corpus_digits()
    for region in REGIONS:
        shapes = phone.NationalShapes(region)
        unfiltered = Unfiltered(shapes, region)
        verdicts = set()
        for d in strings:
            verdict = unfiltered.hopeless(d)
            assert shapes.hopeless.__wrapped__(shapes, d) == verdict, (region, d)
            verdicts.add(verdict)
        assert verdicts == {True, False}, region


def _text(rng: random.Random) -> str:
    """Numbers in many formats (international, national, separators, brackets, extensions)
    among words, dates and amounts."""
    pieces = []
    for _ in range(rng.randint(1, 8)):
        digits = _digits(rng)
        cut = sorted(rng.sample(range(1, len(digits)), min(max(len(digits) - 1, 0),
                                                           rng.randint(0, 3))))
        groups = [digits[a:b] for a, b in zip([0, *cut], [*cut, len(digits)], strict=True)]
        sep = rng.choice([" ", "-", ".", "", "/", " - "])
        number = rng.choice(["", "", "+", "(", "tel:"]) + sep.join(g for g in groups if g)
        if rng.random() < 0.15:
            number += rng.choice([" ext. ", " x", " #", ";ext="]) + str(rng.randint(1, 9999))
        if rng.random() < 0.15:
            number = rng.choice(["(", "["]) + number + rng.choice([")", "]"])
        pieces += [number, rng.choice([" ", ", ", "\n", ": ", " and ", " on 2024-05-01 ",
                                       " call ", " ref ", "% ", " $"])]
    return "".join(pieces)


@pytest.mark.slow
def test_the_matcher_with_the_cheap_checks_finds_what_it_finds_without_them():
    """The matcher itself, its `hopeless` the cheap checks' or `Unfiltered`'s: the same
    matches over 6,000 generated texts and the corpus, many of them numbers."""
    rng = random.Random(17)
    texts = [_text(rng) for _ in range(6000)] + [item.text for item in corpus(400, seed=2)]
    filtered = phone.PhoneScanner(DEFAULT_PHONE_REGIONS)
    unfiltered = phone.PhoneScanner(DEFAULT_PHONE_REGIONS)
    for region in unfiltered.regions:
        reference = Unfiltered(region.shapes, region.code)
        # on the instance: the class's cached `hopeless` serves the filtered scanner
        object.__setattr__(region, "shapes", _Shapes(region.shapes, reference))
    found = 0
    for text in texts:
        expected = unfiltered.matches(text)
        assert filtered.matches(text) == expected, text
        found += len(expected)
    assert found > 1000


class _Shapes:
    """A region's shapes whose `hopeless` is `Unfiltered`'s."""

    def __init__(self, shapes: phone.NationalShapes, reference: Unfiltered):
        self.shapes, self.hopeless = shapes, reference.hopeless

    def __getattr__(self, name):
        return getattr(self.shapes, name)


def _all_groups(text: phone._Text, start: int, candidate: str) -> list | None:
    """`_Text.groups` without its shortcut for a candidate nothing cuts."""
    saved = phone.CUTS
    phone.CUTS = re.compile("")  # (matches every candidate)
    try:
        return text.groups(start, candidate)
    finally:
        phone.CUTS = saved


def test_a_candidate_without_cuts_has_no_inner_group():
    """`CUTS` holds every character an inner match or the date and time-stamp checks need:
    for each character of the BMP that `CUTS` lacks, no inner pattern and no date check
    matches a candidate made of it and digits; and over random candidates dense in phone
    punctuation, dashes, spaces and dots, `groups` is what it is without the shortcut."""
    for code in range(0x10000):
        char = chr(code)
        if phone.CUTS.search(char):
            continue
        for candidate in (f"12{char}34", f"{char}1{char}{char}2", f"2024{char}05{char}01"):
            assert not any(p.search(candidate) for p in phone._INNER_MATCHES), hex(code)
            assert not phone._SLASH_SEPARATED_DATES.search(candidate), hex(code)
            assert not phone._TIME_STAMPS.search(candidate), hex(code)
    rng = random.Random(5)
    alphabet = "0123456789" * 3 + " -./()[]+x#,\u2012\u2013\u2014\u2015\uff0d\u00a0\u2009\t:"
    scanner = phone.PhoneScanner(("US",))
    shortcut = 0
    for _ in range(20_000):
        candidate = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 14)))
        text = phone._Text(scanner, candidate + " 12")
        expected = _all_groups(phone._Text(scanner, candidate + " 12"), 0, candidate)
        assert text.groups(0, candidate) == expected, candidate
        shortcut += not phone.CUTS.search(candidate)
    assert shortcut > 1000
