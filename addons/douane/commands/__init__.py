"""Subcommands of the `douane` CLI, one module per command group."""
