"""Text as a rule should see it: obfuscation folded away before matching.

`normalize` maps each character through one table built at import (or read from where the last
build left it, see `_cached_table`), so a text is folded in a single `str.translate` pass (ASCII
text takes CPython's fast path):
- compatibility decomposition (NFKD: full-width, mathematical, circled and parenthesised
  letters, ligatures), then every combining mark removed (accents, U+0336 strike-through, ...);
- case folding;
- look-alike letters and digits folded to the ASCII ones they imitate, from Unicode's confusables
  data (TR39, as shipped by `confusable-homoglyphs`): Cyrillic, Greek, Armenian, Cherokee, Lisu,
  Coptic, ...; Latin letters the data leaves out (small capitals, letters with a stroke) and
  regional indicator letters fall back to their `anyascii` transliteration;
- decimal digits of every script to ASCII digits;
- tag characters (U+E0020-E007E) decoded to the ASCII they encode, so a phrase smuggled as tags
  is read (`unseen` reads a text holding tags without them); other invisible characters (format characters: zero-width, bidi, soft hyphen;
  variation selectors, which are marks; control characters) removed;
- blank-looking characters that are not whitespace (U+2800, Hangul fillers) made spaces, and
  whitespace collapsed.

`skeleton` then gives what literal rules are also matched on: the normalised text with
separators and punctuation removed and leetspeak read as letters.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import hashlib
import html
import importlib.util
import json
import os
import re
import sys
import unicodedata
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import anyascii as anyascii_package
import confusable_homoglyphs
from anyascii import anyascii
from confusable_homoglyphs.confusables import confusables_data

from douane.protocols import fields

# Shown as nothing or a blank space, yet neither whitespace nor a format character.
BLANKS = "\u115f\u1160\u2800\u3164\uffa0"
TAGS = range(0xE0000, 0xE0080)
# Letters the confusables data leaves out, read by their transliteration: Latin ones (small
# capitals, letters with a stroke, negative circled and squared letters) and regional indicators
TRANSLITERATED = re.compile(r"\bLATIN |^REGIONAL INDICATOR SYMBOL LETTER")
SMALL_CAPITAL = re.compile(r"LATIN LETTER SMALL CAPITAL [A-Z]$")
SMALL_CAPITAL_SCRIPTS = ("CYRILLIC SMALL LETTER", "GREEK SMALL LETTER", "CHEROKEE SMALL LETTER")
# Code points worth a table entry: everything but the unified CJK ideographs and Hangul
# syllables (whose NFKD is jamo: a Korean rule keeps matching Korean text).
SCANNED = (range(0x0000, 0x3400), range(0xA000, 0xAC00), range(0xD7B0, 0x20000),
           range(0x2F800, 0x2FA20), range(0xE0000, 0xE01F0))


def _visual(c: str, depth: int) -> str | None:
    """The ASCII letter or digit (or, for a symbol, character) that `c` imitates, per the
    confusables data, else None. A target may itself need folding (marks, a Latin small capital);
    a small Cyrillic, Greek or Cherokee letter that has no look-alike imitates what its capital
    imitates (`м` of `М`: their small letters are small capitals)."""
    alnum = unicodedata.category(c)[0] in "LN"
    best = None
    for entry in confusables_data.get(c, ()):
        target = entry["c"]
        if not target.isascii():
            if depth >= 2 or not all(SMALL_CAPITAL.match(unicodedata.name(t, "")) or
                                     unicodedata.category(t)[0] == "M" or t.isascii()
                                     for t in target):
                continue
            target = "".join(_fold(t, depth + 1) for t in target)
        if not target or not target.isascii() or (alnum and not target.isalnum()):
            continue
        # a capital imitates a capital (Cyrillic І is I, not the l it also resembles)
        rank = (target.islower() != c.islower(), not target.isalpha(), len(target), target)
        if best is None or rank < best[0]:
            best = (rank, target)
    if best is None and depth == 0 and len(c.upper()) == 1 and c != c.upper() and \
            unicodedata.name(c, "").startswith(SMALL_CAPITAL_SCRIPTS):
        return _visual(c.upper(), depth + 1)
    if best is None:
        return None
    # TR39 reads capital I as l: a capital imitating l imitates I (Cyrillic І, Greek Ι)
    return "i" if best[1] == "l" and c.isupper() else best[1].lower()


def _fold(c: str, depth: int = 0) -> str:
    """One character as rules see it (see the module docstring)."""
    cp = ord(c)
    if cp in TAGS:
        return chr(cp - 0xE0000).lower() if 0x20 <= cp - 0xE0000 < 0x7F else ""
    if c in BLANKS:
        return " "
    category = unicodedata.category(c)
    if category[0] == "M" or category == "Cf" or (category == "Cc" and not c.isspace()):
        return ""
    if c.isascii():
        return c.lower()
    if category == "Nd":
        return str(unicodedata.decimal(c))
    # A styled or full-width form of an ASCII letter or digit is that letter (its compatibility
    # decomposition says so exactly: the confusables data reads a full-width I as l, which
    # turned "Ｉgnore previous instructions" into "lgnore ...").
    decomposed = unicodedata.normalize("NFKD", c)
    if len(decomposed) == 1 and decomposed.isascii() and decomposed.isalnum():
        return decomposed.lower()
    # a look-alike letter first (before case folding: a capital eta imitates H, its small form
    # n), then the compatibility decomposition (styled letters, ligatures, letters with marks)
    visual = _visual(c, depth)
    if visual is not None and len(visual) == 1:
        return visual
    if decomposed != c and depth < 4:
        return "".join(_fold(d, depth + 1) for d in decomposed)
    if visual is not None:
        return visual
    folded = c.casefold()
    if folded != c and depth < 4:
        return "".join(_fold(d, depth + 1) for d in folded)
    if TRANSLITERATED.search(unicodedata.name(c, "")):
        ascii_ = anyascii(c).lower()
        if ascii_.isalnum():
            return ascii_
    return c


def _table() -> dict[int, str]:
    table = {}
    for block in SCANNED:
        for cp in block:
            c = chr(cp)
            category = unicodedata.category(c)
            # unassigned, private, surrogates; and most of the 30,000 letters and symbols of other
            # scripts: nothing to fold (a quick exit keeps the import short)
            if category in ("Cn", "Co", "Cs") or (
                    category in ("Lo", "So") and c not in confusables_data and c not in BLANKS
                    and unicodedata.is_normalized("NFKD", c)
                    and not TRANSLITERATED.search(unicodedata.name(c, ""))):
                continue
            folded = _fold(c)
            if folded != c:
                table[cp] = folded
    return table


def _cached_table() -> dict[int, str]:
    """`_table()`, kept beside this module's bytecode (trusted as the bytecode is) for the same
    source, Python and Unicode data: building it costs ~0.5 s of CPU at each start of a gateway,
    a worker or a CLI run."""
    key = hashlib.sha256(Path(__file__).read_bytes() + repr((
        sys.version_info[:2], unicodedata.unidata_version, confusable_homoglyphs.__version__,
        anyascii_package.__version__)).encode()).hexdigest()[:16]
    folder = Path(importlib.util.cache_from_source(__file__)).parent
    cache = folder / f"normalize.fold-{key}.json"
    with contextlib.suppress(OSError, ValueError, TypeError):
        return {int(cp): str(folded) for cp, folded in json.loads(cache.read_text())}
    table = _table()
    if not sys.dont_write_bytecode:
        with contextlib.suppress(OSError):
            folder.mkdir(parents=True, exist_ok=True)
            for stale in folder.glob("normalize.fold-*.json"):
                stale.unlink(missing_ok=True)
            partial = cache.with_suffix(f".{os.getpid()}.partial")
            partial.write_text(json.dumps(list(table.items())))
            partial.replace(cache)  # whole or not at all, for processes starting meanwhile
    return table


FOLD = _cached_table()


def _ascii_fold() -> tuple[bytes, bytes]:
    """FOLD's ASCII part as a byte table and the bytes it deletes: `str.translate` with an
    11,000-entry mapping costs ~0.1 µs a character even on ASCII, `bytes.translate` a hundredth."""
    table, deleted = bytearray(range(256)), bytearray()
    for cp in range(128):
        folded = FOLD.get(cp, chr(cp))
        if folded == "":
            deleted.append(cp)
        else:  # the fold of an ASCII character is at most one ASCII character (_fold's c.lower())
            assert len(folded) == 1 and folded.isascii(), (cp, folded)
            table[cp] = ord(folded)
    return bytes(table), bytes(deleted)


ASCII_FOLD, ASCII_DELETED = _ascii_fold()
TAG = re.compile("[\U000e0000-\U000e007f]")
BASE64_RUN = re.compile(r"[A-Za-z0-9+/_-]{16,}={0,2}")
ESCAPES = re.compile(r"%[0-9A-Fa-f]{2}|\\u[0-9A-Fa-f]{4}|&(?:#[0-9]+|#[xX][0-9A-Fa-f]+|[A-Za-z]+);")


def normalize(text: str) -> str:
    folded = text.encode().translate(ASCII_FOLD, ASCII_DELETED).decode() if text.isascii() \
        else text.translate(FOLD)
    collapsed = " ".join(folded.split())  # whitespace runs made one space, edges kept
    if folded[:1].isspace():
        collapsed = " " + collapsed
    if folded[-1:].isspace() and collapsed != " ":
        collapsed += " "
    return collapsed


def unseen(text: str) -> str | None:
    """For a text holding tag characters, `normalize` of it read without them (as a person, or a
    model that does not decode tags, reads it: tag letters sprinkled inside a visible phrase do
    not hide it), else None."""
    return normalize(TAG.sub("", text)) if not text.isascii() and TAG.search(text) else None


def fold_pattern(regex: str) -> str:
    """A regex rewritten for normalised text: its non-ASCII characters (always literal in a
    regex) folded as texts are, so `café` or `пароль` still match; ASCII (the syntax) kept."""
    return "".join(re.escape(FOLD.get(ord(c), c)) if not c.isascii() else c for c in regex)


# Skeletons: letters and digits only, leetspeak read as letters. i, l, 1, | and ! are one letter
# (as in TR39 skeletons), so `nightinga1e` and `n1ght1ngale` are both `nightingaie`.
LEET = str.maketrans("01l345789", "oiieastbg")
# Punctuation that is a letter in leetspeak (`n!ght!ngale`, `$ecret`) or a separator
# (`project|nightingale`): a text that holds some is read both ways.
AMBIGUOUS = str.maketrans("!|@$+", "iiast")
# Readings: 1:1 maps of a normalised text (positions kept, to find where a literal matched)...
AS_LETTERS = str.maketrans({**LEET, **AMBIGUOUS})
AS_SEPARATORS = str.maketrans({**LEET, **dict.fromkeys(AMBIGUOUS, " ")})
# ... and the same, keeping letters and digits only: skeletons
PUNCTUATION = [c for c in range(128) if not chr(c).isalnum() and c not in AMBIGUOUS]
SKELETON = str.maketrans({**LEET, **AMBIGUOUS, **dict.fromkeys(PUNCTUATION)})
SKELETON_SEPARATED = str.maketrans({**LEET, **dict.fromkeys([*PUNCTUATION, *AMBIGUOUS])})
NOT_KEPT = re.compile(r"[\W_]+")


def _ambiguous(normalized: str) -> bool:
    return "!" in normalized or "|" in normalized or "@" in normalized or "$" in normalized \
        or "+" in normalized


def skeleton(normalized: str) -> str:
    """`normalized` (a `normalize` result) reduced to letters and digits, leetspeak read as
    letters; a text with punctuation that leetspeak uses as letters has two readings, separated
    by a newline (which no skeleton holds)."""
    out = []
    for table in (SKELETON, SKELETON_SEPARATED) if _ambiguous(normalized) else (SKELETON,):
        kept = normalized.translate(table)
        out.append(kept if kept.isalnum() or not kept else NOT_KEPT.sub("", kept))
    return "\n".join(out)


def readings(normalized: str) -> tuple[str, ...]:
    """`normalized` with leetspeak read as letters, position for position: what
    `skeleton_pattern`s search."""
    if _ambiguous(normalized):
        return normalized.translate(AS_LETTERS), normalized.translate(AS_SEPARATORS)
    return (normalized.translate(AS_LETTERS),)


def skeleton_pattern(skeleton: str, bounded: bool) -> re.Pattern[str]:
    """Finds a literal's skeleton in a reading: its letters and digits, anything else between
    them; `bounded`: starting and ending at word edges. (Linear: what may come between two
    letters is never a letter.)"""
    body = r"[\W_]*".join(map(re.escape, skeleton))
    return re.compile(rf"(?<![^\W_]){body}(?![^\W_])" if bounded else body)


@dataclass
class Normalized:
    """A text normalised once; its skeleton and readings are computed when a literal rule first
    asks."""

    text: str

    @functools.cached_property
    def skeleton(self) -> str:
        return skeleton(self.text)

    @functools.cached_property
    def readings(self) -> tuple[str, ...]:
        return readings(self.text)


def decoded_base64(text: str) -> list[str]:
    """Readable text hidden in base64 runs of `text`, and `text` read through the escapes a model
    reads through (`%70`, `\\u0070`, `&#112;`, `&#x70;`, `&amp;`) when it holds some."""
    found = [html.unescape(urllib.parse.unquote(fields.unescaped(text)))] \
        if ESCAPES.search(text) else []
    for run in BASE64_RUN.findall(text):
        padded = run + "=" * (-len(run) % 4)
        try:
            raw = base64.b64decode(padded.replace("-", "+").replace("_", "/"), validate=True)
            decoded = raw.decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            continue
        if decoded.isprintable() or all(c.isprintable() or c.isspace() for c in decoded):
            found.append(decoded)
    return found
