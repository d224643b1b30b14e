"""Header reads on the per-request path, one pass over a message's fields for all of them.

mitmproxy's `Headers.get`, `in` and `pop` each scan every field through several Python calls (and
`pop` scans three times, a missing name raising KeyError inside): ~30 of them per request cost
more than most of douane's own steps. These read `headers.fields` directly, with mitmproxy's
semantics: names are case-insensitive, a name given several times is folded into one value
joined by ", " (as `Headers.get` folds it), values are decoded as mitmproxy decodes them.
The fields are indexed by lower-case name once and the index kept beside the very tuple it was
built from: every change to a `Headers` replaces its `fields` tuple, so a read after a change
indexes the new fields (reads always see the fields as they are now); `put` and `pop` index
what they write.

The index holds a name's value as the field's bytes (a tuple of them for a name given several
times), in a dict of bytes: the garbage collector does not track it (a list per name made ~10
tracked objects a request, each kept until the flow's cycle is collected, and traversed by every
young collection meanwhile), and it is kept as two attributes, not a tuple that would be one more.
"""

from __future__ import annotations

from collections.abc import Collection

from mitmproxy.http import Headers

_INDEXED = "_douane_indexed"  # the fields tuple indexed
_INDEX = "_douane_fields"  # its index: lower-case name -> its value, or values (a tuple)

Values = bytes | tuple[bytes, ...]


def _index(headers: Headers) -> dict[bytes, Values]:
    fields = headers.fields
    attributes = headers.__dict__
    if attributes.get(_INDEXED) is fields:
        return attributes[_INDEX]
    index: dict[bytes, Values] = {}
    for k, v in fields:
        k = k.lower()
        if k in index:
            before = index[k]
            index[k] = (*before, v) if type(before) is tuple else (before, v)
        else:
            index[k] = v
    _keep(headers, fields, index)
    return index


def _keep(headers: Headers, fields: tuple, index: dict[bytes, Values]) -> None:
    attributes = headers.__dict__
    attributes[_INDEXED] = fields
    attributes[_INDEX] = index


def _text(values: Values) -> str:
    if type(values) is bytes:
        return values.decode("utf-8", "surrogateescape")
    return ", ".join(v.decode("utf-8", "surrogateescape") for v in values)


def get(headers: Headers, name: bytes, default: str | None = None) -> str | None:
    """`headers.get(name, default)`; `name` in lower case."""
    values = _index(headers).get(name)
    return default if values is None else _text(values)


def present(headers: Headers, names: Collection[bytes]) -> list[bytes]:
    """Which of `names` (lower case) the headers carry, in the order of the fields."""
    return [k for k in _index(headers) if k in names]


def put(headers: Headers, name: str, value: str) -> None:
    """`headers[name] = value`: the first field of that name (any case) takes the value in its
    place and keeps its spelling, later ones go; a name not there is appended as written."""
    key, encoded = (name.encode("utf-8", "surrogateescape"),
                    value.encode("utf-8", "surrogateescape"))
    lowered = key.lower()
    index = _index(headers)
    if lowered not in index:
        headers.fields = (*headers.fields, (key, encoded))
        _keep(headers, headers.fields, {**index, lowered: encoded})
        return
    fields, done = [], False
    for field in headers.fields:
        if field[0].lower() != lowered:
            fields.append(field)
        elif not done:
            fields.append((field[0], encoded))
            done = True
    headers.fields = tuple(fields)


def pop(headers: Headers, names: Collection[bytes]) -> dict[bytes, str]:
    """Remove every field named in `names` (lower case); the values removed, by name, folded
    (`headers.pop(name)` for each). The fields are rewritten only when one is removed."""
    index = _index(headers)
    if not any(name in index for name in names):
        return {}
    removed = {name: index[name] for name in index if name in names}
    headers.fields = tuple(field for field in headers.fields if field[0].lower() not in names)
    # the index of what is left is the index without those names
    _keep(headers, headers.fields, {k: v for k, v in index.items() if k not in names})
    return {k: _text(v) for k, v in removed.items()}
