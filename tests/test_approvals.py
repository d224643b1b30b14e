"""Approvals in mitmproxy's unit-test style: the config section, the grant store, the webhook's
retries, and what mitmweb's resume and kill (and a client that goes away) do to a held flow."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from mitmproxy.connection import ConnectionState
from mitmproxy.test import taddons, tflow

from douane.approvals import notify
from douane.approvals.addon import MITMWEB, Approvals, preview_pieces
from douane.approvals.config import Webhook
from douane.approvals.store import Grant, GrantStore, Pending, new_approval_id
from douane.audit import AuditTrail
from douane.config import ConfigError, load
from douane.flowstate import Identity, Reason, state
from douane.interaction import Interaction, McpMessage, TextPiece
from douane.masking.addon import Mask
from douane.masking.engine import Span
from douane.settings import Settings


def write_config(tmp_path: Path, approvals: Any) -> Path:
    config = {"version": 1, "identity": {"dev_issuer": {"enabled": True}},
              "gateway": {"state_dir": str(tmp_path / "state")},
              "upstreams": {"llm": {"url": "http://127.0.0.1:9/v1", "protocol": "openai"},
                            "crm": {"url": "http://127.0.0.1:9/mcp", "protocol": "mcp"}},
              **({"approvals": approvals} if approvals is not None else {})}
    path = tmp_path / "douane.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_defaults_per_protocol_and_per_upstream_overrides(tmp_path):
    section = load(write_config(tmp_path, {"approver_groups": ["approvers"], "upstreams": {
        "crm": {"mode": "hold"}}})).sections["approvals"]
    assert (section.host, section.port, section.public_url) == ("127.0.0.1", 8181, None)
    assert section.wait_for("llm", "openai").mode == "hold"
    assert section.wait_for("llm", "openai").timeout == 300
    assert section.protocols["mcp"].mode == "answer"
    # an MCP upstream switched to hold gets a hold shorter than MCP clients' 60 s patience
    assert section.wait_for("crm", "mcp").mode == "hold"
    assert section.wait_for("crm", "mcp").timeout == 45
    assert section.database == tmp_path / "state" / "approvals.sqlite3"


@pytest.mark.parametrize(("approvals", "error"), [
    ({"approver_groups": []}, "approvals.approver_groups: name at least one approver group"),
    ({"approver_groups": ["a"], "listen": "8181"}, "approvals.listen: expected HOST:PORT"),
    ({"approver_groups": ["a"], "upstreams": {"nope": {}}}, "approvals.upstreams.nope: not a "
                                                            "declared upstream"),
    ({"approver_groups": ["a"], "protocols": {"mcp": {"mode": "wait"}}},
     "approvals.protocols.mcp.mode: expected hold or answer"),
    ({"approver_groups": ["a"], "protocols": {"openai": {"timeout": "soon"}}},
     "approvals.protocols.openai.timeout: expected a positive duration"),
    ({"approver_groups": ["a"], "webhook": {"url": "hooks.example"}},
     "approvals.webhook.url: expected an http(s) URL"),
    # the inbox's Secure cookie: https, or plain http on loopback only
    ({"approver_groups": ["a"], "listen": "0.0.0.0:8181", "inbox": {"client_id": "c"}},
     "approvals.inbox: the inbox needs approvals.public_url in https"),
    ({"approver_groups": ["a"], "public_url": "http://douane.corp.example",
      "inbox": {"client_id": "c"}}, "approvals.inbox: the inbox needs approvals.public_url"),
    ({"approver_groups": ["a"], "inbox": {"client_id": "c"}},
     "approvals.inbox: the inbox logs approvers in at an identity.issuers entry"),
])
def test_config_errors_name_the_line(tmp_path, approvals, error):
    with pytest.raises(ConfigError) as err:
        load(write_config(tmp_path, approvals))
    assert error in str(err.value) and "douane.yaml:" in str(err.value)


def grant(**overrides: Any) -> Grant:
    now = time.time()
    values = {"id": "grt_1", "user": "alice", "upstream": "crm", "subject": "delete_records",
              "fingerprint": None, "uses_left": None, "created_at": now, "expires_at": now + 60,
              "approval_id": "apr_1", "approver": "bob", "reason": "ok", **overrides}
    return Grant(**values)


def test_grants_match_user_upstream_subject_and_expire(tmp_path):
    store = GrantStore(tmp_path / "g.sqlite3")
    now = time.time()
    store.add_sync(grant())
    store.add_sync(grant(id="grt_2", subject="drop_table", expires_at=now + 1))
    store.add_sync(grant(id="grt_3", subject="exec", fingerprint="f1", uses_left=1))
    assert store.use_sync("alice", "crm", "delete_records", "x", now).id == "grt_1"
    assert store.use_sync("alice", "crm", "delete_records", "x", now).id == "grt_1"  # reusable
    assert store.use_sync("mallory", "crm", "delete_records", "x", now) is None
    assert store.use_sync("alice", "other", "delete_records", "x", now) is None
    assert store.use_sync("alice", "crm", "drop_table", "x", now + 2) is None  # expired
    assert store.use_sync("alice", "crm", "exec", "f2", now) is None  # another request
    assert store.use_sync("alice", "crm", "exec", "f1", now).id == "grt_3"
    assert store.use_sync("alice", "crm", "exec", "f1", now) is None  # one shot, used
    assert [g.id for g in store.active_sync(now)] == ["grt_1"]
    store.close()
    reopened = GrantStore(tmp_path / "g.sqlite3")
    assert reopened.use_sync("alice", "crm", "delete_records", "x", now).id == "grt_1"
    reopened.close()


class FlakyReceiver:
    """Answers 500 to the first `failures` POSTs, then 200."""

    def __init__(self, failures: int) -> None:
        self.bodies: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                receiver.bodies.append(json.loads(self.rfile.read(
                    int(self.headers["content-length"]))))
                self.send_response(500 if len(receiver.bodies) <= failures else 200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook?secret=s3cr3t"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def pending() -> Pending:
    now = time.time()
    return Pending(id=new_approval_id(), requester=Identity("alice", ("eng",), "iss", "s", "b"),
                   upstream="crm", protocol="mcp", operation="mcp:tools/call",
                   subject="delete_records", model=None, fingerprint="f", decision_id="dcn_1",
                   mode="answer", reasons=[{"rule": "tool_risk", "message": "risky"}], risk=50,
                   preview=[], created_at=now, expires_at=now + 60)


def test_webhook_retries_then_audits_the_outcome(caplog):
    receiver = FlakyReceiver(failures=1)
    audited: list[dict[str, Any]] = []
    p = pending()
    notify.Notifier(Webhook(receiver.url, 2, 5), audited.append).notify(p, "http://admin").join(10)
    assert len(receiver.bodies) == 2 and audited[-1]["event"] == "approval.notified"
    assert audited[-1]["attempts"] == 2
    body = receiver.bodies[-1]
    assert p.id in body["text"] and body["url"] == f"http://admin/approvals/{p.id}"
    assert body["approve_command"] == f"douane approvals approve {p.id}"

    down = FlakyReceiver(failures=99)
    audited.clear()
    notify.Notifier(Webhook(down.url, 1, 5), audited.append).notify(p, "http://admin").join(10)
    assert len(down.bodies) == 2 and audited == [{
        "event": "approval.notify_failed", "approval_id": p.id, "decision_id": "dcn_1",
        "attempts": 2, "error": "HTTP 500"}]
    assert "could not notify approvers" in caplog.text and "s3cr3t" not in caplog.text
    receiver.server.shutdown()
    down.server.shutdown()


def held_flow(settings: Settings, user: str = "alice"):
    f = tflow.tflow()
    f.client_conn.state = ConnectionState.OPEN
    st = state(f)
    st.identity = Identity(user, ("eng",), "iss", "sub", "bearer")
    st.upstream = settings.config.upstreams[0]
    st.interaction = Interaction("openai", "chat.completions", model="gpt-4o",
                                 texts=[TextPiece("prompt", "user", "drop it", ("messages", 0))],
                                 mcp=[McpMessage(None, None, {})])
    st.decide("hold", Reason("tool_risk", "risky", score=60))
    return f, st


def test_mitmweb_resume_approves_kill_denies_and_a_gone_client_abandons(tmp_path):
    config = write_config(tmp_path, {"approver_groups": ["approvers"], "listen": "127.0.0.1:0"})

    async def main() -> list[dict[str, Any]]:
        settings = Settings()
        trail = AuditTrail(settings)
        approvals = Approvals(settings, trail, Mask(settings))
        records: list[dict[str, Any]] = []
        with taddons.context(settings, trail, approvals) as tctx:
            tctx.configure(settings, douane_config=str(config))
            trail.append = records.append  # type: ignore[method-assign]

            async def held(act) -> tuple[Any, Any]:
                f, st = held_flow(settings)
                task = asyncio.create_task(approvals.request(f))
                while not approvals.open_requests():
                    await asyncio.sleep(0.01)
                assert f.intercepted
                act(f)
                await asyncio.wait_for(task, 5)
                return f, st

            f, st = await held(lambda f: f.resume())
            assert st.decision.action == "allow" and f.response is None and not f.intercepted
            assert f"approved by {MITMWEB}" in st.decision.reasons[-1].message

            f, st = await held(lambda f: f.kill())
            assert f.response.status_code == 403 and f.error is None and f.live
            assert b"denied by mitmweb operator: killed in mitmweb" in f.response.content

            def hang_up(f) -> None:
                f.client_conn.state = ConnectionState.CLOSED
            f, st = await held(hang_up)
            assert f.response is None and f.killable is False and st.decision.action == "block"
            await approvals.done()
        return records

    records = asyncio.run(main())
    outcomes = [(r["event"], r.get("approver")) for r in records if r["event"] != "approval."
                "requested"]
    assert outcomes == [("approval.approved", MITMWEB), ("approval.denied", MITMWEB),
                        ("approval.abandoned", None)]


def test_without_an_approvals_section_a_hold_is_refused(tmp_path):
    config = write_config(tmp_path, None)
    settings = Settings()
    approvals = Approvals(settings, AuditTrail(settings), Mask(settings))
    with taddons.context(settings, approvals) as tctx:
        tctx.configure(settings, douane_config=str(config))
        f, st = held_flow(settings)
        asyncio.run(approvals.request(f))
    assert f.response.status_code == 403 and b"approval_required" in f.response.content


class EmailSpans:
    """Stands in for the masking worker pool: finds e-mail addresses, or fails."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail

    async def analyze(self, texts: list[str]) -> list[list[Span]]:
        if self.fail:
            raise RuntimeError("worker crashed")
        return [[Span(m.start(), m.end(), "EMAIL_ADDRESS", 1.0)
                 for m in re.finditer(r"\S+@\S+", t)] for t in texts]


def test_the_approvers_preview_is_masked_and_withheld_when_masking_fails(tmp_path):
    path = write_config(tmp_path, {"approver_groups": ["approvers"]})
    text = path.read_text() + "masking: {entities: [EMAIL_ADDRESS], ner_missing: pattern_only}\n"
    path.write_text(text)
    settings = Settings()
    mask = Mask(settings)
    approvals = Approvals(settings, AuditTrail(settings), mask)
    with taddons.context(settings) as tctx:
        tctx.configure(settings, douane_config=str(path))
        mask.masking = settings.config.sections["masking"]
        _, st = held_flow(settings)
        st.interaction.texts[0].text = "mail jane.doe@example.org the dump"
        mask.pool = EmailSpans()
        assert asyncio.run(approvals._preview(st)) == [
            {"kind": "prompt", "where": "messages.0", "text": "mail <EMAIL_ADDRESS> the dump"}]
        mask.pool = EmailSpans(fail=True)
        preview = asyncio.run(approvals._preview(st))
    assert "jane.doe" not in json.dumps(preview) and "withheld" in preview[0]["text"]


@pytest.mark.parametrize(("fields", "shown"), [
    (["prompt[0]"], ["p0", "p5", "p6", "p7", "p8", "p9", "p10", "p11"]),
    (["prompt[2..3]", "tool_result[0]"], ["p2", "p3", "r0", "p7", "p8", "p9", "p10", "p11"]),
    (["prompt[*]"], [f"p{n}" for n in range(8)]),
    (["model"], [f"p{n}" for n in range(4, 12)]),  # a reason about no piece: the last ones
])
def test_the_preview_leads_with_the_pieces_the_reasons_point_at(fields, shown):
    texts = [TextPiece("prompt", "user", f"p{n}", ("messages", n)) for n in range(12)]
    texts.append(TextPiece("tool_result", "tool", "r0", ("messages", 12)))
    texts.append(TextPiece("prompt", None, "role", ("messages", 11, "role", "<key>"), False))
    chosen, candidates = preview_pieces(texts, [Reason(f"rule.{f}", "m", f) for f in fields])
    assert [p.text for p, _ in chosen] == shown
    assert candidates == 12 + ("tool_result[0]" in fields)  # a JSON key is no context
    assert all(bool(rules) == (p.text in ("p0", "p2", "p3", "r0") or fields == ["prompt[*]"])
               for p, rules in chosen)


def test_a_retry_with_a_new_progress_token_or_trace_context_is_the_same_request():
    """`_meta` values are inspected (red team, stop 28) but a client sets a progress token and
    trace context anew on each retry: they do not make it another request; its arguments do."""
    from douane.approvals.store import fingerprint
    from douane.protocols import mcp

    def fp(meta: dict, text: str = "a") -> str:
        return fingerprint("crm", mcp.parse_request({
            "jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
                "name": "delete_records", "arguments": {"text": text}, "_meta": meta}}, None))
    first = fp({"progressToken": "p-1", "traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"})
    assert fp({"progressToken": "p-2", "traceparent": "00-" + "c" * 32 + "-" + "d" * 16 + "-01"}) \
        == first
    assert fp({"progressToken": "p-1"}, "b") != fp({"progressToken": "p-1"})
