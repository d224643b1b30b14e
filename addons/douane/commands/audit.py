"""`douane audit verify`: check the audit log's hash chain, naming the first bad record.

With a shared store, every chain of this host (its log and its workers' `audit.wN.jsonl`) is also
checked against the head the store keeps for it, which catches records cut from the end; the
chains of other hosts are listed, to be verified there.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from douane import audit, chainheads, store
from douane.commands import add_config_option, load_config
from douane.untrusted import escape


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("audit", help="audit log operations")
    verbs = p.add_subparsers(dest="verb", required=True)
    v = verbs.add_parser("verify", help="verify the audit log's hash chain and MACs")
    add_config_option(v)
    v.add_argument("--log", help="the audit log (default: the config's audit.path)")
    v.add_argument("--replica", help="with --log and a shared store: the replica that wrote "
                   "it (default: from the file's name, on this host)")
    v.set_defaults(func=verify)


def verify(args: argparse.Namespace) -> int:
    config = load_config(args)
    if "audit.hmac_key" in config.unresolved:
        print(f"audit.hmac_key: {config.unresolved['audit.hmac_key']}: verifying needs the "
              "gateway's HMAC key", file=sys.stderr)
        return 2
    path = Path(args.log) if args.log else config.audit.path
    if config.database is None and not audit.log_files(path):
        print(f"FAIL: no audit log at {path} (is this the gateway's configuration?)")
        return 1
    try:
        key = audit.hmac_key(config, create=False)
    except FileNotFoundError as e:
        print(f"FAIL: no HMAC key at {e.filename}: the gateway that wrote {path} keeps its key "
              "there (or set audit.hmac_key)")
        return 1
    if config.database is None:
        return _verify(path, key)
    try:
        with store.connect_for(config, autocommit=True) as db:
            heads = {h.replica: h for h in chainheads.heads(db)}
    except Exception as e:
        print(escape(f"FAIL: cannot read the chain heads from the shared store "
                     f"({type(e).__name__}: {str(e)[:200]})"))
        return 1
    chains = [(args.replica or _replica_of(path, config), path)] if args.log \
        else _local_chains(config)
    failed = 0
    for replica, log in chains:
        failed |= _verify(log, key, replica, heads.pop(replica, None))
    if args.log:
        return failed
    for head in heads.values():
        if head.host == config.host:  # a chain of this host whose log is gone entirely
            print(escape(f"FAIL {head.replica}: the shared store's head is seq {head.seq} of "
                         f"{head.path}, which holds no audit record"))
            failed = 1
        else:
            print(escape(f"not checked here: {head.replica} (host {head.host}, head seq "
                         f"{head.seq} of {head.path}): run douane audit verify there"))
    if not chains and not failed:
        print(f"FAIL: no audit log at {path} (is this the gateway's configuration?)")
        return 1
    return failed


def _replica_of(path: Path, config) -> str:
    """The replica that writes `path` on this host: a worker's log is audit.wN.jsonl."""
    worker = re.fullmatch(rf"{re.escape(config.audit.path.stem)}\.(w\d{{1,3}})"
                          rf"{re.escape(config.audit.path.suffix)}", path.name)
    return f"{config.host}/{worker.group(1)}" if worker else config.host


def _local_chains(config) -> list[tuple[str, Path]]:
    """This host's chains: the config's log and its workers' logs beside it."""
    main = config.audit.path
    chains = [(config.host, main)] if audit.log_files(main) else []
    for log in sorted(main.parent.glob(f"{main.stem}.w*{main.suffix}")):
        if (replica := _replica_of(log, config)) != config.host:
            chains.append((replica, log))
    return chains


def _verify(path: Path, key: bytes, replica: str | None = None,
            head: chainheads.Head | None = None) -> int:
    fail = f"FAIL {replica}:" if replica else "FAIL"
    result = audit.verify(path, key, at=head.seq if head else None)
    if not result.ok:
        print(escape(f"{fail} after {result.records} good record(s): {result.error}"))
        return 1
    if result.records == 0:
        print(escape(f"{fail if replica else 'FAIL:'} {path} holds no audit record"))
        return 1
    if head and (result.last_seq or 0) < head.seq:
        print(escape(f"{fail} {path} ends at seq {result.last_seq}, but the shared store's "
                     f"head of this chain is seq {head.seq}: records were cut from the end"))
        return 1
    if head and result.mac_at != head.mac:
        print(escape(f"{fail} {path}: record seq {head.seq} is not the one the shared store's "
                     "head names: the chain was cut and written again from there"))
        return 1
    stored = f"; the shared store's head (seq {head.seq}) is in it" if head else \
        ("; the shared store has no head for it yet" if replica else "")
    print(escape(f"ok{' ' + replica if replica else ''}: {result.records} record(s) in "
                 f"{result.files} file(s), chain intact; {result.describe()}{stored}"))
    return 0
