"""A real MCP server (the `mcp` SDK's MCPServer) over Streamable HTTP, for end-to-end tests.

Run as `python -m tests.support.mcp_server PORT`; tools: echo, lookup_customer (returns PII),
delete_records; a resource and a prompt.
"""

from __future__ import annotations

import sys

import uvicorn
from mcp.server.mcpserver import MCPServer

server = MCPServer("douane-test-server")


@server.tool()
def echo(text: str) -> str:
    """Echo the text back."""
    return text


@server.tool()
def lookup_customer(customer_id: str) -> str:
    """Look up a customer record."""
    return (f"Customer {customer_id}: John Smith, email john.smith@example.com, "
            f"phone 212-555-0147, card 4111 1111 1111 1111")


@server.tool()
def delete_records(table: str, where: str) -> str:
    """Delete rows from a table."""
    return f"deleted from {table} where {where}"


@server.resource("file:///docs/readme.txt")
def readme() -> str:
    """The project readme."""
    return "Readme: contact jane.doe@example.org for access."


@server.prompt()
def summarize(topic: str) -> str:
    """Summarize a topic."""
    return f"Please summarize {topic}."


if __name__ == "__main__":
    uvicorn.run(server.streamable_http_app(), host="127.0.0.1", port=int(sys.argv[1]),
                log_level="warning")
