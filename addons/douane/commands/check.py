"""`douane check FILE`: validate a configuration (and the files it names) without starting."""

from __future__ import annotations

import argparse
import os
import sys

from douane import config as configmod
from douane.settings import DEFAULT_CONFIG


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", help="validate a configuration file")
    p.add_argument("file", nargs="?", help="default: $DOUANE_CONFIG, else policies/default.yaml")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        config = configmod.load(args.file or os.environ.get("DOUANE_CONFIG") or DEFAULT_CONFIG)
    except configmod.ConfigError as e:
        print(e, file=sys.stderr)
        return 1
    print(f"{config.file}: ok (version {config.version}, {len(config.upstreams)} upstream(s): "
          f"{', '.join(u.name for u in config.upstreams) or '-'})")
    return 0
