"""Applying the configured operator to each detected span: the text's only edit."""

from __future__ import annotations

import hashlib
import hmac

from douane.masking.config import MaskingSettings
from douane.masking.engine import Span


def resolve(spans: list[Span]) -> list[Span]:
    """Non-overlapping spans, preferring the higher score, then the longer span."""
    chosen: list[Span] = []
    for span in sorted(spans, key=lambda s: (-s.score, -(s.end - s.start), s.start)):
        if all(span.end <= c.start or span.start >= c.end for c in chosen):
            chosen.append(span)
    return sorted(chosen, key=lambda s: s.start)


def replacement(settings: MaskingSettings, span: Span, value: str) -> str:
    op = settings.operator(span.entity)
    if op.type == "redact":
        return ""
    if op.type == "mask":
        keep = min(op.keep_last, len(value) // 2)
        return "*" * (len(value) - keep) + (value[-keep:] if keep else "")
    if op.type == "hash":
        digest = hmac.new(settings.hash_key, value.encode(), hashlib.sha256).hexdigest()[:8]
        return f"<{span.entity}:{digest}>"
    return f"<{span.entity}>"


def apply(settings: MaskingSettings, text: str, spans: list[Span],
          counts: dict[str, int]) -> str:
    """`text` with each span replaced; entity counts are added to `counts` (never values)."""
    out, last = [], 0
    for span in resolve(spans):
        out += [text[last:span.start], replacement(settings, span, text[span.start:span.end])]
        last = span.end
        counts[span.entity] = counts.get(span.entity, 0) + 1
    out.append(text[last:])
    return "".join(out)
