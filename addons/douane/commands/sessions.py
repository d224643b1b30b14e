"""`douane sessions list|show|export|reindex|prune`: the recordings, by user, time and decision."""

from __future__ import annotations

import argparse
import json
import re
import time
from datetime import UTC, datetime
from pathlib import Path

from mitmproxy import http, io

from douane import config as configmod
from douane import protocols
from douane.audit import AuditConfig, AuditLog, hmac_key
from douane.recording import index
from douane.settings import DEFAULT_CONFIG


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sessions", help="recorded sessions: list, show, export, reindex, prune")
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
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
    export = verbs.add_parser("export", help="write a flow, or its whole session, to a .mitm")
    export.add_argument("id")
    export.add_argument("-o", "--output", type=Path, required=True)
    export.add_argument("--session", action="store_true", help="the whole session file")
    export.set_defaults(func=export_)
    verbs.add_parser("reindex", help="rebuild the index from the .mitm files"
                     ).set_defaults(func=reindex_)
    prune = verbs.add_parser("prune", help="delete recordings past retention (each deletion is "
                             "audited in operator-audit.jsonl beside the audit log)")
    prune.add_argument("--older-than", help="default: recording.retention_days")
    prune.add_argument("--max-bytes", help="default: recording.max_bytes")
    prune.set_defaults(func=prune_)


def _load(args: argparse.Namespace, secrets: bool = False):
    config = configmod.load(args.config, resolve_secrets=secrets)
    recording = config.sections.get("recording")
    if recording is None:
        raise SystemExit(f"{args.config} has no recording section")
    return config, recording


def duration(text: str) -> float:
    m = re.fullmatch(r"(\d+)([smhdw])", text)
    if not m:
        raise SystemExit(f"not a duration: {text!r} (e.g. 30m, 12h, 1d)")
    return int(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]


def list_(args: argparse.Namespace) -> int:
    _, recording = _load(args)
    db = index.connect(recording.index_path)
    since = time.time() - duration(args.since) if args.since else None
    rows = index.query(db, args.user, since, args.decision, args.tool, args.limit)
    print(f"{'time (UTC)':<20} {'user':<24} {'upstream':<10} {'operation':<22} "
          f"{'decision':<8} {'status':>6} {'masked':>6}  decision id")
    for r in rows:
        when = datetime.fromtimestamp(r["ts"], UTC).strftime("%Y-%m-%d %H:%M:%S")
        op = (r["operation"] or "-") + (f" {r['tool']}" if r["tool"] else "")
        print(f"{when:<20} {r['user'][:24]:<24} {(r['upstream'] or '-')[:10]:<10} {op[:22]:<22} "
              f"{r['decision']:<8} {r['status'] or '-':>6} {r['masked'] or 0:>6}  "
              f"{r['decision_id']}")
    print(f"({len(rows)} flow(s))")
    return 0


def _flow(recording, ident: str) -> tuple[dict, http.HTTPFlow]:
    db = index.connect(recording.index_path)
    r = index.find(db, ident)
    if r is None:
        raise SystemExit(f"no recorded flow {ident}")
    with (recording.dir / r["file"]).open("rb") as f:
        f.seek(r["offset"])
        flow = next(iter(io.FlowReader(f).stream()))
    return r, flow


def show_(args: argparse.Namespace) -> int:
    config, recording = _load(args)
    r, flow = _flow(recording, args.id)
    meta = flow.metadata.get("douane", {})
    decision = meta.get("decision", {})
    print(f"{r['decision_id']}  {flow.request.method} {flow.request.pretty_url}")
    print(f"user {r['user']} ({r['groups'] or 'no groups'}), upstream {r['upstream']}, "
          f"decision {decision.get('action', 'allow')}"
          + (f", risk {decision['risk']:g}" if decision.get("risk") else "")
          + (f", masked {json.loads(r['masked_types'])}" if r["masked_types"] else ""))
    for reason in decision.get("reasons", []):
        print(f"  reason: {reason['rule']}: {reason['message']}")
    upstream = next((u for u in config.upstreams if u.name == r["upstream"]), None)
    if upstream is None:
        return 0
    try:
        it = protocols.parse_request(upstream, flow)
    except protocols.ProtocolError as e:
        print(f"  (request not readable: {e.message})")
        return 0
    print()
    for piece in it.texts:
        print(f"[{piece.role or piece.kind}] {piece.text}")
    for call in it.tool_calls:
        print(f"[tool call] {call.name}({json.dumps(call.arguments)})")
    if flow.response and flow.response.headers.get("content-type", "").startswith(
            "text/event-stream"):
        print(f"[assistant, streamed] {_streamed_text(upstream, it, flow)}")
    elif flow.response:
        try:
            protocols.parse_response(upstream, flow, it)
        except protocols.ProtocolError:
            print(f"[response {flow.response.status_code}] {flow.response.text[:500]}")
            return 0
        for piece in it.response_texts:
            print(f"[{piece.kind}] {piece.text}")
        if not it.response_texts:
            print(f"[response {flow.response.status_code}] {flow.response.text[:500]}")
    return 0


def _streamed_text(upstream, it, flow: http.HTTPFlow) -> str:
    from douane.protocols import streams

    rewriter = streams.StreamRewriter(protocols.stream_format(upstream, it), it, "show")
    rewriter(flow.response.content or b"")
    rewriter(b"")
    return " | ".join(p.text for p in it.response_texts)


def export_(args: argparse.Namespace) -> int:
    _, recording = _load(args)
    r, flow = _flow(recording, args.id)
    if args.session:
        args.output.write_bytes((recording.dir / r["file"]).read_bytes())
    else:
        with args.output.open("wb") as f:
            io.FlowWriter(f).add(flow)
    print(f"wrote {args.output}")
    return 0


def reindex_(args: argparse.Namespace) -> int:
    _, recording = _load(args)
    db = index.connect(recording.index_path)
    print(f"indexed {index.reindex(db, recording.dir)} flow(s) from {recording.dir}")
    return 0


def prune_(args: argparse.Namespace) -> int:
    config, recording = _load(args, secrets=True)  # the audit HMAC key
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
    # Operator actions have their own chain: the gateway may be appending to the main log now.
    log = AuditLog(AuditConfig(config.audit.path.with_name("operator-" + config.audit.path.name),
                               config.audit.max_bytes, config.audit.backups), hmac_key(config))
    db = index.connect(recording.index_path)
    for path in doomed:
        relative = str(path.relative_to(recording.dir))
        size = path.stat().st_size
        path.unlink()
        db.execute("DELETE FROM flows WHERE file = ?", (relative,))
        log.append({"event": "recording.deleted", "file": relative, "bytes": size,
                    "reason": "retention"})
    db.commit()
    log.close()
    print(f"deleted {len(doomed)} recording file(s)")
    return 0

