"""`douane approvals list | show ID | approve ID [--for 1h] [--reason ...] | deny ID --reason ...`:
the approver's side, talking to the gateway's admin API with the approver's OIDC token."""

from __future__ import annotations

import argparse
import json
import os
import time
import urllib.error
import urllib.request
from typing import Any

from douane.commands import add_config_option, config_file, load_config
from douane.untrusted import escape


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("approvals", help="held requests: list, show, approve, deny")
    add_config_option(p)
    p.add_argument("--url", default=os.environ.get("DOUANE_APPROVALS_URL"),
                   help="the admin API (default: $DOUANE_APPROVALS_URL, else approvals.public_url)")
    p.add_argument("--token", default=os.environ.get("DOUANE_TOKEN"),
                   help="the approver's OIDC token (default: $DOUANE_TOKEN)")
    verbs = p.add_subparsers(dest="verb", required=True)
    verbs.add_parser("list", help="pending approval requests").set_defaults(func=list_)
    show = verbs.add_parser("show", help="one request: who, what, why, the prompt or arguments")
    show.add_argument("id")
    show.set_defaults(func=show_)
    approve = verbs.add_parser("approve", help="let the request through")
    approve.add_argument("id")
    approve.add_argument("--for", dest="for_", metavar="DURATION",
                         help="also grant the same user, upstream and tool/model for this long "
                         "(e.g. 1h); default: this request only")
    approve.add_argument("--reason", default="approved")
    approve.set_defaults(func=approve_)
    deny = verbs.add_parser("deny", help="refuse the request; the reason is shown to the requester")
    deny.add_argument("id")
    deny.add_argument("--reason", required=True)
    deny.set_defaults(func=deny_)


def _call(args: argparse.Namespace, method: str, path: str,
          body: dict[str, Any] | None = None) -> dict[str, Any]:
    url = args.url
    if not url:
        section = load_config(args).sections.get("approvals")
        if section is None:
            raise SystemExit(f"{config_file(args)} has no approvals section (or pass --url)")
        url = section.public_url or f"http://{section.host}:{section.port}"
    if not args.token:
        raise SystemExit("pass the approver's token with --token or $DOUANE_TOKEN")
    request = urllib.request.Request(
        url.rstrip("/") + path, json.dumps(body).encode() if body is not None else None,
        method=method, headers={"authorization": f"Bearer {args.token}",
                                "content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read()).get("error", "")
        except ValueError:
            message = e.reason
        raise SystemExit(f"douane approvals: {e.code} {message}") from None
    except urllib.error.URLError as e:
        raise SystemExit(f"douane approvals: cannot reach {url}: {e.reason}") from None


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def list_(args: argparse.Namespace) -> int:
    rows = _call(args, "GET", "/approvals")["approvals"]
    print(f"{'approval id':<20} {'user':<24} {'upstream':<10} {'subject':<24} {'mode':<6} "
          f"{'risk':>5}  expires")
    for r in map(_escaped, rows):
        print(f"{r['id']:<20} {r['user'][:24]:<24} {r['upstream'][:10]:<10} "
              f"{r['subject'][:24]:<24} {r['mode']:<6} {r['risk']:>5g}  {_when(r['expires_at'])}")
    print(f"({len(rows)} pending)")
    return 0


def _escaped(value: Any) -> Any:
    """Every string the gateway sent (claims, names, reasons, a prompt) escaped for a terminal:
    newlines and tabs kept in a preview's text only, where the lines are indented."""
    if isinstance(value, str):
        return escape(value)
    if isinstance(value, dict):
        return {k: escape(v, keep="\n\t").replace("\n", "\n    ") if k == "text" and
                isinstance(v, str) else _escaped(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_escaped(v) for v in value]
    return value


def _print(r: dict[str, Any]) -> None:
    r = _escaped(r)
    print(f"approval   {r['id']} ({r['status']}, {r['mode']} mode)")
    print(f"requester  {r['user']} (groups: {', '.join(r['groups']) or '-'})")
    print(f"target     {r['upstream']} ({r['protocol']}) {r['operation']} {r['subject']}")
    print(f"risk       {r['risk']:g}")
    for reason in r["reasons"]:
        where = f" in {reason['field']}" if reason.get("field") else ""
        print(f"  - {reason['rule']}{where}: {reason['message']}")
    print(f"decision   {r['decision_id']}")
    print(f"opened     {_when(r['created_at'])}, expires {_when(r['expires_at'])}")
    if r["status"] != "pending":
        box = f" (grant for {r['grant_seconds']} s)" if r.get("grant_seconds") else ""
        print(f"outcome    {r['status']} by {r['approver'] or 'douane'}{box}: {r['reason']}")
    for piece in r["preview"]:
        flagged = f" (flagged: {piece['flagged']})" if piece.get("flagged") else ""
        print(f"--- {piece['kind']} {piece['where']}".rstrip() + flagged)
        print("    " + piece["text"])
        if piece.get("note"):
            print(f"    [{piece['note']}]")


def show_(args: argparse.Namespace) -> int:
    _print(_call(args, "GET", f"/approvals/{args.id}"))
    return 0


def approve_(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"reason": args.reason}
    if args.for_:
        body["for"] = args.for_
    r = _call(args, "POST", f"/approvals/{args.id}/approve", body)
    box = f", granted for {r['grant_seconds']} s" if r.get("grant_seconds") else ""
    print(f"{r['id']} approved{box}")
    return 0


def deny_(args: argparse.Namespace) -> int:
    r = _call(args, "POST", f"/approvals/{args.id}/deny", {"reason": args.reason})
    print(escape(f"{r['id']} denied: {r['reason']}"))
    return 0
