"""`douane audit verify`: check the audit log's hash chain, naming the first bad record."""

from __future__ import annotations

import argparse
import sys

from douane import audit
from douane import config as configmod
from douane.settings import DEFAULT_CONFIG


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("audit", help="audit log operations")
    verbs = p.add_subparsers(dest="verb", required=True)
    v = verbs.add_parser("verify", help="verify the audit log's hash chain and MACs")
    v.add_argument("--config", default=str(DEFAULT_CONFIG))
    v.add_argument("--log", help="the audit log (default: the config's audit.path)")
    v.set_defaults(func=verify)


def verify(args: argparse.Namespace) -> int:
    try:
        config = configmod.load(args.config)
    except configmod.ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    path = configmod.Path(args.log) if args.log else config.audit.path
    result = audit.verify(path, audit.hmac_key(config))
    if not result.ok:
        print(f"FAIL after {result.records} good record(s): {result.error}")
        return 1
    print(f"ok: {result.records} record(s) in {result.files} file(s), chain intact")
    return 0
