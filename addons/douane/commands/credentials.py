"""`douane credentials set|list|delete`: the per-user upstream secrets douane injects for upstreams
acting on a user's behalf (`credentials.per_user`), encrypted at rest in the state dir.

An operator command run on the gateway host (it reads the store's key): the operator sets a user's
secret with `--user`, or a user with shell access to the host sets their own. The secret is read
from stdin, or prompted for without echo; it is never printed, logged nor put in argv.
"""

from __future__ import annotations

import argparse
import getpass
import sys

from douane.commands import add_config_option, load_config
from douane.untrusted import escape
from douane.usersecrets import MAX_SECRET, UserSecrets


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("credentials", help="per-user upstream secrets: set, list, delete")
    add_config_option(p)
    verbs = p.add_subparsers(dest="verb", required=True)
    put = verbs.add_parser("set", help="store USER's secret for UPSTREAM (read from stdin, or "
                           "prompted for without echo)")
    put.add_argument("upstream")
    put.add_argument("--user", required=True, help="the user name, as the gateway's identity "
                     "names it (the token's user claim)")
    put.set_defaults(func=set_)
    ls = verbs.add_parser("list", help="the (upstream, user) pairs douane holds a secret for")
    ls.add_argument("--user", help="only this user's")
    ls.set_defaults(func=list_)
    rm = verbs.add_parser("delete", help="forget USER's secret for UPSTREAM")
    rm.add_argument("upstream")
    rm.add_argument("--user", required=True)
    rm.set_defaults(func=delete_)


def _store(args: argparse.Namespace) -> UserSecrets:
    config = load_config(args)
    if "gateway.credentials_key" in config.unresolved:
        raise SystemExit(f"douane: gateway.credentials_key: "
                         f"{config.unresolved['gateway.credentials_key']}")
    if getattr(args, "upstream", None) is not None:
        upstream = next((u for u in config.upstreams if u.name == args.upstream), None)
        if upstream is None or not upstream.per_user:
            raise SystemExit(f"douane: no upstream {escape(args.upstream)} with "
                             "credentials.per_user in the configuration")
    return UserSecrets(config.state_dir, config.credentials_key)


def set_(args: argparse.Namespace) -> int:
    store = _store(args)
    if sys.stdin.isatty():
        secret = getpass.getpass(f"secret for {escape(args.upstream)} ({escape(args.user)}): ")
    else:
        secret = sys.stdin.read(MAX_SECRET + 2)
    try:
        store.set(args.upstream, args.user, secret.strip())
    except ValueError as e:
        print(f"douane: {e}", file=sys.stderr)
        return 2
    print(f"douane: secret for {escape(args.upstream)} set for {escape(args.user)}",
          file=sys.stderr)
    return 0


def list_(args: argparse.Namespace) -> int:
    for upstream, user in _store(args).entries():
        if args.user is None or user == args.user:
            print(f"{escape(upstream)}\t{escape(user)}")
    return 0


def delete_(args: argparse.Namespace) -> int:
    if not _store(args).delete(args.upstream, args.user):
        print(f"douane: no secret for {escape(args.upstream)} held for {escape(args.user)}",
              file=sys.stderr)
        return 1
    return 0
