"""`douane audit verify`: check the audit log's hash chain, naming the first bad record."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from douane import audit
from douane.commands import add_config_option, load_config
from douane.untrusted import escape


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("audit", help="audit log operations")
    verbs = p.add_subparsers(dest="verb", required=True)
    v = verbs.add_parser("verify", help="verify the audit log's hash chain and MACs")
    add_config_option(v)
    v.add_argument("--log", help="the audit log (default: the config's audit.path)")
    v.set_defaults(func=verify)


def verify(args: argparse.Namespace) -> int:
    config = load_config(args)
    if "audit.hmac_key" in config.unresolved:
        print(f"audit.hmac_key: {config.unresolved['audit.hmac_key']}: verifying needs the "
              "gateway's HMAC key", file=sys.stderr)
        return 2
    path = Path(args.log) if args.log else config.audit.path
    if not audit.log_files(path):
        print(f"FAIL: no audit log at {path} (is this the gateway's configuration?)")
        return 1
    try:
        key = audit.hmac_key(config, create=False)
    except FileNotFoundError as e:
        print(f"FAIL: no HMAC key at {e.filename}: the gateway that wrote {path} keeps its key "
              "there (or set audit.hmac_key)")
        return 1
    result = audit.verify(path, key)
    if not result.ok:
        print(escape(f"FAIL after {result.records} good record(s): {result.error}"))
        return 1
    if result.records == 0:
        print(f"FAIL: {path} holds no audit record")
        return 1
    print(escape(f"ok: {result.records} record(s) in {result.files} file(s), chain intact; "
                 f"{result.describe()}"))
    return 0
