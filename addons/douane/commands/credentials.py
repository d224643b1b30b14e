"""`douane credentials set|list|delete`: the per-user secrets douane injects for upstreams acting on
a user's behalf (`credentials.per_user`), encrypted at rest in the gateway's state dir.

Without `--user`, a user manages their own through the approvals API, authenticated with their own
token (`--token`/$DOUANE_TOKEN, e.g. `DOUANE_TOKEN=$(douane token)`). With `--user`, the operator
manages anyone's on the gateway host (the command reads the store's key). The secret is read from
stdin, or prompted for without echo; it is never printed, logged nor put in argv.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import urllib.parse

from douane import usersecrets
from douane.commands import add_config_option, load_config
from douane.commands.approvals import _call
from douane.untrusted import escape


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("credentials", help="per-user upstream secrets: set, list, delete")
    add_config_option(p)
    p.add_argument("--url", default=os.environ.get("DOUANE_APPROVALS_URL"),
                   help="the approvals API (default: $DOUANE_APPROVALS_URL, else "
                   "approvals.public_url)")
    p.add_argument("--token", default=os.environ.get("DOUANE_TOKEN"),
                   help="your OIDC token (default: $DOUANE_TOKEN)")
    user = {"help": "on the gateway host: this user's (the name the gateway's identity gives), "
            "not your own through the API"}
    verbs = p.add_subparsers(dest="verb", required=True)
    put = verbs.add_parser("set", help="store the secret for UPSTREAM (read from stdin, or "
                           "prompted for without echo)")
    put.add_argument("upstream")
    put.add_argument("--user", **user)
    put.set_defaults(func=set_)
    ls = verbs.add_parser("list", help="the upstreams (and users) douane holds a secret for")
    ls.add_argument("--user", **user)
    ls.add_argument("--all", action="store_true", help="on the gateway host: every user's")
    ls.set_defaults(func=list_)
    rm = verbs.add_parser("delete", help="forget the secret for UPSTREAM")
    rm.add_argument("upstream")
    rm.add_argument("--user", **user)
    rm.set_defaults(func=delete_)


def _store(args: argparse.Namespace) -> usersecrets.UserSecrets:
    config = load_config(args)
    if "gateway.credentials_key" in config.unresolved:
        raise SystemExit(f"douane: gateway.credentials_key: "
                         f"{config.unresolved['gateway.credentials_key']}")
    if getattr(args, "upstream", None) is not None:
        upstream = next((u for u in config.upstreams if u.name == args.upstream), None)
        if upstream is None or not upstream.per_user:
            raise SystemExit(f"douane: no upstream {escape(args.upstream)} with "
                             "credentials.per_user in the configuration")
    return usersecrets.UserSecrets(config.state_dir, config.credentials_key)


def _path(upstream: str) -> str:
    return "/credentials/" + urllib.parse.quote(upstream, safe="")


def set_(args: argparse.Namespace) -> int:
    store = _store(args) if args.user is not None else None
    who = escape(args.user) if args.user is not None else "you"
    if sys.stdin.isatty():
        secret = getpass.getpass(f"secret for {escape(args.upstream)} ({who}): ")
    else:
        secret = sys.stdin.read(usersecrets.MAX_SECRET + 2)
    if store is None:
        _call(args, "PUT", _path(args.upstream), {"secret": secret.strip()})
    else:
        try:
            store.set(args.upstream, args.user, secret.strip())
        except ValueError as e:
            print(f"douane: {e}", file=sys.stderr)
            return 2
    print(f"douane: secret for {escape(args.upstream)} set for {who}", file=sys.stderr)
    return 0


def list_(args: argparse.Namespace) -> int:
    if args.user is None and not args.all:
        for upstream in _call(args, "GET", "/credentials")["credentials"]:
            print(escape(upstream))
        return 0
    for upstream, user in _store(args).entries():
        if args.all or user == args.user:
            print(f"{escape(upstream)}\t{escape(user)}")
    return 0


def delete_(args: argparse.Namespace) -> int:
    if args.user is None:
        _call(args, "DELETE", _path(args.upstream))
    elif not _store(args).delete(args.upstream, args.user):
        print(f"douane: no secret for {escape(args.upstream)} held for {escape(args.user)}",
              file=sys.stderr)
        return 1
    return 0
