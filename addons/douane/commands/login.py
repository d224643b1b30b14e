"""`douane login [--device]` and `douane logout`: a session at the configured OpenID Provider."""

from __future__ import annotations

import argparse
import sys

from douane.commands import add_config_option, load_config
from douane.login import Login, LoginError, pick_issuer


def add_issuer_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--issuer", help="the issuer's URL (default: the first of "
                        "identity.issuers with a client_id)")


def login_for(args: argparse.Namespace) -> Login:
    return Login(pick_issuer(load_config(args), args.issuer))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("login", help="log in at your identity provider once (a browser, or "
                       "--device for a code to enter elsewhere)")
    p.add_argument("--device", action="store_true",
                   help="the device authorization grant: no browser needed on this machine")
    add_issuer_option(p)
    add_config_option(p)
    p.set_defaults(func=run_login)
    p = sub.add_parser("logout", help="forget (and revoke) the session `douane login` keeps")
    add_issuer_option(p)
    add_config_option(p)
    p.set_defaults(func=run_logout)


def run_login(args: argparse.Namespace) -> int:
    try:
        login = login_for(args)
        login.with_device() if args.device else login.with_browser()
    except LoginError as e:
        print(f"douane: {e}", file=sys.stderr)
        return 1
    print(f"douane: logged in at {login.issuer.issuer}; `douane token` prints a fresh access "
          "token, `douane connect` runs a local proxy that adds one", file=sys.stderr)
    return 0


def run_logout(args: argparse.Namespace) -> int:
    try:
        login = login_for(args)
        known = login.logout()
    except LoginError as e:
        print(f"douane: {e}", file=sys.stderr)
        return 1
    print(f"douane: {'logged out of' if known else 'no session at'} {login.issuer.issuer}",
          file=sys.stderr)
    return 0
