"""Text as a rule should see it: trivial obfuscation folded away before matching.

NFKC (full-width and styled letters become plain), case folding, zero-width and bidi control
characters removed, look-alike Cyrillic and Greek letters folded to Latin, whitespace collapsed.
Optionally, base64 runs are decoded and appended so a denied phrase cannot hide in them.
"""

from __future__ import annotations

import base64
import binascii
import re
import unicodedata

INVISIBLE = dict.fromkeys(map(ord, "\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180e"
                                   "\u200b\u200c\u200d\u200e\u200f\u202a\u202b\u202c\u202d\u202e"
                                   "\u2060\u2061\u2062\u2063\u2064\u2066\u2067\u2068\u2069"
                                   "\u206a\u206b\u206c\u206d\u206e\u206f\ufeff\ufe0f\ufe0e"))
# Letters that look like Latin ones (after case folding), from Unicode's confusables list.
CONFUSABLES = str.maketrans({
    "а": "a", "в": "b", "е": "e", "ё": "e", "з": "3", "і": "i", "ї": "i", "ј": "j", "к": "k",
    "м": "m", "н": "h", "о": "o", "р": "p", "с": "c", "т": "t", "у": "y", "х": "x", "ѕ": "s",
    "ԁ": "d", "ԛ": "q", "ԝ": "w", "һ": "h", "ӏ": "l", "ɡ": "g", "ı": "i",
    "α": "a", "β": "b", "γ": "y", "ε": "e", "η": "n", "ι": "i", "κ": "k", "ν": "v", "ο": "o",
    "ρ": "p", "σ": "o", "ς": "c", "τ": "t", "υ": "u", "χ": "x", "ω": "w", "ϲ": "c", "ϳ": "j",
    "ℓ": "l", "∕": "/", "⁄": "/", "‐": "-", "‑": "-", "‒": "-", "–": "-", "—": "-",
})
WHITESPACE = re.compile(r"\s+")
BASE64_RUN = re.compile(r"[A-Za-z0-9+/_-]{16,}={0,2}")


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).translate(INVISIBLE).casefold()
    return WHITESPACE.sub(" ", text.translate(CONFUSABLES))


def decoded_base64(text: str) -> list[str]:
    """Readable text hidden in base64 runs of `text`."""
    found = []
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
