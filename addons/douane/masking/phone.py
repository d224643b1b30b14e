"""Presidio's phone recogniser with the same matches at a fraction of the cost.

Its matcher (phonenumbers') takes every run of digits and phone punctuation in the text as a
candidate (a date, an IP address, a card number, a version's `3`) and parses it, then parts of
it, in each configured region: most of what stock Presidio spends on a text. A candidate is
dropped before it is parsed when no number of the region can come from it:
- it has fewer digits than the region's shortest number (`min_digits`);
- written without `+` or the region's international prefix, and with nothing but digits and
  phone punctuation, no ending of its digits is shaped like a national number of the region's
  country code (`NationalShapes`): parsing a national number only strips leading digits (a
  national prefix, the country code), so a valid number is such an ending.
And a candidate written with `+` is parsed once, not once per region: the region is not read.
Where parsing may rewrite digits (a national prefix turned into an area code) or read more than
digits (an extension, letters of a vanity number) the candidate is parsed. Property-tested
against Presidio's recogniser (tests/test_masking_fastpaths.py).
"""

from __future__ import annotations

import re

from phonenumbers import PhoneMetadata, normalize_digits_only
from phonenumbers.phonenumbermatcher import PhoneNumberMatcher
from phonenumbers.phonenumberutil import COUNTRY_CODE_TO_REGION_CODE

# No region's numbers are shorter than 4 digits (tests/test_masking_fastpaths.py checks it): a
# candidate with fewer characters a number's digits can come from (digits, letters of a vanity
# number or an extension) is no number, whatever the region.
MIN_DIGITS = 4
NOT_ALNUM = re.compile(r"[\W_]+")
NOT_DIGIT = re.compile(r"\D+")
# what a national number written plainly is made of: no `+`, extension, letters or separators
# that parsing reads as more than punctuation
PLAIN = re.compile(r"[\d\s().\-/\[\]]+")
FIRST = re.compile(r"[+\uff0b\d]")  # where parsing starts reading a number


def _added_digits(md) -> int:
    """Digits the region's national-prefix rewrite may add (Antigua's 7 digits get 268)."""
    return len(re.sub(r"\\\d", "", md.national_prefix_transform_rule or ""))


def _regions(cc: int) -> list:
    return [PhoneMetadata.metadata_for_region_or_calling_code(cc, r)
            for r in COUNTRY_CODE_TO_REGION_CODE[cc]]


def _shortest(cc: int) -> int:
    lengths = [1]
    for md in _regions(cc):
        if md is None:
            return 1
        lengths += [n - _added_digits(md) for n in md.general_desc.possible_length if n > 0]
    return min(lengths[1:] or lengths)


def min_digits(region: str) -> tuple[int, int]:
    """(fewest digits of a number written with `+`, fewest of one written otherwise in `region`):
    an international number holds a country code and a national number; a national one, one of
    its country code's national numbers (any region of it: +1 is the US and Canada's), or the
    region's international prefix and an international number."""
    international = max(MIN_DIGITS, min(len(str(cc)) + _shortest(cc)
                                        for cc in COUNTRY_CODE_TO_REGION_CODE))
    md = PhoneMetadata.metadata_for_region(region)
    if md is None or not md.international_prefix:
        return international, MIN_DIGITS
    prefix = re._parser.parse(md.international_prefix).getwidth()[0]  # its shortest match
    return international, max(MIN_DIGITS, min(_shortest(md.country_code),
                                              prefix + international))


class NationalShapes:
    """Whether a plainly written candidate could be a national number of `region`'s country
    code: an ending of its digits of a possible length matching that length's pattern (the
    union over the country code's regions). None where parsing may rewrite digits."""

    def __init__(self, region: str):
        md = PhoneMetadata.metadata_for_region(region)
        self.usable = md is not None and md.international_prefix is not None
        if not self.usable:
            return
        regions = _regions(md.country_code)
        main = PhoneMetadata.metadata_for_region(COUNTRY_CODE_TO_REGION_CODE[md.country_code][0])
        if any(r is None or not r.general_desc.possible_length or not
               r.general_desc.national_number_pattern for r in regions) \
                or _added_digits(md) or main is None or _added_digits(main):
            self.usable = False
            return
        self.international = re.compile(md.international_prefix)
        by_length: dict[int, list[str]] = {}
        for r in regions:
            for n in r.general_desc.possible_length:
                if n > 0:
                    by_length.setdefault(n, []).append(r.general_desc.national_number_pattern)
        self.shapes = [(n, re.compile("|".join(f"(?:{p})" for p in patterns)))
                       for n, patterns in sorted(by_length.items())]

    def hopeless(self, candidate: str) -> bool:
        if not self.usable or PLAIN.fullmatch(candidate) is None:
            return False
        digits = NOT_DIGIT.sub("", candidate)
        if not digits.isascii():  # another script's digits
            digits = normalize_digits_only(digits)
        if self.international.match(digits):
            return False
        return not any(n <= len(digits) and shape.fullmatch(digits[-n:])
                       for n, shape in self.shapes)


class Matcher(PhoneNumberMatcher):
    """phonenumbers' matcher for one region, dropping hopeless candidates unparsed."""

    bounds = (MIN_DIGITS, MIN_DIGITS)  # (national, international): `min_digits` reversed
    shapes: NationalShapes
    international: dict  # (offset, candidate) -> match, for candidates written with `+`

    def _short(self, candidate: str) -> bool:
        return len(NOT_ALNUM.sub("", candidate)) < self.bounds[_international(candidate)]

    # a candidate, then (if it fails) the inner candidates it holds
    def _extract_match(self, candidate, offset):
        return None if self._short(candidate) else super()._extract_match(candidate, offset)

    def _parse_and_verify(self, candidate, offset):
        if self._short(candidate) or self.shapes.hopeless(candidate):
            return None
        if not _international(candidate):
            return super()._parse_and_verify(candidate, offset)
        key = (offset, candidate)
        if key not in self.international:
            self.international[key] = super()._parse_and_verify(candidate, offset)
        return self.international[key]


def _international(candidate: str) -> bool:
    """Written with `+`: parsing reads from the first `+` or digit."""
    first = FIRST.search(candidate)
    return first is not None and not first.group().isdigit()


def phone_recognizer(regions: tuple[str, ...]):
    from presidio_analyzer import EntityRecognizer
    from presidio_analyzer.predefined_recognizers import PhoneRecognizer

    matchers = {r: type(f"Matcher{r}", (Matcher,), {"bounds": min_digits(r)[::-1],
                                                    "shapes": NationalShapes(r)})
                for r in regions}

    class FastPhoneRecognizer(PhoneRecognizer):
        def analyze(self, text, entities, nlp_artifacts=None):
            international: dict = {}
            results = []
            for region in self.supported_regions:
                matcher = matchers[region](text, region, leniency=self.leniency)
                matcher.international = international
                results += [self._get_recognizer_result(match, text, region, nlp_artifacts)
                            for match in matcher]
            return EntityRecognizer.remove_duplicates(results)

    return FastPhoneRecognizer(supported_regions=regions)
