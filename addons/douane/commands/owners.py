"""`douane owners list USER | release UPSTREAM KIND ID | transfer UPSTREAM KIND ID --to USER`:
the ids douane bound to their users (`douane.owners`), and the operator's release or transfer of
one (audited in operator-audit.jsonl beside the audit log).

The store keeps a digest of each id, never the id: a listing shows digests (`key`); a binding is
named by its id (digested here) or by its key (`--key`). Released, an id is adopted by the next
user the upstream answers it for (an MCP session, an item or a container is refused to everyone
instead); transferred, it is the new user's. Running gateways read a binding again within
`owners.CACHE_SECONDS`.
"""

from __future__ import annotations

import argparse
import getpass
import re
import sqlite3
import time
from datetime import UTC, datetime
from typing import Any

from douane import owners, store
from douane.commands import add_config_option, load_config
from douane.commands.sessions import _operator_log
from douane.untrusted import escape

KINDS = sorted([owners.MCP, owners.MCP_STATE, *owners.KINDS])
DONE = {"release": "released", "transfer": "transferred"}
LIST_LIMIT = 1000


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("owners", help="ids bound to their users: list, release, transfer")
    verbs = p.add_subparsers(dest="verb", required=True)
    ls = verbs.add_parser("list", help="a user's bindings, most recently used first")
    ls.add_argument("user")
    ls.add_argument("--upstream")
    ls.add_argument("--kind", choices=KINDS)
    ls.add_argument("--limit", type=int, default=100, help=f"at most {LIST_LIMIT}")
    add_config_option(ls)
    ls.set_defaults(func=list_)
    for verb, what in (("release", "forget a binding: the id is adopted again (or refused)"),
                       ("transfer", "bind an id to another user")):
        v = verbs.add_parser(verb, help=what)
        v.add_argument("upstream")
        v.add_argument("kind", choices=KINDS)
        v.add_argument("id", help="the id the upstream issued, or its key with --key")
        v.add_argument("--key", action="store_true", help="ID is a key as `list` shows it")
        if verb == "transfer":
            v.add_argument("--to", required=True, metavar="USER")
        v.add_argument("--reason", default="", help="why (in the audit record)")
        add_config_option(v)
        v.set_defaults(func=change_)


class _Store:
    """The gateway's store of owners: the shared PostgreSQL with `database:`, else the
    embedded SQLite file; the same statements on both (`%s` placeholders)."""

    def __init__(self, config: Any) -> None:
        try:
            if config.database is not None:
                self.db: Any = store.connect_for(config, autocommit=True)
            else:
                self.db = owners.connect(config.state_dir / "owners.sqlite3")
        except Exception as e:
            raise SystemExit(escape(f"cannot reach douane's store of owners ({type(e).__name__}: "
                                    f"{str(e)[:200]})")) from None
        self.sqlite = isinstance(self.db, sqlite3.Connection)

    def run(self, query: str, params: tuple[Any, ...]) -> tuple[list[tuple[Any, ...]], int]:
        """The rows a statement returns, and how many it changed."""
        cur = self.db.execute(query.replace("%s", "?") if self.sqlite else query, params)
        return (cur.fetchall() if cur.description else []), cur.rowcount


def list_(args: argparse.Namespace) -> int:
    db = _Store(load_config(args))
    where = [(f"{column} = %s", value) for column, value in
             (("username", args.user), ("upstream", args.upstream), ("kind", args.kind))
             if value is not None]
    rows, _ = db.run(f"SELECT key, kind, upstream, used_at FROM owners WHERE "
                     f"{' AND '.join(c for c, _ in where)} AND used_at > %s "
                     "ORDER BY used_at DESC LIMIT %s",
                     (*(v for _, v in where), time.time() - owners.TTL_SECONDS,
                      max(1, min(args.limit, LIST_LIMIT))))
    print(f"{'key':<32}  {'upstream':<16} {'kind':<18} last used (UTC)")
    for key, kind, upstream, used_at in rows:
        when = datetime.fromtimestamp(used_at, UTC).strftime("%Y-%m-%d %H:%M:%S")
        print(f"{key:<32}  {escape(upstream)[:16]:<16} {kind:<18} {when}")
    print(f"({len(rows)} binding(s) of {escape(args.user)})")
    return 0


def change_(args: argparse.Namespace) -> int:
    config = load_config(args)
    if args.key and not re.fullmatch(r"[0-9a-f]{32}", args.id):
        raise SystemExit("a key is 32 hexadecimal digits, as `douane owners list` shows it")
    key = args.id if args.key else owners.digest(args.upstream, args.kind, args.id)
    db = _Store(config)
    rows, _ = db.run("SELECT username FROM owners WHERE key = %s AND kind = %s AND upstream = %s "
                     "AND used_at > %s", (key, args.kind, args.upstream,
                                          time.time() - owners.TTL_SECONDS))
    if not rows:
        raise SystemExit(f"no binding of this {args.kind} id on {escape(args.upstream)}")
    before = rows[0][0]
    if args.verb == "release":  # only if it is still the binding shown
        _, changed = db.run("DELETE FROM owners WHERE key = %s AND username = %s",
                            (key, before))
    else:
        _, changed = db.run("UPDATE owners SET username = %s, used_at = %s WHERE key = %s AND "
                            "username = %s", (args.to, time.time(), key, before))
    if changed != 1:
        raise SystemExit("the binding changed meanwhile: list it again")
    log = _operator_log(config)
    log.append({"event": f"owners.{DONE[args.verb]}", "upstream": args.upstream, "kind": args.kind, "key": key,
                "user": before, "to": getattr(args, "to", None), "reason": args.reason[:500],
                "operator": getpass.getuser()})
    log.close()
    to = f" to {escape(args.to)}" if args.verb == "transfer" else ""
    print(f"{DONE[args.verb]} {key} ({args.kind} on "
          f"{escape(args.upstream)}) of {escape(before)}{to}; running gateways read it again "
          f"within {owners.CACHE_SECONDS} s")
    return 0
