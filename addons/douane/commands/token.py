"""`douane token`: a fresh access token from the session `douane login` keeps (refreshed when
needed; a credential helper), or `douane token USER --groups G --ttl 1h`: one minted by the local
dev issuer."""

from __future__ import annotations

import argparse
import re
import sys

from douane import devissuer
from douane.commands import add_config_option, config_file, load_config
from douane.commands.login import add_issuer_option, login_for
from douane.login import LoginError


def ttl(value: str) -> int:
    m = re.fullmatch(r"(\d+)([smhd]?)", value)
    if not m:
        raise argparse.ArgumentTypeError("expected a duration such as 900, 15m, 1h, 1d")
    return int(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("token", help="print a fresh access token after `douane login`; with USER, "
                       "mint one from the local dev issuer (development only)")
    p.add_argument("user", nargs="?", help="mint a dev-issuer token for this user")
    p.add_argument("--groups", default="", help="comma-separated groups (dev issuer)")
    p.add_argument("--ttl", type=ttl, default=3600,
                   help="lifetime, e.g. 15m, 1h (dev issuer; default 1h)")
    add_issuer_option(p)
    add_config_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.user is None:
        try:
            print(login_for(args).access_token().access_token)
        except LoginError as e:
            print(f"douane: {e}", file=sys.stderr)
            return 1
        return 0
    config = load_config(args)
    dev = config.identity.dev_issuer
    if dev is None:
        print(f"{config_file(args)}: identity.dev_issuer is not enabled; get a token from your "
              "identity provider instead", file=sys.stderr)
        return 1
    groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    print(devissuer.mint(dev, args.user, groups, args.ttl))
    return 0
