"""Any JSON API: prompt and response text found at the paths the upstream's config declares, and
every other string of the bodies inspected as prompt or answer text (`douane.protocols.fields`)."""

from __future__ import annotations

from typing import Any

from douane.config import Upstream
from douane.interaction import Interaction, TextPiece
from douane.protocols import fields, jsonpath


def parse_request(doc: Any, upstream: Upstream, endpoint: str) -> Interaction:
    it = Interaction("generic", endpoint)
    if isinstance(doc, dict) and isinstance(doc.get("model"), str):
        it.model = doc["model"]
    for pattern in upstream.request_text_paths:
        it.texts += [TextPiece("prompt", "user", text, path)
                     for path, text in jsonpath.expand(doc, pattern)]
    fields.cover(it, doc, lambda path: ("prompt", "user"), reads=0)
    return it


def parse_response(doc: Any, upstream: Upstream, it: Interaction) -> None:
    for pattern in upstream.response_text_paths:
        it.response_texts += [TextPiece("completion", "assistant", text, path)
                              for path, text in jsonpath.expand(doc, pattern)]
    fields.cover(it, doc, lambda path: ("completion", "assistant"), "response", 0)
