"""Operations: a method and a normalised path, the unit douane allows or refuses before anything
reaches an upstream.

`normalize_target` validates a request target before routing: what an upstream could read as
another path than douane does (dot segments, encoded dots, slashes, backslashes or percent signs,
encoded control or non-ASCII bytes, empty segments, control characters) is refused; escapes of
unreserved characters are decoded (RFC 3986 6.2.2.2), so `/v1/%6dodels` is `/v1/models` here and
upstream alike. Method-override headers (`X-HTTP-Method-Override`, ...) would make an operation
another one upstream: a request carrying one is refused too. `Operation` is a pattern such as
`GET /v1/files/*/content`: `*` matches within one path segment, a `**` segment matches any number
of segments. Protocols declare the operations they parse (`douane.protocols.declared`); grants
name the others (`operations:` in a policy file).
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
METHOD_OVERRIDES = ("x-http-method-override", "x-http-method", "x-method-override")
UNRESERVED = frozenset(string.ascii_letters + string.digits + "-_~")  # "." is refused, not decoded
# printable ASCII but space, and never `\` or `#` (a fragment is never sent)
_TARGET = re.compile(r"[!-~]*")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
# A path with nothing to decode or refuse (no escape, query, empty or dot segment): as it is.
_PLAIN = re.compile(r"/|(?:/[A-Za-z0-9_~-][A-Za-z0-9_.~-]*)+/?")


class PathError(ValueError):
    """The request target is ambiguous: it is refused (400), never guessed at."""


def normalize_target(target: str) -> str:
    """The request target (path and query) to route on and send upstream, or PathError."""
    if _PLAIN.fullmatch(target):
        return target
    if not _TARGET.fullmatch(target) or "\\" in target or "#" in target:
        raise PathError("the request target holds a control character, space, backslash, "
                        "fragment or non-ASCII character")
    path, sep, query = target.partition("?")
    if not path.startswith("/"):
        raise PathError("the request target must be a path (origin form)")
    if re.search(r"%(?![0-9A-Fa-f]{2})", path):
        raise PathError("the path holds a malformed percent-escape")
    path = _ESCAPE.sub(_decoded_escape, path)
    segments = path.split("/")[1:]
    if any(s in (".", "..") for s in segments):
        raise PathError("the path holds a dot segment (. or ..)")
    if any(s == "" for s in segments[:-1]):
        raise PathError("the path holds an empty segment (//)")
    return path + sep + query


def _decoded_escape(m: re.Match[str]) -> str:
    code = int(m.group(1), 16)
    char = chr(code)
    if char in UNRESERVED:
        return char
    if char in "./\\%":
        raise PathError(f"the path holds an encoded {char!r} (%{m.group(1)}): refused as ambiguous")
    if code < 0x20 or code >= 0x7F:  # some servers fold non-ASCII (U+FF0E `．`) into ASCII
        raise PathError(f"the path holds an encoded control or non-ASCII byte (%{m.group(1)})")
    return "%" + m.group(1).upper()


@dataclass(frozen=True)
class Operation:
    method: str
    path: str  # the pattern as written, e.g. /v1/files/*/content
    segments: tuple[re.Pattern[str] | None, ...]  # None: `**`

    def __str__(self) -> str:
        return f"{self.method} {self.path}"

    def matches(self, method: str, path: str) -> bool:
        return method == self.method and _match(self.segments, tuple(path.split("/")[1:]))


def _match(pattern: tuple[re.Pattern[str] | None, ...], segments: tuple[str, ...]) -> bool:
    if not pattern:
        return not segments
    head, rest = pattern[0], pattern[1:]
    if head is None:  # `**`: any number of segments, none included
        return any(_match(rest, segments[i:]) for i in range(len(segments) + 1))
    return bool(segments) and head.fullmatch(segments[0]) is not None \
        and _match(rest, segments[1:])


def parse(text: str) -> Operation:
    """`METHOD /path/pattern`, or ValueError saying what is wrong with it."""
    method, _, path = text.strip().partition(" ")
    path = path.strip()
    if method not in METHODS:
        raise ValueError(f"{text!r}: expected METHOD /path with METHOD one of {', '.join(METHODS)}")
    if "?" in path:
        raise ValueError(f"{text!r}: an operation names a path, without a query")
    try:
        if normalize_target(path) != path:
            raise ValueError(f"{text!r}: write the path decoded: "
                             f"{normalize_target(path)}")
    except PathError as e:
        raise ValueError(f"{text!r}: {e}") from None
    segments = []
    for segment in path.split("/")[1:]:
        if segment == "**":
            segments.append(None)
        elif "**" in segment:
            raise ValueError(f"{text!r}: ** must be a whole segment")
        else:  # a lone `*` names a segment, so it is not empty (a trailing slash)
            segments.append(re.compile("[^/]+" if segment == "*" else
                                       "[^/]*".join(re.escape(p) for p in segment.split("*"))))
    return Operation(method, path, tuple(segments))
