"""Subcommands of the `douane` CLI, one module per command group.

Every command reads the gateway's configuration the same way: `--config`, else `$DOUANE_CONFIG`
(what `scripts/run` uses), else the embedded default, and says on stderr which file it read.
"""

from __future__ import annotations

import argparse
import os
import sys

from douane import config as configmod
from douane.settings import DEFAULT_CONFIG


def add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="the gateway's configuration (default: $DOUANE_CONFIG, "
                        "else policies/default.yaml)")


def config_file(args: argparse.Namespace) -> str:
    return args.config or os.environ.get("DOUANE_CONFIG") or str(DEFAULT_CONFIG)


def load_config(args: argparse.Namespace) -> configmod.Config:
    """The gateway's configuration as operator commands need it: upstream credentials are not
    read (commands send no model traffic). Exits 2 with the error on an invalid file."""
    file = config_file(args)
    try:
        config = configmod.load(file, gateway=False)
    except configmod.ConfigError as e:
        print(e, file=sys.stderr)
        raise SystemExit(2) from None
    print(f"douane: configuration {file}", file=sys.stderr)
    return config
