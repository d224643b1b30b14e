"""The body walk as it was at stop 29 (`douane.protocols.fields.cover` and its helpers, commit
7d29a0d), frozen: the oracle the faster walk is compared with on random bodies
(tests/test_walk_equivalence.py). Not used by douane itself; do not edit to follow the walk."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from douane.interaction import Interaction, JsonPath, Kind, TextPiece
from douane.protocols.base import ProtocolError
from douane.protocols.fields import (
    _ARGUMENTS,
    DECODED,
    ENCODED,
    JSON_STRING,
    KEYS,
    MAX_DEPTH,
    MAX_STRINGS,
    MEDIA_PARTS,
    OPAQUE,
    OPAQUE_KEYS,
    SCALARS,
    STRUCTURAL,
    Classified,
    Classify,
    _payload,
    _text_of,
    _type,
    readable,
)


@dataclass
class _Walk:
    classify: Classify
    named: dict[JsonPath, TextPiece]
    reads: int | None  # `classify` reads at most this many steps of a path (None: unknown)
    text: list[TextPiece] = field(default_factory=list)  # free text, in document order
    # keys and structural values, by kind: one piece per kind (many short strings would make as
    # many pieces, each paying the detectors' fixed cost; they are never edited anyway)
    tail: dict[Kind, list[str]] = field(default_factory=dict)
    media: bool = False
    count: int = 0

    def counted(self, n: int = 1) -> None:
        self.count += n
        if self.count > MAX_STRINGS:
            raise ProtocolError(413, "too_many_fields",
                                f"the body holds more than {MAX_STRINGS} strings; douane refuses "
                                "what it cannot inspect whole")

    def keys(self, kind: Kind, keys: Any) -> None:
        before = len(tail := self.tail.setdefault(kind, []))
        tail.extend(keys)
        self.counted(len(tail) - before)

    def add(self, path: JsonPath, text: str, editable: bool, tail: bool,
            fixed: Classified | None, classify_at: JsonPath | None = None) -> TextPiece | None:
        self.count += 1
        if self.count > MAX_STRINGS:
            self.counted(0)
        named = self.named.pop(path, None) if self.named else None
        if named is not None:
            self.text.append(named)
            return named
        if not text:
            return None
        kind, role = fixed if fixed is not None else \
            self.classify(classify_at if classify_at is not None else path)
        if tail:
            self.tail.setdefault(kind, []).append(text)
            return None
        piece = TextPiece(kind, role, text, path, editable)
        self.text.append(piece)
        return piece


def cover(it: Interaction, doc: Any, classify: Classify, side: str = "request",
          reads: int | None = None) -> None:
    """Every string of `doc` as a text piece of `it` (the parsers' named pieces kept, in place).
    `reads`: `classify` reads at most the first `reads` steps of a path, so what lies deeper is
    classified once, where its branch reaches that depth (not once per string and object)."""
    pieces = it.texts if side == "request" else it.response_texts
    walk = _Walk(classify, {p.path: p for p in pieces}, reads)
    _node(walk, doc, (), None, {}, 0, None)
    pieces[:] = [*walk.text, *walk.named.values(),
                 *(TextPiece(kind, None, "\n".join(texts), (KEYS,), False)
                   for kind, texts in walk.tail.items())]
    it.has_media = it.has_media or (walk.media and side == "request")


def _node(walk: _Walk, node: Any, path: JsonPath, key: str | None, parent: dict[str, Any],
          depth: int, fixed: Classified | None) -> None:
    """`fixed`: what everything under `path` is classified as, once known (`cover`'s `reads`)."""
    if depth > MAX_DEPTH:
        raise ProtocolError(400, "too_deep", f"the body nests deeper than {MAX_DEPTH} levels; "
                            "douane refuses what it cannot inspect whole")
    if fixed is None and walk.reads is not None and depth >= walk.reads:
        fixed = walk.classify(path)
    if isinstance(node, dict):
        # keys are read where their object sits
        walk.keys((fixed if fixed is not None else walk.classify(path))[0], node)
        kind = _type(node)
        if kind in MEDIA_PARTS:
            walk.media = True
        for k, v in node.items():
            if k in OPAQUE_KEYS and (k, kind) in OPAQUE:
                continue
            # most values: no call to learn what they are (past the depth bound, _node refuses)
            if depth < MAX_DEPTH and type(v) in SCALARS:
                if type(v) is str:
                    _string(walk, v, (*path, k), k, node, depth + 1, fixed)
            else:
                _node(walk, v, (*path, k), k, node, depth + 1, fixed)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            if depth < MAX_DEPTH and type(v) in SCALARS:
                if type(v) is str:
                    _string(walk, v, (*path, i), key, parent, depth + 1, fixed)
            else:
                _node(walk, v, (*path, i), key, parent, depth + 1, fixed)
    elif isinstance(node, str):
        _string(walk, node, path, key, parent, depth, fixed)


def _string(walk: _Walk, text: str, path: JsonPath, key: str | None, parent: dict[str, Any],
            depth: int, fixed: Classified | None) -> None:
    if fixed is None and walk.reads is not None and depth >= walk.reads:
        fixed = walk.classify(path)
    # (the test `_payload` starts with, to spare most strings a call)
    payload = _payload(text, key, parent) if key in ("data", "file_data") or \
        len(text) >= ENCODED or text[:1] in ("d", "D") else None
    if payload is not None:
        media_type, raw, explicit = payload
        decoded = _text_of(media_type, raw, explicit)
        if decoded is None:
            walk.media = True
        else:
            walk.add((*path, DECODED), decoded, False, False, fixed, path)
        if path in walk.named or decoded is None and len(text) < ENCODED:
            walk.add(path, text, False, False, fixed)  # named as text, or too short to be a file
        return
    piece = walk.add(path, text, key not in STRUCTURAL, key in STRUCTURAL, fixed)
    if key == "arguments":
        try:
            decoded_args = _ARGUMENTS.decode(text)
        except (ValueError, RecursionError):
            return  # not JSON: the raw string above is what the tool reads
        if piece is not None and piece.editable:
            piece.text = readable(piece.text)  # masked as the tool will read it
        if isinstance(decoded_args, dict | list):
            values: list[str] = []
            kind = (fixed if fixed is not None else walk.classify(path))[0]
            _arguments(walk, decoded_args, values, kind, depth + 1)
            walk.add((*path, JSON_STRING), " ".join(values), False, False, fixed, path)


def _arguments(walk: _Walk, node: Any, values: list[str], kind: Kind, depth: int) -> None:
    """Decoded tool arguments: the values in order, joined into one text (a phrase split across
    two stays adjacent), keys with the other keys (of `kind`: where the arguments string sits),
    never edited in place."""
    if depth > MAX_DEPTH:
        raise ProtocolError(400, "too_deep", f"tool arguments nest deeper than {MAX_DEPTH} levels")
    if isinstance(node, dict):
        walk.keys(kind, node)
        for v in node.values():
            _arguments(walk, v, values, kind, depth + 1)
    elif isinstance(node, list):
        for v in node:
            _arguments(walk, v, values, kind, depth + 1)
    elif isinstance(node, str):
        walk.counted()
        values.append(node)
