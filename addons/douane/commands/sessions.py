"""`douane sessions list|show|export|replay|reveal|reindex|prune`: the recordings, by user, time
and decision."""

from __future__ import annotations

import argparse
import getpass
import os
import re
import time
from datetime import UTC, datetime
from pathlib import Path

from cryptography.fernet import InvalidToken
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from mitmproxy import http, io

from douane import config as configmod
from douane import store, transcript
from douane.audit import AuditConfig, AuditLog, hmac_key
from douane.commands import add_config_option, config_file, load_config
from douane.recording import index, originals
from douane.untrusted import escape


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sessions", help="recorded sessions: list, show, export, replay, reveal, "
                       "reindex, prune")
    add_config_option(p)
    verbs = p.add_subparsers(dest="verb", required=True)
    ls = verbs.add_parser("list", help="recorded flows, newest first")
    ls.add_argument("--user")
    ls.add_argument("--since", help="e.g. 30m, 12h, 1d, 2w")
    ls.add_argument("--decision", help="allow, mask, hold, block, refuse, error")
    ls.add_argument("--tool")
    ls.add_argument("--limit", type=int, default=50)
    ls.set_defaults(func=list_)
    show = verbs.add_parser("show", help="one flow as a readable transcript")
    show.add_argument("id", help="a decision id (dcn_...) or a flow id")
    show.set_defaults(func=show_)
    export = verbs.add_parser("export", help="write a flow, its whole session, or every flow "
                              "of a user, to a .mitm")
    export.add_argument("id", nargs="?")
    export.add_argument("--user", help="every recorded flow of this user (the exact name), "
                        "oldest first")
    export.add_argument("--since", help="with --user: e.g. 30m, 12h, 1d, 2w")
    export.add_argument("-o", "--output", type=Path, required=True)
    export.add_argument("--session", action="store_true", help="the whole session file")
    export.set_defaults(func=export_)
    again = verbs.add_parser("replay", help="re-send a flow, or its whole session, through the "
                             "gateway (mitmproxy client replay) with your token")
    again.add_argument("id")
    again.add_argument("--session", action="store_true", help="every flow of its session file")
    again.add_argument("--gateway", default="http://127.0.0.1:8080", help="the gateway's URL")
    again.add_argument("--token", help="default: $DOUANE_TOKEN (recordings hold no credential)")
    again.add_argument("--ca", type=Path, help="the gateway's CA (proxy mode, HTTPS upstreams)")
    again.set_defaults(func=replay_)
    reveal = verbs.add_parser("reveal", help="auditors: a flow before masking, decrypted with "
                              "the auditors' private key (audited in operator-audit.jsonl)")
    reveal.add_argument("id")
    reveal.add_argument("--private-key", type=Path, required=True, help="PEM (RSA)")
    reveal.set_defaults(func=reveal_)
    verbs.add_parser("reindex", help="rebuild the index from the .mitm files"
                     ).set_defaults(func=reindex_)
    prune = verbs.add_parser("prune", help="delete recordings past retention (each deletion is "
                             "audited in operator-audit.jsonl beside the audit log)")
    prune.add_argument("--older-than", help="default: recording.retention_days")
    prune.add_argument("--max-bytes", help="default: recording.max_bytes")
    prune.set_defaults(func=prune_)


def _load(args: argparse.Namespace):
    config = load_config(args)
    recording = config.sections.get("recording")
    if recording is None:
        raise SystemExit(f"{config_file(args)} has no recording section")
    return config, recording


def duration(text: str) -> float:
    m = re.fullmatch(r"(\d+)([smhdw])", text)
    if not m:
        raise SystemExit(f"not a duration: {text!r} (e.g. 30m, 12h, 1d)")
    return int(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]


def _index(config, recording):
    """The shared store's index (every replica's flows) or this gateway's SQLite file."""
    if config.database is None:
        return index.connect(recording.index_path)
    try:
        return store.connect_for(config, autocommit=True)
    except Exception as e:
        raise SystemExit(escape(f"cannot reach the shared store ({type(e).__name__}: "
                                f"{str(e)[:200]})")) from None


def list_(args: argparse.Namespace) -> int:
    config, recording = _load(args)
    db = _index(config, recording)
    since = time.time() - duration(args.since) if args.since else None
    rows = index.query(db, args.user, since, args.decision, args.tool, args.limit)
    shared = config.database is not None
    print(f"{'time (UTC)':<20} {'user':<24} {'upstream':<10} {'operation':<22} "
          f"{'decision':<8} {'status':>6} {'masked':>6}  decision id"
          + (f"{'':<16}  replica" if shared else ""))
    for r in rows:
        when = datetime.fromtimestamp(r["ts"], UTC).strftime("%Y-%m-%d %H:%M:%S")
        r = {k: escape(v) if isinstance(v, str) else v for k, v in r.items()}
        op = (r["operation"] or "-") + (f" {r['tool']}" if r["tool"] else "")
        print(f"{when:<20} {r['user'][:24]:<24} {(r['upstream'] or '-')[:10]:<10} {op[:22]:<22} "
              f"{r['decision']:<8} {r['status'] or '-':>6} {r['masked'] or 0:>6}  "
              f"{r['decision_id']}" + (f"  {r['replica']}" if shared else ""))
    print(f"({len(rows)} flow(s))")
    return 0


def _flow(config, recording, ident: str) -> tuple[dict, http.HTTPFlow]:
    r = index.find(_index(config, recording), ident)
    if r is None:
        raise SystemExit(f"no recorded flow {escape(ident)}")
    if not index.local(r.get("replica"), config.host):
        raise SystemExit(escape(f"flow {ident} was recorded by replica {r['replica']}: its "
                                f"recording is on that host; run this command there"))
    return r, _read(recording, r)


def _read(recording, r: dict) -> http.HTTPFlow:
    with (recording.dir / r["file"]).open("rb") as f:
        f.seek(r["offset"])
        return next(iter(io.FlowReader(f).stream()))


def show_(args: argparse.Namespace) -> int:
    config, recording = _load(args)
    r, flow = _flow(config, recording, args.id)
    print(_transcript(config, r, flow, marked=True))
    return 0


def _transcript(config, r: dict, flow: http.HTTPFlow, marked: bool) -> str:
    """The flow as douane.transcript renders it everywhere (the content view too), parsed as the
    configured upstream when it still exists (a generic upstream's text paths live there)."""
    upstream = next((u for u in config.upstreams if u.name == r["upstream"]), None)
    return (escape(f"{flow.request.method} {flow.request.pretty_url}") + "\n"
            + transcript.render(flow, upstream, marked=marked))


def export_(args: argparse.Namespace) -> int:
    config, recording = _load(args)
    if args.user is not None:
        return _export_user(args, config, recording)
    if args.id is None:
        raise SystemExit("give a decision or flow id, or --user")
    r, flow = _flow(config, recording, args.id)
    if args.session:
        args.output.write_bytes((recording.dir / r["file"]).read_bytes())
    else:
        with args.output.open("wb") as f:
            io.FlowWriter(f).add(flow)
    print(f"wrote {args.output}")
    return 0


def _export_user(args: argparse.Namespace, config, recording) -> int:
    """A user's flows from every session file (their folder's name is a slug and a hash). With
    a shared store, those of this host's replicas; the others are counted, per replica."""
    since = time.time() - duration(args.since) if args.since else None
    rows = index.query(_index(config, recording), user=args.user, since=since, limit=-1)
    elsewhere: dict[str, int] = {}
    with args.output.open("wb") as f:
        writer = io.FlowWriter(f)
        for r in reversed(rows):
            if index.local(r.get("replica"), config.host):
                writer.add(_read(recording, r))
            else:
                elsewhere[r["replica"]] = elsewhere.get(r["replica"], 0) + 1
    print(f"wrote {len(rows) - sum(elsewhere.values())} flow(s) of {escape(args.user)} to "
          f"{args.output}")
    for replica, n in sorted(elsewhere.items()):
        print(escape(f"not written: {n} flow(s) recorded by replica {replica}, on its host: "
                     "run this command there"))
    return 1 if elsewhere else 0


def reindex_(args: argparse.Namespace) -> int:
    config, recording = _load(args)
    db = _index(config, recording)
    print(f"indexed {index.reindex(db, recording.dir, config.host)} flow(s) from "
          f"{recording.dir}")
    return 0


def _operator_log(config) -> AuditLog:
    # Operator actions have their own chain: the gateway may be appending to the main log now.
    if "audit.hmac_key" in config.unresolved:
        raise SystemExit(f"audit.hmac_key: {config.unresolved['audit.hmac_key']}: operator "
                         "actions are audited with the gateway's HMAC key")
    return AuditLog(AuditConfig(config.audit.path.with_name("operator-" + config.audit.path.name),
                                config.audit.max_bytes, config.audit.backups,
                                retention_days=config.audit.retention_days), hmac_key(config))


def replay_(args: argparse.Namespace) -> int:
    from douane.recording import replay  # mitmproxy's dump machinery: seconds to import

    config, recording = _load(args)
    token = args.token or os.environ.get("DOUANE_TOKEN")
    if not token:
        raise SystemExit("give a token with --token or DOUANE_TOKEN: recordings hold none")
    r, flow = _flow(config, recording, args.id)
    flows = [f for _, f in index.read_flows(recording.dir / r["file"])] if args.session \
        else [flow]
    failed = 0
    for f in replay.replay(flows, args.gateway, token, args.ca):
        if f.response:
            print(escape(f"{f.request.method} {f.request.pretty_url} -> "
                         f"{f.response.status_code} "
                         f"{f.response.headers.get('x-douane-decision-id', '')}"))
        else:
            failed += 1
            print(escape(f"{f.request.method} {f.request.pretty_url} -> failed: "
                         f"{f.error.msg if f.error else 'no response'}"))
    return 1 if failed else 0


def reveal_(args: argparse.Namespace) -> int:
    config, recording = _load(args)
    r, flow = _flow(config, recording, args.id)
    sealed = originals.find((recording.dir / r["file"]).with_suffix(originals.SUFFIX),
                            r["flow_id"])
    outcome, error = "revealed", None
    if sealed is None:
        outcome, error = "no original", "no original kept for this flow (nothing was masked, " \
                                        "or originals are off)"
    else:
        pem = args.private_key.read_bytes()
        try:
            try:
                key = serialization.load_pem_private_key(pem, None)
            except TypeError:  # encrypted: ask for its passphrase
                key = serialization.load_pem_private_key(
                    pem, getpass.getpass(f"passphrase for {args.private_key}: ").encode())
            if not isinstance(key, rsa.RSAPrivateKey):
                raise ValueError("not an RSA key")
            original = originals.unseal(key, sealed)
        except (ValueError, InvalidToken) as e:
            outcome = "wrong key"
            error = f"{args.private_key} cannot open this original (not the auditors' key: {e})"
    log = _operator_log(config)
    log.append({"event": "recording.revealed", "decision_id": r["decision_id"],
                "flow_id": r["flow_id"], "file": r["file"], "operator": getpass.getuser(),
                "outcome": outcome})
    log.close()
    if error:
        print(f"douane: {error}")
        return 1
    if original.request is not None:
        flow.request.raw_content = original.request
    if original.response is not None and flow.response:
        flow.response.raw_content = original.response
    print("UNMASKED ORIGINAL (this reveal is audited)")
    print(_transcript(config, r, flow, marked=False))
    return 0


def prune_(args: argparse.Namespace) -> int:
    config, recording = _load(args)
    max_age = duration(args.older_than) if args.older_than else recording.retention_days * 86400
    max_bytes = configmod.Document("--max-bytes", f"m: {args.max_bytes}").root().size("m") \
        if args.max_bytes else recording.max_bytes
    files = sorted(recording.dir.rglob("*.mitm"), key=lambda p: p.stat().st_mtime)
    total = sum(p.stat().st_size for p in files)
    doomed = []
    for path in files:
        if time.time() - path.stat().st_mtime > max_age or total > max_bytes:
            doomed.append(path)
            total -= path.stat().st_size
    log = _operator_log(config)
    db = _index(config, recording)
    for path in doomed:
        relative = str(path.relative_to(recording.dir))
        sealed = path.with_suffix(originals.SUFFIX)  # its originals go with it
        size = path.stat().st_size + (sealed.stat().st_size if sealed.exists() else 0)
        path.unlink()
        sealed.unlink(missing_ok=True)
        index.delete_file(db, relative, index.replica_of(Path(relative), config.host))
        log.append({"event": "recording.deleted", "file": relative, "bytes": size,
                    "reason": "retention"})
    db.commit()
    log.close()
    print(f"deleted {len(doomed)} recording file(s)")
    return 0

