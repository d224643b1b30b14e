"""`douane token USER --groups G --ttl 1h`: mint a token from the local dev issuer."""

from __future__ import annotations

import argparse
import re
import sys

from douane import devissuer
from douane.commands import add_config_option, config_file, load_config


def ttl(value: str) -> int:
    m = re.fullmatch(r"(\d+)([smhd]?)", value)
    if not m:
        raise argparse.ArgumentTypeError("expected a duration such as 900, 15m, 1h, 1d")
    return int(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("token", help="mint a token from the local dev issuer (development only)")
    p.add_argument("user")
    p.add_argument("--groups", default="", help="comma-separated groups")
    p.add_argument("--ttl", type=ttl, default=3600, help="lifetime, e.g. 15m, 1h (default 1h)")
    add_config_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = load_config(args)
    dev = config.identity.dev_issuer
    if dev is None:
        print(f"{config_file(args)}: identity.dev_issuer is not enabled; get a token from your "
              "identity provider instead", file=sys.stderr)
        return 1
    groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    print(devissuer.mint(dev, args.user, groups, args.ttl))
    return 0
