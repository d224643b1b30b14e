"""`douane tools list|diff|accept`: the MCP tools douane has pinned, what changed, and the
operator's acceptance of a change (audited in operator-audit.jsonl beside the audit log)."""

from __future__ import annotations

import argparse
import difflib
import getpass
import json
import time
from datetime import UTC, datetime

from douane import toolpins
from douane.commands import add_config_option, load_config
from douane.commands.sessions import _operator_log
from douane.untrusted import escape


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tools", help="pinned MCP tools: list, diff, accept")
    verbs = p.add_subparsers(dest="verb", required=True)
    ls = verbs.add_parser("list", help="every pinned tool and its state (withheld first)")
    ls.add_argument("--upstream")
    add_config_option(ls)
    ls.set_defaults(func=list_)
    diff = verbs.add_parser("diff", help="the accepted definition against the one now listed")
    diff.add_argument("upstream")
    diff.add_argument("tool")
    add_config_option(diff)
    diff.set_defaults(func=diff_)
    accept = verbs.add_parser("accept", help="accept a tool's listed definition (or its "
                              "removal): it is listed and callable again")
    accept.add_argument("upstream")
    accept.add_argument("tool")
    add_config_option(accept)
    accept.set_defaults(func=accept_)


def _db(args: argparse.Namespace):
    config = load_config(args)
    return config, toolpins.connect(config.state_dir / "tools.sqlite3")


def list_(args: argparse.Namespace) -> int:
    _, db = _db(args)
    rows = db.execute("SELECT * FROM tools WHERE ? IS NULL OR upstream = ? ORDER BY state = "
                      "'pinned', upstream, name", (args.upstream, args.upstream)).fetchall()
    print(f"{'upstream':<16} {'tool':<32} {'state':<9} {'since (UTC)':<20} reason")
    for r in rows:
        when = datetime.fromtimestamp(r["updated_at"], UTC).strftime("%Y-%m-%d %H:%M:%S")
        print(f"{escape(r['upstream'])[:16]:<16} {escape(r['name'])[:32]:<32} {r['state']:<9} "
              f"{when:<20} {escape(r['reason'] or '-')}")
    print(f"({len(rows)} tool(s); withheld: {sum(r['state'] != 'pinned' for r in rows)})")
    return 0


def _row(db, args: argparse.Namespace):
    row = db.execute("SELECT * FROM tools WHERE upstream = ? AND name = ?",
                     (args.upstream, args.tool)).fetchone()
    if row is None:
        raise SystemExit(f"no pinned tool {escape(args.tool)} on {escape(args.upstream)}")
    return row


def _pretty(definition: str | None) -> list[str]:
    if definition is None:
        return []
    return json.dumps(json.loads(definition), indent=2, sort_keys=True,
                      ensure_ascii=True).splitlines(keepends=True)


def diff_(args: argparse.Namespace) -> int:
    _, db = _db(args)
    row = _row(db, args)
    print(f"state: {row['state']}; reason: {escape(row['reason'] or '-')}")
    if row["state"] == "pinned":
        print("the listed definition is the accepted one")
        return 0
    if row["state"] == "removed":
        print("the tool is no longer listed; accepting forgets its pin")
        return 0
    if row["candidate_digest"] and row["candidate"] is None:
        print("the listed definition is too large to be stored; its digest: "
              f"{row['candidate_digest']}")
        return 0
    lines = difflib.unified_diff(_pretty(row["definition"]), _pretty(row["candidate"]),
                                 f"accepted {row['digest'] or '(none)'}",
                                 f"listed {row['candidate_digest'] or '(none)'}")
    print("".join(lines), end="")  # ASCII: JSON escapes every other character
    return 0


def accept_(args: argparse.Namespace) -> int:
    config, db = _db(args)
    row = _row(db, args)
    if row["state"] == "pinned":
        print("nothing to accept: the listed definition is the accepted one")
        return 0
    if row["state"] != "removed" and row["candidate"] is None:
        raise SystemExit("nothing to accept: the listed definition is not stored (too large, or "
                         "the tool is listed twice); list the tools again through douane")
    where = (args.upstream, args.tool)
    if row["state"] == "removed":
        db.execute("DELETE FROM tools WHERE upstream = ? AND name = ?", where)
    else:  # only if it is still what was shown to the operator
        cur = db.execute("UPDATE tools SET state = 'pinned', digest = candidate_digest, "
                         "definition = candidate, candidate_digest = NULL, candidate = NULL, "
                         "reason = NULL, updated_at = ? WHERE upstream = ? AND name = ? AND "
                         "candidate_digest = ?", (time.time(), *where, row["candidate_digest"]))
        if cur.rowcount != 1:
            raise SystemExit("the tool changed again meanwhile: see douane tools diff")
    log = _operator_log(config)
    log.append({"event": "tools.accepted", "upstream": args.upstream, "tool": args.tool,
                "state": row["state"], "digest": row["candidate_digest"],
                "pinned_digest": row["digest"], "operator": getpass.getuser()})
    log.close()
    print(f"accepted {escape(args.tool)} on {escape(args.upstream)} ({row['state']})")
    return 0
