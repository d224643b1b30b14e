"""The `douane` operator command. Each concern registers its subcommands in COMMANDS.

A subcommand module exposes `register(subparsers)`, which adds its parser(s) and sets `func`
(taking the parsed args, returning the exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# modules whose register() adds subcommands
COMMANDS = [
    "douane.commands.check",
    "douane.commands.token",
    "douane.commands.audit",
    "douane.commands.ca",
    "douane.commands.explain",
    "douane.commands.sessions",
    "douane.commands.approvals",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="douane", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        importlib.import_module(module).register(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
