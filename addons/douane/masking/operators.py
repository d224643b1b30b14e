"""Applying the configured operator to each detected span: the text's only edit."""

from __future__ import annotations

import hashlib
import hmac

from douane.masking.config import MaskingSettings
from douane.masking.engine import Span, merge


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
    """`text` with each span replaced (overlapping spans as their union); entity counts are
    added to `counts` (never values)."""
    out, last = [], 0
    for span in merge(spans):
        out += [text[last:span.start], replacement(settings, span, text[span.start:span.end])]
        last = span.end
        counts[span.entity] = counts.get(span.entity, 0) + 1
    out.append(text[last:])
    return "".join(out)
