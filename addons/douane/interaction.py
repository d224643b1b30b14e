"""What one flow means, whatever its wire format: the typed record every inspection reads and edits.

The protocol parsers (douane.protocols) build an `Interaction` from a request and add the response
side to it; policy, masking, approvals and recording read it. Every piece of text carries the JSON
path where it lives in its body, so masking can replace it in place and the body is re-serialised in
its exact wire format (see `douane.protocols.jsonpath`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["system", "user", "assistant", "tool", "developer"]
# Where a text piece sits in the exchange; policy and masking select on this.
Kind = Literal[
    "prompt",  # message content sent to a model (any role)
    "tool_description",  # a tool definition offered to a model or listed by an MCP server
    "tool_arguments",  # arguments of a tool call (model-made, or an MCP tools/call)
    "tool_result",  # what a tool returned (in a chat history, or an MCP tools/call result)
    "resource",  # MCP resource contents
    "completion",  # model output text
]
JsonPath = tuple[str | int, ...]
# Tools a provider runs itself (or defines itself), by kind; a grant names those it allows.
# Remote MCP servers are granted by URL instead (`mcp_servers`).
HOSTED_TOOLS = ("web_search", "web_fetch", "file_search", "code_interpreter", "code_execution",
                "computer_use", "image_generation", "local_shell", "shell", "apply_patch", "bash",
                "text_editor", "memory", "tool_search")


@dataclass(slots=True)
class TextPiece:
    """One addressable string inside a request or response body."""

    kind: Kind
    role: Role | None
    text: str
    path: JsonPath  # location in the body's JSON document (for SSE: in that event's data)
    # Masking may rewrite it at `path`: free text. Keys, ids, enums and text decoded from inside
    # a string (tool arguments, files) are inspected by policy but never edited.
    editable: bool = True
    # The text as the policy's secrets detector found nothing in it (`secrets.find`): the very
    # string, so that a text edited since (masking, an addon) is not taken for it; the recording
    # writer does not scan a value equal to it again.
    secret_free: str | None = field(default=None, repr=False, compare=False)


@dataclass(slots=True)
class ToolDef:
    name: str
    description: str
    path: JsonPath  # the tool object's location, so a list can be filtered


@dataclass(slots=True)
class ToolCall:
    name: str
    arguments: dict[str, Any] | str  # str when the arguments are not valid JSON
    call_id: str | None
    path: JsonPath


@dataclass(slots=True)
class McpMessage:
    """One JSON-RPC message of an MCP exchange."""

    method: str | None  # None for a response
    request_id: int | str | None
    params: dict[str, Any]
    session_id: str | None = None
    tool: str | None = None  # tools/call
    uri: str | None = None  # resources/read
    prompt: str | None = None  # prompts/get


@dataclass(slots=True)
class Interaction:
    """A flow understood: who asked what of which upstream, and (later) what came back."""

    protocol: Literal["openai", "anthropic", "mcp", "generic"]
    operation: str  # e.g. "chat.completions", "responses", "messages", "mcp:tools/call"
    model: str | None = None
    stream: bool = False
    store: Any = None  # OpenAI's `store` as given (what the answer leaves stored: `douane.owners`)
    max_tokens: int | None = None
    choices: int = 1  # answers asked for at once (`n`, `best_of`), each up to max_tokens
    temperature: float | None = None
    has_media: bool = False  # images, audio or files in the prompt (or asked of the model)
    spoken: bool = False  # the answer is asked for in speech (chat `modalities: [audio]`)
    texts: list[TextPiece] = field(default_factory=list)  # request side
    tools: list[ToolDef] = field(default_factory=list)  # tools offered to a model
    hosted_tools: list[str] = field(default_factory=list)  # HOSTED_TOOLS kinds requested
    mcp_servers: list[str] = field(default_factory=list)  # remote MCP server URLs a model may use
    betas: tuple[str, ...] = ()  # beta features its headers ask for (`douane.forwarding`)
    tool_calls: list[ToolCall] = field(default_factory=list)  # request side (history, MCP call)
    mcp: list[McpMessage] = field(default_factory=list)  # a batch has several
    response_texts: list[TextPiece] = field(default_factory=list)
    response_tools: list[ToolDef] = field(default_factory=list)  # MCP tools/list result
    # digests of the `requestState`s an MCP server's answers issued (2026-07-28 multi round trips)
    issued_states: list[str] = field(default_factory=list)
    response_tool_calls: list[ToolCall] = field(default_factory=list)
    # An operation no parser reads ("GET /v1/models"), passed because a grant names it: its JSON
    # bodies are inspected string by string, other answers are delivered uninspected.
    granted: bool = False
    # What was actually inspected, stated truthfully in the audit record ("request", "response",
    # "response-stream", ...). A flow to a declared upstream is inspected or refused, never skipped.
    inspected: list[str] = field(default_factory=list)
    # MCP: the requests by their ids' pairing keys, built once for the answers to be paired by
    # (`mcp.requests_by_id`, with the count of `mcp` it was built from)
    mcp_requests: tuple[int, dict[str, McpMessage]] | None = field(default=None, repr=False,
                                                                    compare=False)

    def prompt_text(self) -> str:
        return "\n".join(p.text for p in self.texts)

    def summary(self) -> dict[str, Any]:
        """Serialisable facts for the audit log and flow metadata (no text content)."""
        out: dict[str, Any] = {"protocol": self.protocol, "operation": self.operation}
        if self.model:
            out["model"] = self.model
        if self.stream:
            out["stream"] = True
        tools = [m.tool for m in self.mcp if m.tool]
        if tools:
            out["tool"] = tools[0] if len(tools) == 1 else tools
        if self.hosted_tools or self.mcp_servers:
            # bounded: the kinds and URLs come from the client
            out["hosted_tools"] = sorted({*self.hosted_tools, *(f"mcp:{u[:200]}"
                                                                for u in self.mcp_servers[:10])})
        if self.tool_calls:
            out["tool_calls"] = [c.name for c in self.tool_calls]
        if self.granted:
            out["granted_operation"] = True
        if self.inspected:
            out["inspected"] = list(self.inspected)
        return out
