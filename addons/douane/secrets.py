"""The one catalogue of what a secret looks like: the policy flags it in what leaves, masking hides
it in what comes back, the recording redacts it. Whatever one of them finds, the others find.

Each kind names a rule id (policy reasons, `<SECRET:rule id>` in recordings), the masking entity
type, a pattern whose group `v` (or whole match) is the value, the policy's risk score, lower-case
hints (the pattern runs only when one occurs: a cheap substring test first) and an optional check
of the value. Kinds are tried in order; the first one to claim characters names the span.

Shapes that depend on context (an AWS secret access key is 40 base64-ish characters, like many
other things) are secrets only after a credential name and `:`/`=`; ordinary hashes (hex: 16
symbols, at most 4 bits per character), UUIDs and versions stay below every bar.

Patterns run on a text's normalised view (`_view`: NFKC, format characters removed), so a key
written in full-width letters or with a zero-width space inside is found; its span is the
original characters it came from, which masking and recordings replace.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import html
import itertools
import math
import re
import unicodedata
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from confusable_homoglyphs.confusables import confusables_data


@dataclass(frozen=True, eq=False)  # one object a kind: hashed by identity (a field hash cost
class Kind:  # ~1.3 µs at each `ORDER` lookup and set of kinds)
    rule: str
    entity: str
    pattern: re.Pattern[str]
    score: float
    hints: tuple[str, ...]
    check: Callable[[str], bool] | None = None
    lead: int | None = None  # the most characters a match holds before its hint (None: any)
    assigned: bool = False  # every match holds a `_SEP`: it runs only on a text `_assigns`
    glued: re.Pattern[str] | None = None  # `pattern` as decoded text is read (`_glued`)


@dataclass(frozen=True)
class Found:
    start: int
    end: int
    kind: Kind


# the value after a `NAME=` in a run; not Subresource-Integrity digests (`sha512-<base64>`) nor
# data URIs (`_value_span`)
HIGH_ENTROPY = re.compile(r"[A-Za-z0-9+/_=-]{32,}")  # greedy from a run's start: whole runs
_DIGEST = re.compile(r"sha(?:1|256|384|512)-")
_ASSIGNED = re.compile(r"[A-Za-z_][\w.-]{0,40}=(?!=)")  # `NAME=` leading a run: not the token
ENTROPY_BITS = 4.5
ENCODED_CONTENT = 1024  # high-entropy runs longer than this are encoded content (an image, a file)
SHORTEST_SECRET = 10  # no kind matches fewer characters (`pwd=Ab3xyz`)

# A credential's name in an assignment (`AWS_SECRET=`, `"api_key": "`, `token: `), up to the
# separator and an opening quote. `token` but not `tokenizer`; `pass` but not `bypass`.
_NAME = r"[\w.-]{0,30}?"
_SEP = r"""["']?\s*(?:[:=]|:=|=>|\s(?:is|was)\s)\s*["']?"""
_IS_WAS = re.compile(r"\s(?:is|was)\s")  # `_SEP`'s words
# A JSON value's openings before a credential-named key's value (`"api_key": ["`, `"token":
# {"value": "`): the value under the name is read inside an array or an object, as a string
# value is (and as the recording's key rule reads it); a bracket only before a JSON value
# (`password: [redacted]` stays a placeholder), a few deep (bounded).
_OPENS = r"""(?:\[\s*(?=["\[{])|\{\s*"[\w.-]{0,30}"\s*:\s*){0,3}["']?"""
_CREDENTIAL = (r"(?:api[_-]?key|apikey|access[_-]?key|secret|token(?!iz)|credential|auth[_-]?key|"
               r"account[_-]?key|private[_-]?key|signing[_-]?key|encryption[_-]?key|"
               r"master[_-]?key|sharedaccesskey)")
_PASSWORD = r"(?:password|passwd|passphrase|(?<![a-z])pwd(?![a-z])|(?<![a-z])pass(?![a-z]))"
_PLACEHOLDER = re.compile(r"^(?:[$%{<*(\[]|\.\.\.)|^x+$|[(\[]|^(?:none|null|nil|true|false|str|string|"
                          r"required|optional|undefined|redacted|hidden|masked)$", re.I)
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}")
_DIGIT = re.compile(r"\d")


# n·log2(n) for every count a token can hold: entropy without a Python loop per character kind
# (it runs on every candidate token of every request).
_NLOGN = [0.0] + [n * math.log2(n) for n in range(1, ENCODED_CONTENT + 1)]


def entropy(token: str) -> float:
    size = len(token)
    if size > ENCODED_CONTENT:
        counts = Counter(token)
        return -sum(n / size * math.log2(n / size) for n in counts.values())
    return math.log2(size) - sum(map(_NLOGN.__getitem__, Counter(token).values())) / size


def credential_like(token: str) -> bool:
    """A long token mixing cases and digits with high entropy: likely a credential. Hex digests
    and UUIDs stay below the bar (16 symbols: at most 4 bits per character)."""
    return (len(token) <= ENCODED_CONTENT and token.upper() != token  # (string methods, not
            and token.lower() != token and _DIGIT.search(token) is not None  # a loop per char)
            and entropy(token) >= ENTROPY_BITS)


def _path(value: str) -> bool:
    """`projects/acme/secrets/db`: segments, most of them lower-case words."""
    parts = value.split("/")
    return len(parts) >= 3 and sum(p.isalpha() and p.islower() for p in parts) * 2 >= len(parts)


def _token_value(value: str) -> bool:
    """A value after a credential name: long enough, letters and digits, not a placeholder, a
    path, a URL or a date."""
    return (len(value) >= 16 and any(c.isdigit() for c in value)
            and any(c.isalpha() for c in value) and not _PLACEHOLDER.search(value)
            and not value.startswith(("/", "./", "~/")) and "://" not in value
            and not _DATE.match(value) and not _path(value))


def _password_value(value: str) -> bool:
    """A password: not a placeholder, and at least two of lower, upper, digit, symbol."""
    classes = (any(c.islower() for c in value), any(c.isupper() for c in value),
               any(c.isdigit() for c in value), any(not c.isalnum() for c in value))
    return not _PLACEHOLDER.search(value) and sum(classes) >= 2


def _basic_credentials(value: str) -> bool:
    try:
        decoded = base64.b64decode(value + "=" * (-len(value) % 4), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return False
    return ":" in decoded and decoded.isprintable()


# What sets a key apart from the letters around it in text a reader sees: word boundaries and
# "no more key characters" look-aheads. A decoded run's bytes are all the encoder's: one junk byte
# before or after a key (`base64("x" + key)`, at any of base64's three offsets) glues it to a letter
# no reader takes for part of it, so decoded text is read without them (`Kind.glued`).
_APART = re.compile(r"\\b|\(\?!\[A-Za-z0-9[/+]{2}=\]\)")
# `sk-` glued to a word in decoded text is also `task-`, `risk-`, `desk-`: a key only with a digit
# and an upper-case letter in its run (every issued key has both; a slug in prose has not)
_SK_GLUED = r"(?:\b|(?=sk-[\w-]*?[A-Z])(?=sk-[\w-]*?[0-9]))sk-"


def _glued(pattern: str) -> str:
    return _APART.sub("", pattern.replace(r"\bsk-", "\0")).replace("\0", _SK_GLUED)


def _kind(rule: str, entity: str, pattern: str, score: float, hints: tuple[str, ...],
          check: Callable[[str], bool] | None = None, lead: int | None = None,
          assigned: bool = False) -> Kind:
    compiled = re.compile(pattern)
    glued = compiled if _glued(pattern) == pattern else re.compile(_glued(pattern))
    return Kind(f"detector.secret.{rule}", entity, compiled, score, hints, check, lead,
                assigned, glued)


CATALOGUE: tuple[Kind, ...] = (
    _kind("private_key", "PRIVATE_KEY",
          r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----(?:[\s\S]*?-----END "
          r"(?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----|(?:[A-Za-z0-9+/=\s]|\\[rn])*)", 100,
          ("private key",)),
    _kind("aws_access_key", "AWS_ACCESS_KEY", r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b", 90,
          ("akia", "asia")),
    _kind("aws_secret_key", "AWS_SECRET_KEY",
          r"(?i:aws" + _NAME + r"secret|secret[_-]?access[_-]?key|secretaccesskey)" + _NAME
          + _SEP + r"(?P<v>[A-Za-z0-9/+]{40})(?![A-Za-z0-9/+=])"
          r"|\b(?:AKIA|ASIA)[0-9A-Z]{16}[\s,;:|/\"']{1,4}(?P<v2>[A-Za-z0-9/+]{40})(?![A-Za-z0-9/+=])",
          90, ("secret", "akia", "asia"), lead=3 + 30),  # `aws`, a name, `secret`
    _kind("jwt", "JWT",
          r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}", 80, ("eyj",)),
    _kind("api_key", "API_KEY",
          r"\bsk-(?:proj-|ant-|live-|admin-|svcacct-)?[A-Za-z0-9_-]{20,}", 90, ("sk-",)),
    _kind("stripe_key", "API_KEY", r"\b[rs]k_(?:live|test)_[0-9A-Za-z]{16,}", 90,
          ("sk_live_", "sk_test_", "rk_live_", "rk_test_")),
    _kind("github_token", "API_KEY",
          r"\bgh[pousr]_[A-Za-z0-9]{36,}\b|\bgithub_pat_[A-Za-z0-9_]{40,}", 90,
          ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_")),
    _kind("gitlab_token", "API_KEY", r"\bgl(?:pat|dt|rt|ptt|cbt)-[A-Za-z0-9_-]{20,}", 90,
          ("glpat-", "gldt-", "glrt-", "glptt-", "glcbt-")),
    _kind("npm_token", "API_KEY", r"\bnpm_[A-Za-z0-9]{36}\b", 90, ("npm_",)),
    _kind("huggingface_token", "API_KEY", r"\bhf_[A-Za-z0-9]{34,}\b", 90, ("hf_",)),
    _kind("sendgrid_key", "API_KEY", r"\bSG\.[A-Za-z0-9_-]{22}\.[A-Za-z0-9_-]{43}\b", 90, ("sg.",)),
    _kind("slack_token", "API_KEY", r"\bxox[abposre]-[A-Za-z0-9-]{10,}", 90, ("xox",)),
    _kind("slack_webhook", "API_KEY",
          r"https://hooks\.slack\.com/(?:services|workflows|triggers)/[A-Za-z0-9_/-]{20,}", 90,
          ("hooks.slack.com",)),
    _kind("google_api_key", "API_KEY", r"\bAIza[0-9A-Za-z_-]{35}\b", 90, ("aiza",)),
    _kind("google_oauth_secret", "API_KEY", r"\bGOCSPX-[A-Za-z0-9_-]{28}\b", 90, ("gocspx-",)),
    _kind("bearer", "BEARER_TOKEN", r"(?i:\bbearer)\s+(?P<v>[A-Za-z0-9._~+/-]{20,}=*)", 70,
          ("bearer",), lead=0),
    _kind("basic_auth", "PASSWORD",
          r"(?i:\bbasic)\s+(?P<v>[A-Za-z0-9+/]{8,}={0,2})(?![A-Za-z0-9+/=])", 70, ("basic",),
          _basic_credentials, lead=0),
    # up to the last `@` before the host: a password may hold one, unencoded
    _kind("url_password", "PASSWORD",
          r"\b[A-Za-z][A-Za-z0-9+.-]{1,15}://[^\s:/@\"'<>]{1,64}:(?P<v>[^\s/\"'<>]{1,128})@", 70,
          ("://",), lambda v: not _PLACEHOLDER.search(v), lead=16),  # the scheme
    _kind("password", "PASSWORD",
          r"(?i:" + _PASSWORD + r")" + _NAME + _SEP + _OPENS
          + r"(?P<v>[^\s\"'`,;&<>]{6,128})", 40, ("pass", "pwd"), _password_value, lead=0,
          assigned=True),
    _kind("credential", "SECRET",
          r"(?i:" + _CREDENTIAL + r")" + _NAME + _SEP + _OPENS
          + r"(?P<v>[A-Za-z0-9_\-+/=.~]{16,1024})", 40,
          ("key", "secret", "token", "credential"), _token_value,
          lead=len("sharedaccess"), assigned=True),
)
# A field's name (a JSON key, a form or query parameter) that names a credential: the value under
# it is one, whatever its shape (an opaque refresh token, a short password), where the catalogue
# reads a value alone and finds no shape. Any case, camelCase, `-`/`.`/`_` or nothing between
# words; `token` after a word that is not a model's or a listing's (logprobs' `token`, a page's
# `next_page_token`), `key` after a credential's word (not `idempotency_key`, `prompt_cache_key`).
KEY_NAME_CHARS = 64  # a longer name is not a credential's
_KEY_PASSWORD = re.compile(r"(?:password|passwd|passphrase)$|"
                           r"(?:^|_)(?:pass|pwd|passcode)$")
_KEY_CREDENTIAL = re.compile(
    r"secret$|(?:^|_)(?:credentials?|authorization|cookie)$|"
    r"(?:^|_)(?:api|access|auth|account|private|signing|encryption|master|secret|"
    r"shared_?access|subscription|client|app|license|service_account)_?key$|"
    r"^(?!(?:stop|eos|bos|pad|unk|sep|cls|mask|page|next|next_page|prev|previous|pagination|"
    r"continuation|cancellation|cancel|start|end|special|max|min|progress)_?token$)"
    r"[a-z0-9_]*?[a-z0-9]_?token$")
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_KEY_SEPARATORS = re.compile(r"[-.\s]+")
# What every name `credential_key` takes ends with (in lower case): a cheap test before a text's
# names are read one by one.
KEY_ENDS = ("pass", "password", "passwd", "pwd", "passcode", "passphrase", "secret", "token", "key",
            "credential", "credentials", "authorization", "cookie")
# what a documented or templated value says instead of a credential
_KEY_PLACEHOLDER = re.compile(r"\$\{[^}]*\}|\$[A-Z_][A-Z0-9_]*|\{\{.*\}\}|<[^<>]*>|\*+|•+|\.\.\.|"
                              r"x+|X+|(?i:none|null|nil|undefined|redacted|hidden|masked)")


def credential_key(name: str) -> Kind | None:
    """The kind of secret a field named `name` holds (`password`, or `credential`), or None."""
    if len(name) > KEY_NAME_CHARS or not name.isascii():
        return None
    key = _KEY_SEPARATORS.sub("_", _CAMEL.sub("_", name).lower())
    if _KEY_PASSWORD.search(key):
        return _PASSWORD_KIND
    return _CREDENTIAL_KIND if _KEY_CREDENTIAL.search(key) else None


def key_value(value: str) -> bool:
    """Whether the value of a credential-named field is one: not empty nor a placeholder."""
    value = value.strip()
    return bool(value) and not _KEY_PLACEHOLDER.fullmatch(value)


HIGH_ENTROPY_KIND = Kind("detector.secret.high_entropy", "SECRET", HIGH_ENTROPY, 40, (),
                         credential_like)
KINDS = (*CATALOGUE, HIGH_ENTROPY_KIND)
_PASSWORD_KIND = next(k for k in CATALOGUE if k.rule == "detector.secret.password")
_CREDENTIAL_KIND = next(k for k in CATALOGUE if k.rule == "detector.secret.credential")
ENTITIES = tuple(dict.fromkeys(k.entity for k in KINDS))
ORDER = {kind: i for i, kind in enumerate(KINDS)}  # the first kind names merged finds
HINTS = tuple({h for k in CATALOGUE for h in k.hints})
_BY_HINT = {h: tuple(k for k in CATALOGUE if h in k.hints) for h in HINTS}
# Hints grouped by a separator they hold: a text without `_` skips the fifteen `_` hints at the
# cost of one scan; the rest are tested one by one.
_GATES = "_-."
HINT_GROUPS = tuple(
    (gate, tuple(sorted(h for h in HINTS if next((c for c in _GATES if c in h), "") == gate)))
    for gate in ("", *_GATES))
# A high-entropy token needs a run of 32 token characters: the text's bytes mapped to `a` (token
# character) or a space (anything else, non-ASCII included), and one substring test finds whether
# one exists, ~10x faster than the regex's scan of every position.
_TOKEN_BYTES = bytes(ord("a") if chr(i) in "+/_=-" or chr(i).isascii() and chr(i).isalnum()
                     else ord(" ") for i in range(256))
_RUN = b"a" * 32


# Unicode's format characters (category Cf: zero-width space and joiners, soft hyphen, bidi
# controls, tags) and its other default-ignorable code points, shown as nothing yet printable
# (`_SHOWN`: the combining grapheme joiner, Hangul fillers, Mongolian and other variation
# selectors): invisible, and gone from the view patterns run on.
_IGNORED_SHOWN = ("\u034f\u115f\u1160\u17b4\u17b5\u180b-\u180d\u180f\u3164\ufe00-\ufe0f\uffa0"
                  "\U000e0100-\U000e01ef")
_SHOWN = re.compile(f"[{_IGNORED_SHOWN}]")
_FORMAT = re.compile("[\u00ad\u0600-\u0605\u061c\u06dd\u070f\u0890-\u0891\u08e2\u180e"
                     "\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u206f\ufeff\ufff0-\ufffb"
                     "\U000110bd\U000110cd\U00013430-\U0001343f\U0001bca0-\U0001bca3"
                     f"\U0001d173-\U0001d17a\U000e0000-\U000e0fff{_IGNORED_SHOWN}]")
# Combining marks (the blocks that are not one script's): visible, yet no key holds one, and a
# model told to ignore accents reads `Qḿ7v` as `Qm7v`: gone from the view like format characters.
_MARK = re.compile("[\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f]")
_NON_ASCII = re.compile(r"[^\x00-\x7f]+")
_ASCII_BYTES = bytes(range(128))
_SEEN_MOST = 4096  # characters whose view `_Views` keep


class _Views(dict):
    """`str.translate`'s table of each character's view (`uneven`: "" when that is one
    character, "x" when it is none or several), filled as characters are met."""

    def __init__(self, uneven: bool):
        super().__init__()
        self.uneven = uneven

    def __missing__(self, code: int) -> str:
        c = chr(code)
        seen = "" if _FORMAT.match(c) or _MARK.match(c) else c if c.isspace() else \
            unicodedata.normalize("NFKC", c)
        value = ("" if len(seen) == 1 else "x") if self.uneven else seen
        if len(self) < _SEEN_MOST:
            self[code] = value
        return value


class _Decoded(_Views):
    """The views with tag characters read as the ASCII they encode (U+E0020-E007E): a text, a
    key, hidden in tags is invisible, yet a model may read it, and anyone may decode it."""

    def __missing__(self, code: int) -> str:
        if not 0xE0020 <= code <= 0xE007E:
            return super().__missing__(code)
        value = "" if self.uneven else chr(code - 0xE0000)
        self[code] = value
        return value


_VIEWS, _UNEVEN = _Views(False), _Views(True)
_TAG_VIEWS = _Decoded(False), _Decoded(True)
_TAGS = re.compile("[\U000e0020-\U000e007e]")


def _plain(text: str) -> bool:
    """Whether `text` is its own view: tested on its non-ASCII characters only (ASCII ones are
    their own view; their UTF-8 bytes are dropped at C speed), spaces aside (a view keeps
    them: `\\s` matches an ideographic or no-break space), so mostly-ASCII text with a curly
    quote or an accent costs little more than ASCII text. `isprintable` (C speed) rules out
    format characters, `_SHOWN` the printable ignorable ones; the regex, ~10x slower, decides
    the other unprintable ones."""
    if text.isascii():
        return True
    rest = "".join(text.encode("utf-8", "surrogatepass").translate(None, _ASCII_BYTES).decode(
        "utf-8", "surrogatepass").split())
    return unicodedata.is_normalized("NFKC", rest) and not _MARK.search(rest) and (
        rest.isprintable() and not _SHOWN.search(rest) or not _FORMAT.search(rest))


class _Origin:
    """For each character of a view, the index in the text of the character it was read from:
    worked out on first use (when something was found), not for every text read: a per-character
    loop over 240k characters with a zero-width space between letters held the event loop ~0.5 s
    for each of `maybe`, `find` and `matches`."""

    __slots__ = ("_at", "_table", "_text")

    def __init__(self, text: str, table: _Views):
        self._text, self._table, self._at = text, table, None

    def __getitem__(self, i: int) -> int:
        if self._at is None:
            table = self._table
            self._at = list(itertools.chain.from_iterable(map(
                itertools.repeat, range(len(self._text)),
                [len(table[ord(c)]) for c in self._text])))
        return self._at[i]


def _view(text: str, views: tuple[_Views, _Views] = (_VIEWS, _UNEVEN)
          ) -> tuple[str, _Origin | None] | None:
    """`text` as the patterns read it (each character NFKC-normalised, format characters
    dropped; `views`: tags decoded instead) and, for each of its characters, the original's
    index (None: the same places); None when that is `text` itself (`_plain`: the common
    case)."""
    if views[0] is _VIEWS and _plain(text):
        return None
    table, uneven = views
    # one character for one (full-width letters, spaces): the same places
    return text.translate(table), _Origin(text, table) if text.translate(uneven) else None


def _value_span(m: re.Match[str]) -> tuple[int, int]:
    for group in ("v", "v2"):
        if group in m.re.groupindex and m.group(group) is not None:
            return m.span(group)
    if m.re is HIGH_ENTROPY:
        if _DIGEST.match(m.group()) or m.string.endswith("base64,", 0, m.start()):
            return m.start(), m.start()
        if name := _ASSIGNED.match(m.group()):
            return m.start() + name.end(), m.end()
    return m.span()


def _hinted(text: str, lowered: str | None = None) -> set[str]:
    """The hints present in `text` (substring tests: faster than one regex of them all)."""
    lowered = text.lower() if lowered is None else lowered
    return {h for gate, hints in HINT_GROUPS if gate in lowered for h in hints if h in lowered}


_TRIED_MOST = 8  # `_scan` tries at most one place in this many of a text, else scans it all


def _scan(kind: Kind, text: str, lowered: str | None, decoded: bool = False
          ) -> Iterator[re.Match[str]]:
    """`kind.pattern.finditer(text)` (`kind.glued`'s in `decoded` text), tried only where a match
    can start: a match holds one of
    its hints at most `lead` characters from its start, so in ASCII text (where `lower()` keeps
    places and only ASCII letters match case-insensitively) each place from `lead` before each
    hint on. A regex's scan of 40 KB of prose for the case-insensitive credential names costs
    ~8 ms; the hints' places are found at C speed. Many hints: the scan, as before."""
    pattern = kind.glued if decoded and kind.glued is not None else kind.pattern
    if kind.lead is None or lowered is None:
        yield from pattern.finditer(text)
        return
    places = sorted({i for h in kind.hints for i in _places(lowered, h)})
    if len(places) * (kind.lead + 1) > len(text) // _TRIED_MOST + kind.lead + 1:
        yield from pattern.finditer(text)
        return
    at = 0  # where the last match ended: matches do not overlap, as finditer's
    for hint in places:
        start = max(at, hint - kind.lead)
        while start <= hint:
            m = pattern.match(text, start)
            if m is None:
                start += 1
                continue
            yield m
            at = start = max(m.end(), start + 1)


def _places(lowered: str, hint: str) -> Iterator[int]:
    at = lowered.find(hint)
    while at >= 0:
        yield at
        at = lowered.find(hint, at + 1)


def hinted(text: str) -> bool:
    """Whether a hint of a catalogue kind occurs in `text` (read as is: no view, no decoding)."""
    return bool(_hinted(text))


def _tokens(text: str) -> bytes:
    """`text` mapped to `_TOKEN_BYTES`, one byte a character (non-ASCII ones: `?`, a space)."""
    return text.encode("ascii", "replace").translate(_TOKEN_BYTES)


def _long_run(text: str, tokens: bytes | None = None) -> bool:
    """Whether `text` holds a run of characters HIGH_ENTROPY could match (its only way in)."""
    return _RUN in (_tokens(text) if tokens is None else tokens)


def _assigns(text: str) -> bool:
    """Whether `text` holds what a `_SEP` match needs: `:`, `=`, or ` is ` / ` was `."""
    return ":" in text or "=" in text or \
        ("is" in text or "was" in text) and _IS_WAS.search(text) is not None


def _runnable(text: str, hinted: set[str], entropy_too: bool) -> list[Kind]:
    """The kinds whose pattern could match `text`, in catalogue order: a hint of theirs occurs in
    it, and an assignment when they need one (the commonest hint, `token`, is in every
    `max_tokens` key, and keys hold no assignment)."""
    kinds = sorted({k for h in hinted for k in _BY_HINT[h]}, key=ORDER.__getitem__)
    if any(k.assigned for k in kinds) and not _assigns(text):
        kinds = [k for k in kinds if not k.assigned]
    return [*kinds, HIGH_ENTROPY_KIND] if entropy_too else kinds


def find(text: str, high_entropy: bool = True) -> list[Found]:
    """Every secret in `text`, in order, overlapping finds merged (the first kind names them):
    found in its normalised view, each span the original characters it was read from; a text
    holding tag characters is read with them dropped and with them decoded."""
    view = _view(text)
    found = _found(text, view, high_entropy)
    if text.isascii():
        return found
    if _TAGS.search(text):
        found = _merge(found + _found(text, _view(text, _TAG_VIEWS), high_entropy))
    if (folded := _folded(view or (text, None))) is not None:  # the catalogue only, as decoded
        found = _merge(found + _found(text, folded, False))  # runs: `é`s read as `e`s are data
    return found


def _found(text: str, view: tuple[str, _Origin | None] | None,
           high_entropy: bool) -> list[Found]:
    if view is None:
        return _find(text, high_entropy)
    seen, origin = view
    found = _find(seen, high_entropy)
    return found if origin is None else \
        [Found(origin[f.start], origin[f.end - 1] + 1, f.kind) for f in found]


def readings(text: str) -> list[tuple[str, _Origin | None]]:
    """The views `find` reads, each with the index in `text` of each of its characters (None:
    the same places): `text` as patterns read it (NFKC, format characters dropped), and with
    tag characters decoded when it holds some. The masking engine reads the same views."""
    seen = [_view(text) or (text, None)]
    if not text.isascii() and _TAGS.search(text):
        seen.append(_view(text, _TAG_VIEWS) or (text, None))
    return seen


def _readings(text: str) -> list[str]:
    """The views `find` reads (`maybe`, `matches`)."""
    views = readings(text)
    if not text.isascii() and (folded := _folded(views[0])) is not None:
        views.append(folded)
    return [seen for seen, _ in views]


# Latin letters with a mark or a stroke (`é`, `ñ`, `ø`, `ł`, a dotless `ı`) read as their base
# letter (and look-alikes from other scripts, below): NFKC keeps a precomposed one, yet no key holds one, and a model told to drop accents
# reads `Qé7v` as `Qe7v`. A reading of its own (`_folded`), not the view's: masking reads the
# view (a name keeps its accents), and a text of many accents is its own view (`_plain`).
_LATIN = re.compile(r"LATIN (SMALL|CAPITAL) LETTER (?:DOTLESS )?([A-Z])(?: WITH .+)?")
_LATIN_FOLD = {cp: m[2] if m[1] == "CAPITAL" else m[2].lower()
               for cp in (*range(0xC0, 0x250), *range(0x1E00, 0x1F00))
               if (m := _LATIN.fullmatch(unicodedata.name(chr(cp), "")))}
# Letters of other scripts drawn as a Latin letter or digit (`sk-рroj-` with a Cyrillic `р`):
# NFKC keeps them, a reader (or a model asked to fix the typo) reads them as Latin. Unicode's
# confusables data (TR39), which the deny rules read too (`policy.normalize`), with case kept.
_LOOKALIKES = {ord(c): seen[0]["c"] for c, seen in confusables_data.items()
               if len(c) == 1 and not c.isascii() and seen and len(seen[0]["c"]) == 1 and
               seen[0]["c"].isascii() and seen[0]["c"].isalnum()}
_LATIN_FOLD |= _LOOKALIKES
_FOLDABLE = re.compile("[" + "".join(re.escape(chr(c)) for c in _LATIN_FOLD) + "]")
_ASCII_ALNUM = re.compile("[A-Za-z0-9]")
# each character as `_TOKEN_BYTES`, non-ASCII ones as token characters (read in Latin-1, the
# rest as `?`: an encoding at C speed)
_TOKEN_OR_OTHER = _TOKEN_BYTES[:63] + b"a" + _TOKEN_BYTES[64:128] + b"a" * 128


def _folded(view: tuple[str, _Origin | None]) -> tuple[str, _Origin | None] | None:
    """A text's view with each foldable Latin letter that sits in a run of 16 token characters
    (counting non-ASCII ones: a key, cut by the letter) read as its base letter, same places;
    None when there is none. Prose's accented words are short: only their runs are tested."""
    seen, origin = view
    others = seen.encode("latin-1", "replace").translate(_TOKEN_OR_OTHER)
    at, parts, last = others.find(_B64_MARK), [], 0
    while at >= 0:
        start = others.rfind(b" ", 0, at) + 1
        end = others.find(b" ", at)
        end = len(seen) if end < 0 else end
        # (a key holds Latin letters or digits as written: a word all Cyrillic or Greek is prose)
        if _ASCII_ALNUM.search(seen, start, end) and _FOLDABLE.search(seen, start, end):
            parts += [seen[last:start], seen[start:end].translate(_LATIN_FOLD)]
            last = end
        at = others.find(_B64_MARK, end)
    return ("".join(parts) + seen[last:], origin) if parts else None


# Encoded runs: base64/base64url (hex is a base64 run too) of 16+ characters and percent-encoded
# ones. A run is decoded (one level, and one more inside what that gives), read as text only if its
# bytes are UTF-8 (an image or a binary file is not text: it is skipped after its first chunk), and
# the catalogue (not the entropy bar: decoded text is often data) runs on it; a find names the run.
_B64_RUN = re.compile(r"[A-Za-z0-9+/_-]{16,}={0,2}")
_HEX = re.compile(r"(?:[0-9A-Fa-f]{2})+")
# A percent-encoded run: the longest stretch of `%XX` and URL characters holding one `%XX` at least,
# found around each `%XX` (`_percent_runs`): one pattern demanding a `%XX` in the middle retried
# every position of every word of a text (~8 ms in 40 KB of prose).
_URL_RUN = re.compile(r"(?:%[0-9A-Fa-f]{2}|[A-Za-z0-9._~+/=:-])+")
# Escapes a model reads through, each kind, percent ones among them: the run around each escape
# that is not a percent escape (`\u0073k-`, `&#115;k-`, `\x73k-`), decoded whole (`_escape_runs`).
_ESC_ONE = re.compile(r"\\u([0-9A-Fa-f]{4})|\\x([0-9A-Fa-f]{2})|&(?:#[0-9]{1,7}|#[xX][0-9A-Fa-f]"
                      r"{1,6}|[A-Za-z][A-Za-z0-9]{1,31});")
_ESC_RUN = re.compile(rf"(?:{_ESC_ONE.pattern}|%[0-9A-Fa-f]{{2}}|[A-Za-z0-9._~+/=:-])+")
# Base64 wrapped in lines (MIME's 76 columns, PEM's 64): read as one run, line breaks dropped.
_WRAPPED = re.compile(r"[A-Za-z0-9+/_-]{16,}(?:\r?\n[A-Za-z0-9+/_-]+)+={0,2}")
_BASE32 = re.compile(r"[A-Z2-7]{16,}|[a-z2-7]{16,}")
_B64_MARK = b"a" * 16
_FIRST_CHUNK = 4096  # characters of a run decoded to tell text from binary
_DEPTH = 2  # an encoding inside an encoding is read; a third level is not
_RUNS_MOST = 1024  # runs decoded in one text (~5 µs each): past them, none is read
_SPLIT = "\x00"  # between decoded runs read as one text: no pattern's separator or space


_PERCENT_BYTE = re.compile("%[0-9A-Fa-f]{2}")  # not "100%": a percent run has one at least
# Hex bytes written apart (`73 6b 2d`, `73:6B:2D`, `0x73, 0x6b`), ten at least (a key's
# shortest): each byte of a key (printable ASCII) is `2`-`7` then a hex digit. Looked for only
# where twenty hex digits are in a row once separators and `x` are deleted (`_PAIR_CLASSES`: a
# translate and a substring test; the patterns' own scan of every position cost ~15-50 us in
# 4 KB of prose).
_PAIR_APART = "[ \t\r\n:,;.-]{1,2}"  # (one a line, `-`, `.` too: `73-6b-2d`)
_PAIRS = (re.compile(rf"[2-7][0-9A-Fa-f](?:{_PAIR_APART}[2-7][0-9A-Fa-f]){{9,}}"),
          re.compile(rf"0[xX][2-7][0-9A-Fa-f](?:{_PAIR_APART}0[xX][2-7][0-9A-Fa-f]){{9,}}"))
_PAIR_DELETED = b" \t\r\n:,;.-xX"  # what the gate reads past
_PAIR_CLASSES = bytes(ord("h") if chr(i) in "0123456789abcdefABCDEF" else ord(".")
                      for i in range(256))
_PAIR_GATE = b"h" * 20  # ten pairs (a card number's sixteen digits stop here)
# ... then, from there, only where they can be pairs: `2`-`7` (`p`) then a hex digit, ten times
# (`0x` read as `0`, a hex digit: `h`); digests and long numbers end there, not in `_PAIRS`' scans
_PAIR_DIGITS = bytes(ord("p") if chr(i) in "234567" else c for i, c in enumerate(_PAIR_CLASSES))
_PAIR_SHAPES = re.compile(rb"(?:p[ph]){10}|(?:hp[ph]){10}")
_NOT_HEX = re.compile(r"0[xX]|[^0-9A-Fa-f]")


def _pairs(text: str) -> bool:
    """Whether `text` may hold hex bytes written apart (a superset: `_pair_runs` decides);
    `bytes.find`, not `in` (which costs ~1 us more, through the buffer protocol)."""
    raw = text.encode("latin-1", "replace")
    at = raw.translate(_PAIR_CLASSES, _PAIR_DELETED).find(_PAIR_GATE)  # (the same places as:)
    return at >= 0 and \
        _PAIR_SHAPES.search(raw.translate(_PAIR_DIGITS, _PAIR_DELETED), at) is not None


def _pair_runs(text: str) -> list[tuple[re.Match[str], list[str]]]:
    """The runs of hex bytes written apart, each with the text it decodes to (if UTF-8)."""
    return [(m, [plain] if (plain := _as_text(bytes.fromhex(_NOT_HEX.sub("", m[0])))) else [])
            for pattern in _PAIRS for m in pattern.finditer(text)]


def _escaped(text: str) -> bool:
    return ("\\" in text or "&" in text) and _ESC_ONE.search(text) is not None


def _encodable(text: str, tokens: bytes | None = None) -> bool:
    """Whether `text` may hold a run `_encoded` would decode (`_tokens`' run of 16 also counts
    `=`: a cheap superset, the translate `_long_run` makes)."""
    return ("%" in text and _PERCENT_BYTE.search(text) is not None) or _escaped(text) or \
        _B64_MARK in (_tokens(text) if tokens is None else tokens) or \
        _pairs(text)


def _as_text(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:  # a character cut by a chunk's end is still text
        return data[:e.start].decode("utf-8") if e.start >= len(data) - 3 and \
            e.reason == "unexpected end of data" else None


def _b64(run: str) -> bytes | None:
    run = run.rstrip("=")
    if "-" in run or "_" in run:  # URL-safe
        run = run.replace("-", "+").replace("_", "/")
    run = run[:len(run) - len(run) % 4 if len(run) % 4 == 1 else len(run)]
    try:
        return binascii.a2b_base64(run + "=" * (-len(run) % 4), strict_mode=True)
    except binascii.Error:
        return None


# Base32 as a base-32 number (`int`'s digits 0-9a-v): decoded at C speed, a run of any length
# (`base64.b32decode` loops in Python, ~0.4 us a character).
_B32_DIGITS = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567abcdefghijklmnopqrstuvwxyz",
                            "0123456789abcdefghijklmnopqrstuv0123456789abcdefghijklmnop")
_B32_ENDS = (0, 2, 4, 5, 7)  # what a base32 text's length leaves over 8 characters


def _b32_cut(cores: list[str]) -> list[bytes]:
    """Base32 runs (`_BASE32`, no padding, each of a length a base32 text has) decoded in one
    call: each padded to whole 8-character groups with zero bits, its bytes cut to its own."""
    padded = "".join(c + "A" * (-len(c) % 8) for c in cores)
    raw = int(padded.translate(_B32_DIGITS) or "0", 32).to_bytes(len(padded) * 5 // 8, "big")
    out, at = [], 0
    for c in cores:
        out.append(raw[at:at + len(c) * 5 // 8])
        at += (len(c) + 7) // 8 * 5
    return out


def _b32(core: str) -> bytes | None:
    return _b32_cut([core])[0] if len(core) % 8 in _B32_ENDS else None


def _decodings(run: str) -> list[str]:
    """The texts `run` could encode: hex, base32, base64 (standard or URL-safe), each only if
    UTF-8."""
    out = []
    if len(run) % 2 == 0 and _HEX.fullmatch(run):
        out.append(_as_text(bytes.fromhex(run)))
    if _BASE32.fullmatch(bare := run.rstrip("=")) and \
            (head := _b32(bare[:_FIRST_CHUNK])) is not None and (text := _as_text(head)):
        out.append(text if len(bare) <= _FIRST_CHUNK else _as_text(_b32(bare) or b""))
    head = _b64(run[:_FIRST_CHUNK])
    if head is not None and (text := _as_text(head)) is not None:
        out.append(text if len(run) <= _FIRST_CHUNK else _as_text(_b64(run) or b""))
    return [t for t in out if t]


def _unquoted(run: str) -> list[str]:
    try:
        return [urllib.parse.unquote(run, errors="strict")]
    except UnicodeDecodeError:
        return []


def _percent_runs(text: str) -> list[tuple[re.Match[str], list[str]]]:
    """The percent-encoded runs of `text`, each with what it decodes to (if UTF-8): the stretch
    around each `%XX`, read from the last space or line end before it (neither is in a run)."""
    runs: list[tuple[re.Match[str], list[str]]] = []
    end = 0
    for pct in _PERCENT_BYTE.finditer(text) if "%" in text else ():
        at = pct.start()
        if at < end:  # in the run found last
            continue
        start = max(end, text.rfind(" ", end, at) + 1, text.rfind("\n", end, at) + 1)
        run = next(m for m in _URL_RUN.finditer(text, start) if m.end() > at)
        runs.append((run, _unquoted(run.group())))
        end = run.end()
    return runs


def _escape(m: re.Match[str]) -> str:
    code = m[1] or m[2]
    if code is None:
        return html.unescape(m[0])
    return "\ufffd" if 0xD800 <= int(code, 16) <= 0xDFFF else chr(int(code, 16))


def _escape_runs(text: str) -> list[tuple[re.Match[str], list[str]]]:
    """The runs of `text` holding an escape that is not a percent one, each with what it decodes
    to: the stretch around each such escape, as `_percent_runs` finds its runs (one pattern
    demanding an escape inside a run retried every position of a text holding one)."""
    runs: list[tuple[re.Match[str], list[str]]] = []
    end = 0
    for esc in _ESC_ONE.finditer(text):
        at = esc.start()
        if at < end:  # in the run found last
            continue
        start = max(end, text.rfind(" ", end, at) + 1, text.rfind("\n", end, at) + 1)
        run = next((m for m in _ESC_RUN.finditer(text, start) if m.end() > at), None)
        if run is None:
            break
        runs.append((run, _unquoted(_ESC_ONE.sub(_escape, run.group()))))
        end = run.end()
    return runs


_URL_SAFE = str.maketrans("-_", "+/")
_HEX_RUN = re.compile(r"(?<![A-Za-z0-9+/_-])(?:[0-9A-Fa-f]{2}){8,}(?![A-Za-z0-9+/_=-])")  # a whole run


# A wrapped run from its first line's start (not retried inside a run: linear)
_WRAPPED_RUN = re.compile(r"(?<![A-Za-z0-9+/_-])" + _WRAPPED.pattern)


def _bulk(text: str, start: int, depth: int) -> list[Found]:
    """The base64, base32, hex and line-wrapped base64 runs of `text` from `start` on, past
    `_RUNS_MOST`: decoded together (one C call each way, ~1 us a run, not ~5), every run's bytes
    read as Latin-1 (as text or not: a key, ASCII, reads the same), so an encoded key after a
    thousand other runs is not skipped."""
    ms = list(_B64_RUN.finditer(text, start))
    wrapped = list(_WRAPPED_RUN.finditer(text, start)) if "\n" in text else []
    cores = [m[0].rstrip("=") for m in ms] + ["".join(m[0].split()).rstrip("=") for m in wrapped]
    ms += wrapped
    sizes = [len(c) * 3 // 4 for c in cores]  # bytes a run's whole characters hold
    # each run padded to whole quads with zero bits, its bytes cut to `sizes`
    raw = binascii.a2b_base64("".join(
        [c + "AAA"[:-len(c) % 4] for c in cores]).translate(_URL_SAFE)).decode("latin-1")
    ends = list(itertools.accumulate((len(c) + 3) // 4 * 3 for c in cores))
    texts = [raw[end - (len(c) + 3) // 4 * 3:end - (len(c) + 3) // 4 * 3 + size]
             for c, size, end in zip(cores, sizes, ends, strict=True)]
    b32 = [(m, c) for m, c in zip(ms, cores, strict=True)
           if len(c) % 8 in _B32_ENDS and _BASE32.fullmatch(c)]
    hexes = list(_HEX_RUN.finditer(text, start))
    ms += [m for m, _ in b32] + hexes
    texts += [b.decode("latin-1") for b in _b32_cut([c for _, c in b32])]
    texts += [bytes.fromhex(m[0]).decode("latin-1") for m in hexes]
    starts = [0, *itertools.accumulate(len(t) + len(_SPLIT) for t in texts)]
    found = []
    for f in _find(_SPLIT.join(texts), False, depth + 1):
        first = bisect.bisect_right(starts, f.start) - 1
        last = bisect.bisect_right(starts, f.end - 1) - 1
        found += [Found(m.start(), m.end(), f.kind) for m in ms[first:last + 1]]
    return found


def _encoded(text: str, depth: int = 0, tokens: bytes | None = None) -> list[Found]:
    """The encoded runs of `text` whose decoded text holds a catalogue secret, each named by it."""
    tokens = _tokens(text) if tokens is None else tokens
    if depth >= _DEPTH or not _encodable(text, tokens):
        return []
    runs = _percent_runs(text)
    if _escaped(text):
        runs += _escape_runs(text)
    if _pairs(text):
        runs += _pair_runs(text)
    at = tokens.find(_B64_MARK)
    while at >= 0 and len(runs) < _RUNS_MOST:  # the regex on token runs only (~5x faster than its scan of every position)
        start = tokens.rfind(b" ", 0, at) + 1
        end = tokens.find(b" ", at)
        end = len(text) if end < 0 else end
        if text.startswith(("\n", "\r\n"), end) and (m := _WRAPPED.match(text, start)):
            runs.append((m, _decodings("".join(m.group().split()))))
            end = m.end()
        else:
            runs += [(m, _decodings(m.group())) for m in _B64_RUN.finditer(text, start, end)]
        at = tokens.find(_B64_MARK, end)
    # past `_RUNS_MOST` runs (percent ones count), the others are read in bulk
    bulk = _bulk(text, tokens.rfind(b" ", 0, at) + 1, depth) if at >= 0 else []
    # every decoded text read as one (one search, not one a run: a text of many short runs);
    # a find spanning several names each
    decoded = [(m, plain) for m, texts in runs for plain in texts]
    if not decoded:
        return bulk
    starts, at = [], 0
    for _, plain in decoded:
        starts.append(at)
        at += len(plain) + len(_SPLIT)
    found = bulk
    for f in _find(_SPLIT.join(plain for _, plain in decoded), False, depth + 1):
        first = bisect.bisect_right(starts, f.start) - 1
        last = bisect.bisect_right(starts, f.end - 1) - 1
        found += [Found(m.start(), m.end(), f.kind) for m, _ in decoded[first:last + 1]]
    return found


def _find(text: str, high_entropy: bool, depth: int = 0) -> list[Found]:
    lowered = text.lower()
    hinted = _hinted(text, lowered)
    tokens = _tokens(text)
    entropy_too = high_entropy and _long_run(text, tokens)
    encoded = _encoded(text, depth, tokens)
    if not hinted and not entropy_too:  # every catalogue kind has hints: the common, clean text
        return _merge(encoded)
    found: list[Found] = encoded
    ascii_lowered = lowered if text.isascii() else None
    for kind in _runnable(text, hinted, entropy_too):
        for m in _scan(kind, text, ascii_lowered, depth > 0):
            start, end = _value_span(m)
            if start == end or (kind.check and not kind.check(text[start:end])):
                continue
            found.append(Found(start, end, kind))
    return _merge(found)


def _merge(found: list[Found]) -> list[Found]:
    if len(found) < 2:
        return found
    merged: list[Found] = []
    for f in sorted(found, key=lambda f: (f.start, ORDER[f.kind])):
        if merged and f.start < merged[-1].end:
            last = merged[-1]
            winner = last.kind if ORDER[last.kind] <= ORDER[f.kind] else f.kind
            merged[-1] = Found(last.start, max(last.end, f.end), winner)
        else:
            merged.append(f)
    return merged


def maybe(text: str) -> bool:
    """Whether `find` could find anything: a cheap test before it."""
    return any(bool(_hinted(seen)) or _encodable(seen)  # (a long run is encodable)
               for seen in _readings(text))


def quiet(text: str) -> bool:
    """Whether `find` finds nothing in `text`, proven without its scan: in every reading no kind
    could run (no hint, or only hints of kinds needing an assignment where none is) and nothing
    is encoded."""
    return not any(_encodable(seen) or _runnable(seen, _hinted(seen), False)  # (the cheaper
                   for seen in ([text] if text.isascii() else _readings(text)))  # one first)


def all_quiet(texts: list[str]) -> bool:
    """Whether `find` finds nothing in each of `texts` (not in their join): one `quiet` test of
    them joined by `_SPLIT`, which joins no hint, run or escape (one test, not one a text)."""
    return quiet(_SPLIT.join(texts))


def any_matches(texts: list[str]) -> bool:
    """`matches` of any of `texts`, in one test of their join by `_SPLIT` (a newline would join
    two texts' base64 runs into one wrapped run, decoded to other bytes: a key one holds hidden)."""
    return matches(_SPLIT.join(texts))


def matches(text: str) -> bool:
    """Whether any pattern `find` would try matches somewhere in `text`, its checks aside. False
    also clears every part of `text` set apart by characters no pattern consumes across (the
    values of a JSON text without escapes, between their quotes): each part holds only hints
    and runs the whole holds, and a pattern matching a part matches the whole at the same place.
    A pattern with a `lead` is searched from its first hint on: in ASCII text (where `lower()`
    keeps places and only ASCII letters match case-insensitively) no match starts earlier."""
    return any(_matches(seen) for seen in _readings(text))


def _matches(text: str) -> bool:
    lowered = text.lower()
    hinted = _hinted(text, lowered)
    tokens = _tokens(text)
    ascii_lowered = lowered if text.isascii() else None
    for kind in _runnable(text, hinted, _long_run(text, tokens)):
        if next(_scan(kind, text, ascii_lowered), None) is not None:
            return True
    return bool(_encoded(text, 0, tokens))


def redact(text: str, high_entropy: bool = True) -> str:
    """`text` with every secret replaced by `<SECRET:rule id>`."""
    out, last = [], 0
    for f in find(text, high_entropy):
        out += [text[last:f.start], f"<SECRET:{f.kind.rule}>"]
        last = f.end
    out.append(text[last:])
    return "".join(out)


def find_across(texts: list[str], high_entropy: bool = True) -> list[tuple[Found, int, int]]:
    """The secrets of texts a reader reads as one (parts or blocks in a row) that no text holds
    alone: each with the first and last text it spans."""
    if len(texts) < 2:
        return []
    starts, at = [], 0
    for text in texts:
        starts.append(at)
        at += len(text)
    out = []
    for f in find("".join(texts), high_entropy):
        first = bisect.bisect_right(starts, f.start) - 1
        last = bisect.bisect_right(starts, f.end - 1) - 1
        if first != last:
            out.append((f, first, last))
    return out


def redact_run(texts: list[str], high_entropy: bool = True) -> list[str]:
    """Texts a reader reads as one (an answer's blocks in a row), each with its share of every
    secret of their join replaced by `<SECRET:rule id>`: a secret split across two is replaced in
    both, and each text stays in its place. One text: `redact`'s."""
    joined = "".join(texts)
    found = find(joined, high_entropy)
    if not found:
        return texts
    out, start = [], 0
    for text in texts:
        end = start + len(text)
        parts, last = [], start
        for f in found:
            if f.end <= start or f.start >= end:
                continue
            parts += [joined[last:max(f.start, start)], f"<SECRET:{f.kind.rule}>"]
            last = min(f.end, end)
        out.append("".join([*parts, joined[last:end]]))
        start = end
    return out
