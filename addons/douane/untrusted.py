"""Values douane did not write (claims, model and tool names, paths, header values, messages
quoting them, an approver's reason): refused at the door when absurd, bounded and scrubbed of
secrets before they are kept in a record, escaped before they reach a terminal or a log line.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from typing import Any

from anyascii import anyascii

from douane.interaction import Interaction
from douane.secrets import SHORTEST_SECRET, any_matches, redact

# C0, DEL, C1, the Arabic letter mark, LRM/RLM, line and paragraph separators, bidi embeddings,
# overrides and isolates: what moves a terminal's cursor, colours or hides text, or reorders it;
# and lone surrogates (a JSON `\ud800`), which no UTF-8 file, terminal or database can hold.
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e"
                     "\u2066-\u2069\ud800-\udfff]")
SURROGATE = re.compile("[\ud800-\udfff]")
NAME_CHARS = 256  # a model or tool name longer than this is not a name
FIELD_CHARS = 1024  # a string kept in a record (audit, index, recording metadata)
LIST_ITEMS = 64  # items of a list kept in a record
SECRET_MARGIN = 512  # redaction looks this far past a cut: a secret straddling it goes whole
ECHO_CHARS = 40  # of a client's value a refusal quotes back (`quoted`)
HASH_CHARS = 12  # hex digits of SHA-256 naming a cut value (or a user's folder)
# douane's own identifiers (decision, approval and grant ids, flow ids): never a secret's shape
IDS = re.compile(r"(?:dcn|apr|grt)_[0-9a-f]{16,20}|[0-9a-f]{8}(?:-[0-9a-f]{4}){3}-[0-9a-f]{12}")
CLEAN_VALUES = 4096  # short values known to hold no secret, not scanned again
_clean: set[str] = set()


def escape(value: object, keep: str = "") -> str:
    """`value` as text with every control character (but those in `keep`) shown as `\\xNN` or
    `\\uNNNN`: a value cannot start a log line, move the cursor, recolour or reorder text."""
    text = str(value)
    if not CONTROL.search(text):
        return text
    return CONTROL.sub(lambda m: m.group(0) if m.group(0) in keep else
                       f"\\x{ord(m.group(0)):02x}" if ord(m.group(0)) < 0x100 else
                       f"\\u{ord(m.group(0)):04x}", text)


def encodable(text: str) -> str:
    """`text` with its lone surrogates written as `\\udXXX`: a record, a page, a database can
    hold it (no UTF-8 holds a lone surrogate, which a JSON `\\ud800` escape makes)."""
    if text.isascii() or not SURROGATE.search(text):
        return text
    return SURROGATE.sub(lambda m: f"\\u{ord(m.group(0)):04x}", text)


def loggable(value: object, limit: int = 256) -> str:
    """A value for a log line: scrubbed, cut, escaped (one line, no secret, no escape codes)."""
    return escape(scrub(str(value), limit))


def quoted(value: str, chars: int = ECHO_CHARS) -> str:
    """A client's value quoted back in a refusal: cut at `chars` characters (the rest counted)
    and every control character escaped (`repr`): a 30 KB header is not sent back whole, nor an
    escape code to the terminal that prints the error."""
    shown = repr(value[:chars])
    return shown if len(value) <= chars else f"{shown}… ({len(value)} characters)"


def digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:HASH_CHARS]


def bad_name(what: str, name: str) -> str | None:
    """Why `name` (a model's, a tool's) is refused at the door, or None."""
    if len(name) > NAME_CHARS:
        return f"the {what} is {len(name)} characters long (at most {NAME_CHARS})"
    if CONTROL.search(name):
        return f"the {what} contains control characters"
    return None


def scrub(text: str, limit: int = FIELD_CHARS) -> str:
    """A value to keep: secrets redacted, cut at `limit` characters with a marker naming the
    full value's length and hash (the same value recognised across records, never kept whole)."""
    if len(text) <= limit:
        return text if len(text) < SHORTEST_SECRET else redact(text)
    kept = redact(text[:limit + SECRET_MARGIN])[:limit]
    return f"{kept}…[cut: {len(text)} characters, sha256 {digest(text)}]"


def scrub_all(value: Any, limit: int = FIELD_CHARS) -> Any:
    """`scrub` on every string of a JSON-like value, and lists cut at `LIST_ITEMS` items.
    Cheap in the usual case, where there is no secret: values seen clean before (the same user,
    model, path in every record) are not scanned again, and the others are scanned once, joined
    (`secrets.any_matches`), instead of one pass of the detectors each.
    A dict nothing in which changes is returned as it is, not copied (an audit record, usually)."""
    texts: list[str] = []
    if type(value) is dict and _as_is(value, limit, texts) and clean(texts):
        return value
    texts = []

    def cut(text: str) -> str:
        text = encodable(text)  # else the record cannot be written
        text = text if len(text) <= limit else scrub(text, limit)
        texts.append(text)
        return text

    kept = _mapped(value, cut)  # one walk: cut, and the strings to scan collected
    return kept if clean(texts) else _mapped(value, lambda text: scrub(text, limit))


def clean(texts: list[str], ids: bool = True, remembered: int = NAME_CHARS) -> bool:
    """Whether none of `texts` holds a secret. Values seen clean before are not scanned again;
    the others are searched once, joined (`secrets.any_matches`), for any pattern's match: where
    none is, none is in any of them (a match in one is a match in the joined text), and those up
    to `remembered` characters are then known clean. Where one is, each is redacted alone: a
    match across two values that fails its check (`the password is` + `[x]password=...` reads
    as a placeholder) would hide the secret behind it. `ids`: douane's own identifiers are known clean (in its records, not in a body)."""
    fresh = [t for t in texts if len(t) >= SHORTEST_SECRET and t not in _clean
             and not (ids and IDS.fullmatch(t))]
    if not fresh:
        return True
    if any_matches(fresh) and any(redact(t) != t for t in fresh):
        return False
    if len(_clean) > CLEAN_VALUES:
        _clean.clear()
    _clean.update(t for t in fresh if len(t) <= remembered)
    return True


def _as_is(value: dict[Any, Any] | list[Any] | tuple[Any, ...], limit: int,
           texts: list[str]) -> bool:
    """Whether `scrub_all`'s walk would keep `value` as it is, secrets aside: every string
    encodable and within `limit`, every list within `LIST_ITEMS` (anything else: the walk
    decides). Its strings `clean` would scan are appended to `texts` (not the short ones nor
    those known clean: `clean` would skip them). No copy, no call per string."""
    for v in value.values() if type(value) is dict else value:
        t = type(v)
        if t is str:
            if len(v) > limit or not (v.isascii() or not SURROGATE.search(v)):
                return False
            if len(v) >= SHORTEST_SECRET and v not in _clean:
                texts.append(v)
        elif t is dict or t is list or t is tuple:
            if (t is not dict and len(v) > LIST_ITEMS) or not _as_is(v, limit, texts):
                return False
        elif v is not None and t is not int and t is not float and t is not bool:
            return False
    return True


def _mapped(value: Any, func: Callable[[str], str]) -> Any:
    if isinstance(value, str):
        return func(value)
    if isinstance(value, dict):  # (strings and scalars in place: records are mostly flat)
        return {k: func(v) if type(v) is str else v if v is None or type(v) in (int, float, bool)
                else _mapped(v, func) for k, v in value.items()}
    if isinstance(value, list | tuple):
        items = [_mapped(v, func) for v in value[:LIST_ITEMS]]
        if len(value) > LIST_ITEMS:
            items.append(f"…[cut: {len(value)} items]")
        return items
    return value


def slug(name: str, chars: int = 48) -> str:
    """A file name for `name`, injective: a readable ASCII part (transliterated) plus a hash of
    the exact name (`иван@x.example` -> `ivan@x.example--…`, `a/b` and `a_b` differ), at most
    chars + 14 long."""
    readable = re.sub(r"[^A-Za-z0-9@._+-]+", "-", anyascii(name)).strip("-.")[:chars].rstrip("-.")
    return f"{readable or 'x'}--{digest(name)}"


def absurd_name(it: Interaction) -> str | None:
    """Why the interaction's model or a tool it names is refused at the door, or None."""
    if it.model is not None and (problem := bad_name("model name", str(it.model))):
        return problem
    for names in ([m.tool for m in it.mcp], [c.name for c in it.tool_calls],
                  [t.name for t in it.tools]):
        for name in names:
            if name is not None and (problem := bad_name("tool name", str(name))):
                return problem
    return None
