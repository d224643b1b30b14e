"""What every wire format provides to the inspection pipeline."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from douane.interaction import HOSTED_TOOLS, Interaction, JsonPath, Kind, TextPiece
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
    # where the channel's text sits in the whole answer, when the blocks of an answer in a row
    # are read as one text (`streams.next_block`); None: read alone (a choice, tool arguments)
    block: JsonPath | None = None


ALL = "*"  # closes(): every open channel


class StreamFormat:
    """How one API streams: which events carry text, which close a channel, how to emit more."""

    # Strings no delta or recap names are filtered whole, each on its own (a field or event type
    # the format does not know is still inspected, never passed).
    strays = False
    # Paths of events that echo the request (already inspected), not filtered again as strays.
    echoes: tuple[JsonPath, ...] = ()

    def check(self, event: Event) -> None:
        """Raise ProtocolError for an event that must end the stream (before it is parsed)."""

    def check_message(self, doc: Any) -> None:
        """Raise ProtocolError for a parsed event that must end the stream (before any stage
        reads it)."""

    def split(self, event: Event, doc: Any) -> list[Event] | None:
        """The events to process in place of one that closes a channel it also carries text
        for (its text first, then the close), or None: each is then taken as it comes."""
        return None

    def deltas(self, event: Event, doc: Any) -> list[Delta]:
        return []

    def closes(self, event: Event, doc: Any) -> list[str]:
        """Channels ended by this event; their held text is emitted before it."""
        return []

    def recaps(self, event: Event, doc: Any) -> list[tuple[JsonPath, str]]:
        """Fields of this event that repeat a channel's whole text (rewritten to what was sent)."""
        return []

    def tool_names(self, doc: Any) -> list[tuple[str | None, str]]:
        """The tool-call names this event carries, each with its call (a name streamed in pieces
        that a client joins per call) or None (a name sent whole, read alone)."""
        return []

    def whole_items(self, doc: Any) -> list[TextPiece]:
        """The text of the remote MCP items this event carries whole (a call's server, a
        server's tool listing, a result), read as the whole answer reads them: their names and
        labels are no channel's text, and a result's kind is not a completion's."""
        return []

    def synthesize(self, channel: str, kind: Kind, text: str, template: Any) -> Event:
        raise NotImplementedError

    def error_event(self, message: str, code: str, status: int = 403) -> Event:
        """The API's error event ending a stream; `status`: the refusal's (403: douane's
        decision; 5xx: the upstream failed or douane could not inspect it)."""
        raise NotImplementedError


def require_object(doc: Any) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise ProtocolError(400, "invalid_body", "the request body must be a JSON object")
    return doc


def object_list(doc: dict[str, Any], key: str) -> list[dict[str, Any]]:
    """`doc[key]`: a list of objects, or nothing (absent, null, empty)."""
    items = doc.get(key)
    if not items:
        return []
    if not isinstance(items, list):
        raise ProtocolError(400, "invalid_body", f"{key} must be a list of objects")
    for item in items:
        if not isinstance(item, dict):
            raise ProtocolError(400, "invalid_body", f"{key} must be a list of objects")
    return items


def optional_number(doc: dict[str, Any], *keys: str) -> float | None:
    """The largest number given under `keys` (an upstream may read any of them: a grant's bound
    holds for each), None when none is; a number JSON cannot hold (`1e999`) is refused, and so
    is a value that is not a number (`"100000"`, `true`: a server with lax typing reads them as
    numbers douane did not check)."""
    largest = None
    for key in keys:  # (a loop: every request pays it, mostly for keys it does not give)
        value = doc.get(key)
        if value is None:
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool) or \
                isinstance(value, float) and not math.isfinite(value):
            raise ProtocolError(400, "invalid_number", f"{'/'.join(keys)} is not a finite number")
        if largest is None or value > largest:
            largest = value
    return largest


DATED = re.compile(r"_(?:\d{8}|\d{4}_\d{2}_\d{2})$")  # web_search_20250305, ..._2025_03_11
HOSTED_ALIASES = {"web_search_preview": "web_search", "computer_use_preview": "computer_use",
                  "computer": "computer_use", "tool_search_tool_regex": "tool_search",
                  "tool_search_tool_bm25": "tool_search"}


def hosted_tool(wire_type: Any) -> str:
    """The HOSTED_TOOLS kind of a tool's wire `type`; a type douane does not know is refused."""
    base = DATED.sub("", wire_type) if isinstance(wire_type, str) else ""
    kind = HOSTED_ALIASES.get(base, base)
    if kind not in HOSTED_TOOLS:
        raise unknown_tool(wire_type)
    return kind


def unknown_tool(wire_type: Any) -> ProtocolError:
    return ProtocolError(400, "unknown_tool_type", f"douane does not know the tool type "
                         f"{str(wire_type)[:40]!r} and refuses it")


def mcp_server(url: Any) -> str:
    if not isinstance(url, str) or not url:
        raise ProtocolError(400, "invalid_body", "a remote MCP server needs a URL")
    return url
