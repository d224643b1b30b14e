"""The `douane` operator command. Each concern registers its subcommands in COMMANDS.

A subcommand module exposes `register(subparsers)`, which adds its parser(s) and sets `func`
(taking the parsed args, returning the exit code).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# modules whose register() adds subcommands
COMMANDS = [
    "douane.commands.check",
    "douane.commands.token",
    "douane.commands.login",
    "douane.commands.audit",
    "douane.commands.ca",
    "douane.commands.explain",
    "douane.commands.sessions",
    "douane.commands.approvals",
    "douane.commands.mask",
    "douane.commands.connect",
    "douane.commands.credentials",
    "douane.commands.tools",
    "douane.commands.owners",
]
# commands a credential helper or a shell runs often (`douane token` as Claude Code's
# apiKeyHelper): only their own module is imported, not the gateway's whole machinery
LIGHT = {"token": "douane.commands.token", "login": "douane.commands.login",
         "logout": "douane.commands.login", "connect": "douane.commands.connect"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="douane", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    argv = sys.argv[1:] if argv is None else argv
    for module in [LIGHT[argv[0]]] if argv and argv[0] in LIGHT else COMMANDS:
        importlib.import_module(module).register(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:
        # `douane ca env | head`: the reader left; exit quietly, and keep the interpreter's
        # final flush of stdout from raising again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
