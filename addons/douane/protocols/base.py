"""What every wire format provides to the inspection pipeline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from douane.interaction import Interaction, JsonPath, Kind
from douane.protocols.sse import Event


class ProtocolError(Exception):
    """The flow cannot be understood: it is refused with this status, code and message."""

    def __init__(self, status: int, code: str, message: str,
                 interaction: Interaction | None = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.interaction = interaction  # what was understood, so the refusal can answer in kind


@dataclass(frozen=True)
class Delta:
    """A piece of text carried by one stream event."""

    channel: str  # one independent text stream (a choice, a content block, a tool call's args)
    kind: Kind
    path: JsonPath  # where the text sits in the event's JSON data


ALL = "*"  # closes(): every open channel


class StreamFormat:
    """How one API streams: which events carry text, which close a channel, how to emit more."""

    def check(self, event: Event) -> None:
        """Raise ProtocolError for an event that must end the stream (before it is parsed)."""

    def check_message(self, doc: Any) -> None:
        """Raise ProtocolError for a parsed event that must end the stream (before any stage
        reads it)."""

    def deltas(self, event: Event, doc: Any) -> list[Delta]:
        return []

    def closes(self, event: Event, doc: Any) -> list[str]:
        """Channels ended by this event; their held text is emitted before it."""
        return []

    def recaps(self, event: Event, doc: Any) -> list[tuple[JsonPath, str]]:
        """Fields of this event that repeat a channel's whole text (rewritten to what was sent)."""
        return []

    def synthesize(self, channel: str, kind: Kind, text: str, template: Any) -> Event:
        raise NotImplementedError

    def error_event(self, message: str, code: str) -> Event:
        raise NotImplementedError


def require_object(doc: Any) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise ProtocolError(400, "invalid_body", "the request body must be a JSON object")
    return doc


def optional_number(doc: dict[str, Any], *keys: str) -> float | None:
    for key in keys:
        value = doc.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return value
    return None
