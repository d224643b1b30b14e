"""Header reads on the per-request path, one pass over a message's fields each.

mitmproxy's `Headers.get`, `in` and `pop` each scan every field through several Python calls (and
`pop` scans three times, a missing name raising KeyError inside): ~30 of them per request cost
more than most of douane's own steps. These read `headers.fields` directly, with mitmproxy's
semantics: names are case-insensitive, a name given several times is folded into one value
joined by ", " (as `Headers.get` folds it), values are decoded as mitmproxy decodes them.
Nothing is cached: every call reads the fields as they are now.
"""

from __future__ import annotations

from collections.abc import Collection

from mitmproxy.http import Headers


def _text(values: list[bytes]) -> str:
    return ", ".join(v.decode("utf-8", "surrogateescape") for v in values)


def get(headers: Headers, name: bytes, default: str | None = None) -> str | None:
    """`headers.get(name, default)`; `name` in lower case."""
    values = [v for k, v in headers.fields if k.lower() == name]
    return _text(values) if values else default


def present(headers: Headers, names: Collection[bytes]) -> list[bytes]:
    """Which of `names` (lower case) the headers carry, in the order of the fields."""
    found = []
    for k, _ in headers.fields:
        k = k.lower()
        if k in names and k not in found:
            found.append(k)
    return found


def pop(headers: Headers, names: Collection[bytes]) -> dict[bytes, str]:
    """Remove every field named in `names` (lower case); the values removed, by name, folded
    (`headers.pop(name)` for each). The fields are rewritten only when one is removed."""
    removed: dict[bytes, list[bytes]] = {}
    kept = []
    for field in headers.fields:
        k = field[0].lower()
        if k in names:
            removed.setdefault(k, []).append(field[1])
        else:
            kept.append(field)
    if removed:
        headers.fields = tuple(kept)
    return {k: _text(v) for k, v in removed.items()}
