"""Presidio's phone recogniser with the same matches at a fraction of the cost.

Presidio runs phonenumbers' matcher once per configured region: each run scans the text for
every run of digits and phone punctuation (a date, an IP address, a card number, a version's
`3`), cuts each into inner groups, and parses the candidate and its groups in that region. The
scan and the cuts do not depend on the region: `PhoneScanner` does them once per text and
replays phonenumbers' walk for each region over them (the same candidates in the same order,
the same tries budget), parsing only what can be a number of the region:
- a group with fewer digits than the region's shortest number is none (`min_digits`);
- written without `+` or the region's international prefix, and with nothing but digits and
  phone punctuation, a group is a number of the region only if one of the national significant
  numbers parsing can make of its digits (them, without the country code, without the national
  prefix: `_maybe_strip_national_prefix_carrier_code` itself) is valid in a region of the
  country code by phonenumbers' own type check (`NationalShapes`), and, written without the
  national prefix, its country's format for it does not require one (`prefix_missing`);
- a group written with `+` is parsed once, not once per region: the region is not read;
- a candidate none of whose groups can be a number of any region costs each region its tries
  without a parse.
Where parsing reads more than digits (an extension, letters of a vanity number) the group is
parsed. Property-tested against Presidio's recogniser (tests/test_masking_fastpaths.py).
"""

from __future__ import annotations

import bisect
import functools
import itertools
import re
from dataclasses import dataclass

import phonenumbers
from phonenumbers import PhoneMetadata, normalize_digits_only, parse
from phonenumbers.phonenumbermatcher import (
    _INNER_MATCHES,
    _LEAD_PATTERN,
    _MATCHING_BRACKETS,
    _PATTERN,
    _PUB_PAGES,
    _SECOND_NUMBER_START_PATTERN,
    _SLASH_SEPARATED_DATES,
    _TIME_STAMPS,
    _TIME_STAMPS_SUFFIX,
    _UNWANTED_END_CHAR_PATTERN,
    Leniency,
    PhoneNumberMatcher,
    _formatting_rule_has_first_group_only,
    _verify,
)
from phonenumbers.phonenumberutil import (
    COUNTRY_CODE_TO_REGION_CODE,
    NumberParseException,
)
from phonenumbers.re_util import fullmatch

# No region's numbers are shorter than 4 digits (tests/test_masking_fastpaths.py checks it): a
# candidate with fewer characters a number's digits can come from (digits, letters of a vanity
# number or an extension) is no number, whatever the region.
MIN_DIGITS = 4
PARSABLES = 8192  # groups whose regions and verdicts a scanner keeps, then forgets at once
MAX_TRIES = 65535  # phonenumbers' default: invalid candidates tried before giving up on a text
NOT_ALNUM = re.compile(r"[\W_]+")
NOT_DIGIT = re.compile(r"\D+")
# what a national number written plainly is made of: no `+`, extension, letters or separators
# that parsing reads as more than punctuation
PLAIN = re.compile(r"[\d\s().\-/\[\]]+")
FIRST = re.compile(r"[+\uff0b\d]")  # where parsing starts reading a number
# what phonenumbers' inner matches (`_INNER_MATCHES`: `/`, `(`, a space, `-`, a dash, `.`) and
# its date and time-stamp checks (`/`, a space) each need one of: a candidate without any (most
# of a text's: `2024`, `15`, `5551234567`) has no inner group and is neither
CUTS = re.compile(r"[\s/(.\-\u2012-\u2015\uff0d]")


def _regions(cc: int) -> list:
    return [PhoneMetadata.metadata_for_region_or_calling_code(cc, r)
            for r in COUNTRY_CODE_TO_REGION_CODE[cc]]


TYPES = ("premium_rate", "toll_free", "shared_cost", "voip", "personal_number", "pager", "uan",
         "voicemail", "fixed_line", "mobile")


def _types(md) -> list:
    """The region's number types that have numbers (a pattern)."""
    return [d for d in (getattr(md, t) for t in TYPES) if d is not None
            and d.national_number_pattern and d.possible_length != (-1,)]


def _added_digits(md) -> int:
    """Digits the region's national-prefix rewrite may add (Antigua's 7 digits get 268)."""
    return len(re.sub(r"\\\d", "", md.national_prefix_transform_rule or ""))


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
    code: one of the national significant numbers parsing can make of its digits is valid in a
    region of the country code (a possible length, the general pattern, a type's pattern)."""

    def __init__(self, region: str):
        md = PhoneMetadata.metadata_for_region(region)
        self.usable = md is not None and md.international_prefix is not None
        if not self.usable:
            return
        regions = _regions(md.country_code)
        main = PhoneMetadata.metadata_for_region(COUNTRY_CODE_TO_REGION_CODE[md.country_code][0])
        if any(r is None or not r.general_desc.possible_length or not
               r.general_desc.national_number_pattern for r in regions) or main is None:
            self.usable = False
            return
        # parsing strips national prefixes by the region's metadata, or the main region's
        # of its country code once the code was read from the digits (CA's number -> US)
        self.metadata = (md,) if main is md else (md, main)
        self.cc = str(md.country_code)
        self.international = re.compile(md.international_prefix)
        by_length: dict[int, list[str]] = {}  # length -> per region: general and a type
        for r in regions:
            for n in r.general_desc.possible_length:
                if n > 0 and (types := [d.national_number_pattern for d in _types(r)
                                        if not d.possible_length or n in d.possible_length]):
                    by_length.setdefault(n, []).append(
                        f"(?=(?:{r.general_desc.national_number_pattern})\\Z)"
                        f"(?:{'|'.join(f'(?:{t})' for t in types)})")
        # a national number valid in a region of the country code matches its length's shape:
        # the general pattern and a type's (phonenumbers' `_number_type_helper`, in one regex
        # per length; digits are ASCII; no shape looks behind or anchors)
        self.by_length = {n: re.compile("|".join(f"(?:{a})" for a in alternatives))
                          for n, alternatives in by_length.items()}
        # without a rewrite rule, parsing only strips leading digits: a number is an ending,
        # and no shorter than the digits without the country code and a national prefix twice
        # (`national_numbers`; a prefix pattern's widest match: no bound if it has none)
        self.endings = not any(m.national_prefix_transform_rule for m in self.metadata)
        self.stripped = len(self.cc) + 2 * max(
            (re._parser.parse(m.national_prefix_for_parsing).getwidth()[1]
             for m in self.metadata if m.national_prefix_for_parsing), default=0)
        self.lengths = sorted(self.by_length)
        # phonenumbers' patterns compiled once here: its `re_compile` is a dict lookup and
        # an isinstance per use, and `national_numbers` and `prefix_missing` use dozens
        self.prefixes = [Prefix(re.compile(m.national_prefix_for_parsing),
                                m.national_prefix_transform_rule,
                                re.compile(m.general_desc.national_number_pattern))
                         for m in self.metadata if m.national_prefix_for_parsing]
        # the country's formats, what the national-prefix check formats with, in its order:
        # (the last leading-digits pattern or None, the pattern, whether it requires a prefix)
        self.formats = [(re.compile(f.leading_digits_pattern[-1])
                         if f.leading_digits_pattern else None, re.compile(f.pattern),
                         bool(f.national_prefix_formatting_rule)
                         and not f.national_prefix_optional_when_formatting
                         and not _formatting_rule_has_first_group_only(
                             f.national_prefix_formatting_rule))
                        for f in main.number_format]

    def national_numbers(self, digits: str) -> set[str]:
        """Every national significant number parsing may make of `digits` (a superset): them
        or them without the country code, then without a national prefix, at most twice."""
        out = {digits}
        if digits.startswith(self.cc):
            out.add(digits[len(self.cc):])
        for _ in range(2):
            out |= {stripped for n in out for prefix in self.prefixes
                    if (stripped := prefix.strip(n)) is not None}
        return out

    @functools.lru_cache(maxsize=4096)  # noqa: B019 (one per region, for the process's life)
    def hopeless(self, digits: str) -> bool:
        """`digits`, of a candidate written plainly, are no number of the region."""
        if not self.usable or self.international.match(digits):
            return False
        if self.endings and not self.an_ending_shaped(digits):
            return True
        return (not any(map(self.shaped, self.national_numbers(digits)))
                or self.prefix_missing(digits))

    def shaped(self, number: str) -> bool:
        """`number` (ASCII digits) is valid in a region of the country code."""
        pattern = self.by_length.get(len(number))
        return pattern is not None and pattern.fullmatch(number) is not None

    def an_ending_shaped(self, digits: str) -> bool:
        """An ending of `digits` parsing could make a national number of (at most `stripped`
        digits shorter) is `shaped`: a superset of `national_numbers`' tests, one regex per
        length of the region's numbers within those bounds (none if no length is)."""
        size = len(digits)
        return any(self.by_length[n].fullmatch(digits[size - n:]) is not None
                   for n in self.lengths if size - self.stripped <= n <= size)

    def prefix_missing(self, digits: str) -> bool:
        """Leniency VALID's `_is_national_prefix_present_if_required` fails whatever parsing
        makes of `digits` (written plainly, no international prefix): they start with neither
        the country code nor a national prefix (parsing reads them whole as the national
        number, FROM_DEFAULT_COUNTRY) nor 0 (a leading zero that is part of it), and the
        country's format for that number writes a national prefix it may not omit. Most of a
        text's digit runs in Germany (`0$1` formats): 9 in 10 of the groups DE parsed."""
        if digits[:1] == "0" or digits.startswith(self.cc) or any(
                prefix.strip(digits) is not None for prefix in self.prefixes):
            return False
        # `_choose_formatting_pattern_for_number`: the first format that fits the number
        for leading, pattern, required in self.formats:
            if (leading is None or leading.match(digits)) and pattern.fullmatch(digits):
                return required
        return False


@dataclass(frozen=True)
class Prefix:
    """A region's national prefix as parsing strips it, its patterns compiled once."""

    pattern: re.Pattern  # national_prefix_for_parsing
    rule: str | None  # national_prefix_transform_rule
    general: re.Pattern  # the general description's national number pattern

    def strip(self, number: str) -> str | None:
        """What `_maybe_strip_national_prefix_carrier_code(number, metadata)` returns as the
        number when it strips a prefix (its third value true), else None."""
        m = self.pattern.match(number)
        if m is None:
            return None
        if self.rule and m.groups()[-1] is not None:  # (raises where phonenumbers raises)
            stripped = self.pattern.sub(self.rule, number, count=1)
        else:
            stripped = number[m.end():]
        # a number that was viable is kept whole if stripping makes it no longer so
        if self.general.fullmatch(number) and not self.general.fullmatch(stripped):
            return None
        return stripped


@dataclass(frozen=True)
class Region:
    code: str
    bounds: tuple[int, int]  # fewest alphanumerics of a (national, international) group
    shapes: NationalShapes


def _international(candidate: str) -> bool:
    """Written with `+`: parsing reads from the first `+` or digit."""
    first = FIRST.search(candidate)
    return first is not None and not first.group().isdigit()


@functools.lru_cache(maxsize=PARSABLES)  # (asked of a group once per region)
def _known_country_code(group: str) -> bool:
    """Written with `+` and a country code: parsing does not read the region (it does, as a
    national number, when the digits after `+` start with no country code)."""
    if not _international(group):
        return False
    digits = normalize_digits_only(group)
    return digits[:1] != "0" and any(int(digits[:n] or 0) in COUNTRY_CODE_TO_REGION_CODE for n in (1, 2, 3))


def _trim(pattern: re.Pattern, candidate: str) -> str:
    m = pattern.search(candidate)
    return candidate[:m.start()] if m else candidate


class _Text:
    """One text's candidates, their groups and their parses, shared by the regions' walks."""

    def __init__(self, scanner: PhoneScanner, text: str):
        self.scanner = scanner
        self.text = text
        self.found: dict[int, tuple[int, str] | None] = {}  # search index -> (start, candidate)
        self.steps: dict[tuple, list | None] = {}  # (start, candidate) -> its groups or None
        self.lives: dict[tuple, tuple[frozenset, int]] = {}  # (start, candidate) -> `live`

    def candidate(self, index: int) -> tuple[int, str] | None:
        if index not in self.found:
            m = _PATTERN.search(self.text, index)
            self.found[index] = None if m is None else (
                m.start(), _trim(_SECOND_NUMBER_START_PATTERN, m.group()))
        return self.found[index]

    def groups(self, start: int, candidate: str) -> list | None:
        """What `_extract_match` tries, in its order: the candidate, then per inner pattern its
        matches as (the text before the first one or None, the group, its offset). None: a date
        or a timestamp, tried no further."""
        key = (start, candidate)
        if key in self.steps:
            return self.steps[key]
        steps = None
        if not CUTS.search(candidate):
            steps = []
        elif not _SLASH_SEPARATED_DATES.search(candidate) and not (
                _TIME_STAMPS.search(candidate)
                and _TIME_STAMPS_SUFFIX.match(self.text, start + len(candidate))):
            steps = []
            for pattern in _INNER_MATCHES:
                m = pattern.search(candidate)
                first = True
                while m:
                    before = (_trim(_UNWANTED_END_CHAR_PATTERN, candidate[:m.start()])
                              if first else None)
                    steps.append((before, _trim(_UNWANTED_END_CHAR_PATTERN, m.group(1)),
                                  start + m.start(1), first))
                    first = False
                    m = pattern.search(candidate, m.start() + 1)
        self.steps[key] = steps
        return steps

    def may_parse(self, group: str, k: int) -> bool:
        return k in self.scanner.parsable(group)

    def live(self, start: int, candidate: str) -> tuple[frozenset, int]:
        """(the regions #k in which some group of the candidate may be a number, the tries its
        inner groups cost a region in which none is)."""
        key = (start, candidate)
        if key not in self.lives:
            steps = self.groups(start, candidate)
            if steps is None:  # a date or a timestamp: not tried
                self.lives[key] = (frozenset(), 0)
                return self.lives[key]
            cost = sum(2 if first else 1 for *_, first in steps)
            if len(NOT_ALNUM.sub("", candidate)) < self.scanner.fewest:  # nor any group in it
                self.lives[key] = (frozenset(), cost)
                return self.lives[key]
            self.lives[key] = (self.scanner.parsable(candidate).union(*(
                self.scanner.parsable(g) for before, group, _, _ in steps
                for g in (before, group) if g is not None)), cost)
        return self.lives[key]

    def valid(self, group: str, offset: int, k: int) -> bool:
        """phonenumbers' `_parse_and_verify` of `group` at `offset` in region #k: its
        neighbours in this text, then the group itself (`PhoneScanner.verified`)."""
        if not self.may_parse(group, k):
            return False
        text = self.text
        if offset > 0 and not _LEAD_PATTERN.match(group) and _bad_neighbour(text[offset - 1]):
            return False
        end = offset + len(group)
        if end < len(text) and _bad_neighbour(text[end]):
            return False
        return self.scanner.verified(group, self.scanner.regions[k].code)


def _parse_and_verify(group: str, region: str) -> bool:
    if not fullmatch(_MATCHING_BRACKETS, group) or _PUB_PAGES.search(group):
        return False
    try:
        number = parse(group, region, keep_raw_input=True)
    except NumberParseException:
        return False
    return _verify(Leniency.VALID, number, group, None)


def _bad_neighbour(char: str) -> bool:
    return (PhoneNumberMatcher._is_invalid_punctuation_symbol(char)
            or PhoneNumberMatcher._is_latin_letter(char))


class PhoneScanner:
    """phonenumbers' matches (leniency VALID) in each of `regions`, as (start, end, region)."""

    def __init__(self, regions: tuple[str, ...]):
        phonenumbers.enable_pattern_cache()  # its metadata's patterns overflow `re`'s cache
        self.regions = [Region(r, min_digits(r)[::-1], NationalShapes(r)) for r in regions]
        self.fewest = min((b for r in self.regions for b in r.bounds), default=MIN_DIGITS)
        self.parsables: dict[str, frozenset[int]] = {}  # group -> `parsable`
        self.verdicts: dict[tuple[str, str], bool] = {}  # (group, region or "") -> `verified`

    def parsable(self, group: str) -> frozenset[int]:
        """The regions #k in which `group` may be a number (by its shape alone, not where it
        stands: kept across texts, the same groups recur, dates and versions above all)."""
        regions = self.parsables.get(group)
        if regions is None:
            if len(self.parsables) >= PARSABLES:
                self.parsables.clear()
            international = _international(group)
            digits = None
            if not international and PLAIN.fullmatch(group):
                digits = NOT_DIGIT.sub("", group)
                if not digits.isascii():  # another script's digits
                    digits = normalize_digits_only(digits)
            alnum = len(NOT_ALNUM.sub("", group))
            regions = self.parsables[group] = frozenset(
                k for k, region in enumerate(self.regions)
                if alnum >= region.bounds[international]
                and (digits is None or not region.shapes.hopeless(digits)))
        return regions

    def verified(self, group: str, region: str) -> bool:
        """The rest of `_parse_and_verify` (its checks of the group alone, the parse, leniency
        VALID's verification), which reads nothing but the group and the region (none for a
        group with `+` and a country code): kept across texts like `parsable` (dates, years,
        versions and the same numbers recur; a parse is ~15-40 us)."""
        key = (group, "" if _known_country_code(group) else region)
        verdict = self.verdicts.get(key)
        if verdict is None:
            if len(self.verdicts) >= PARSABLES:
                self.verdicts.clear()
            verdict = self.verdicts[key] = _parse_and_verify(group, region)
        return verdict

    def matches(self, text: str) -> list[tuple[int, int, str]]:
        t = _Text(self, text)
        # the candidates a region meets while it matches nothing, each one's search index; a
        # region skips those in which it has no group to parse (their tries at once)
        chain = []
        index = 0
        while (c := t.candidate(index)) is not None and c[1]:
            chain.append((index, *c, *t.live(*c)))
            index = c[0] + len(c[1])
        at = {entry[0]: p for p, entry in enumerate(chain)}
        spent = list(itertools.accumulate((entry[4] + 1 for entry in chain), initial=0))
        out = []
        for k, region in enumerate(self.regions):
            lives = [p for p, entry in enumerate(chain) if k in entry[3]]
            index, tries = 0, MAX_TRIES
            while True:
                p = at.get(index)
                if p is not None:
                    i = bisect.bisect_left(lives, p)
                    q = lives[i] if i < len(lives) else len(chain)
                    if tries > spent[q] - spent[p]:  # the budget lasts: skip them
                        tries -= spent[q] - spent[p]
                        if q == len(chain):
                            break
                        index = chain[q][0]
                c = t.candidate(index)
                if c is None or not c[1] or tries <= 0:
                    break
                start, candidate = c
                match, tries = self._extract(t, k, start, candidate, tries)
                if match is not None:
                    out.append((*match, region.code))
                    index = match[1]
                else:
                    tries -= 1
                    index = start + len(candidate)
        return out

    def _extract(self, t: _Text, k: int, start: int, candidate: str, tries: int):
        live, cost = t.live(start, candidate)
        if k not in live and tries > cost:
            return None, tries - cost
        steps = t.groups(start, candidate)
        if steps is None:
            return None, tries
        if t.valid(candidate, start, k):
            return (start, start + len(candidate)), tries
        for before, group, offset, first in steps:
            if tries <= 0:  # phonenumbers checks its budget before each inner match
                break
            if first:
                if t.valid(before, start, k):
                    return (start, start + len(before)), tries
                tries -= 1
            if t.valid(group, offset, k):
                return (offset, offset + len(group)), tries
            tries -= 1
        return None, tries


def phone_recognizer(regions: tuple[str, ...]):
    from presidio_analyzer import EntityRecognizer
    from presidio_analyzer.predefined_recognizers import PhoneRecognizer

    scanner = PhoneScanner(regions)

    class FastPhoneRecognizer(PhoneRecognizer):
        def analyze(self, text, entities, nlp_artifacts=None):
            return EntityRecognizer.remove_duplicates([
                self._get_recognizer_result(_Match(start, end), text, region, nlp_artifacts)
                for start, end, region in scanner.matches(text)])

    return FastPhoneRecognizer(supported_regions=regions)


@dataclass(frozen=True)
class _Match:
    start: int
    end: int
