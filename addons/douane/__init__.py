"""douane: an identity-aware governance gateway for LLM and MCP traffic, as mitmproxy addons."""

__version__ = "0.1.0"
