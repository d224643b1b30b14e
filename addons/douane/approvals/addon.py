"""`Approvals`: a "hold" decision waits for a human approver instead of being refused.

Placed right after `Enforce`. For a held flow it first looks for a persisted grant (user, upstream,
tool or model, unexpired) and lets the flow pass on it. Otherwise it opens an approval request
(audited, sent to the webhook) and, by the upstream's mode:
- hold: `flow.intercept()` and await the outcome with a deadline. Awaiting costs the event loop
  nothing, so other flows keep moving. Approved (API, or resumed in mitmweb) -> the flow goes on
  unchanged with an `approval.granted` reason; denied (API, or killed in mitmweb), timed out ->
  a refusal in the API's shape with the reason; the client disconnected -> abandoned.
- answer: refuse at once with the approval id; once approved, the retry passes on the grant;
  once denied by an approver, a retry of the same request by the same user gets that denial and
  its reason for `retry_window` after it (the agent can tell denied from pending), not a new
  approval request. Denials are kept in memory: a restart forgets them.

With a shared store (`database:` PostgreSQL), requests, decisions and grants live in the database
(`douane.approvals.shared`): any replica's API lists and decides a request held on another, which
learns of the decision at once (LISTEN/NOTIFY) and catches up after a lost connection; retries of
an answer-mode request find it (or its denial) on any replica. While the store is down, a held
request is refused (`store_unavailable`), never let through.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from typing import Any

from mitmproxy import ctx, hooks, http
from mitmproxy.flow import Error

from douane import devissuer, protocols
from douane.approvals import credentials
from douane.approvals.api import AdminAPI, ApprovalError
from douane.approvals.config import ApprovalSettings
from douane.approvals.inbox import Inbox
from douane.approvals.notify import Notifier
from douane.approvals.shared import CHANNEL, SharedApprovals, pending_of
from douane.approvals.store import (
    Grant,
    GrantStore,
    Pending,
    fingerprint,
    new_approval_id,
    subject_of,
)
from douane.audit import AuditTrail
from douane.flowstate import Decision, FlowState, Identity, Reason, state
from douane.interaction import TextPiece
from douane.masking import operators
from douane.masking.addon import Mask
from douane.policy.addon import explain
from douane.protocols import mcp
from douane.refusals import input_required, refuse
from douane.settings import Settings
from douane.store import StoreUnavailable
from douane.store.addon import SharedStore
from douane.tokens import TokenVerifier
from douane.untrusted import encodable, loggable

logger = logging.getLogger(__name__)
MITMWEB = "mitmweb operator"
POLL = 0.5  # how often a held flow checks for a kill in mitmweb or a gone client
PREVIEW_PIECES, PREVIEW_CHARS = 8, 2000
PREVIEW_KINDS = ("prompt", "tool_arguments")  # the context shown after the flagged pieces
FIELD = re.compile(r"(?P<kind>\w+)\[(?:(?P<first>\d+)(?:\.\.(?P<last>\d+))?|\*)\]")
KEEP_DECIDED = 3600  # seconds a decided request stays visible to `show`
# Approval requests one user may have waiting (on the fleet, with a shared store): past them a
# held request is refused (each held flow keeps its body, each request a preview, every
# approver's inbox a row; 300 distinct held prompts of one user grew the gateway 170 MB).
OPEN_PER_USER = 32


class Approvals:
    def __init__(self, settings: Settings, audit_trail: AuditTrail, mask: Mask,
                 shared_store: SharedStore | None = None):
        self.settings, self.audit_trail, self.mask = settings, audit_trail, mask
        self.shared_store = shared_store
        self.approvals: ApprovalSettings | None = None
        self.store: GrantStore | None = None
        self.shared: SharedApprovals | None = None  # with a shared store: the fleet's approvals
        self.api: AdminAPI | None = None
        self.notifier: Notifier | None = None
        self.requests: dict[str, Pending] = {}
        self.flows: dict[str, http.HTTPFlow] = {}  # held flows by approval id
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._opening: dict[str, int] = {}  # by user: approval requests being opened (`_open`)
        self._tasks: set[asyncio.Task[None]] = set()

    # --- lifecycle -----------------------------------------------------------------------------

    def configure(self, updated: set[str]) -> None:
        if "douane_config" not in updated and self.store is not None:
            return
        approvals = self.settings.config.sections.get("approvals")
        pg = self.shared_store.pg if self.shared_store else None
        if approvals == self.approvals and pg is (self.shared.pg if self.shared else None):
            return
        self._close("douane's approval settings changed before an approver answered")
        self.approvals = approvals
        if approvals is None:
            return
        self.store = GrantStore(approvals.database)
        if pg is not None:
            self.shared = SharedApprovals(pg)
            pg.subscribe(CHANNEL, self._decided_elsewhere)
            pg.on_listen.append(self._catch_up)
        identity = self.settings.config.identity
        dev_key = devissuer.public_jwk(identity.dev_issuer) if identity.dev_issuer else None
        self.api = AdminAPI(self, approvals, TokenVerifier(identity, dev_key))
        if pg is not None:
            self.api.shared_secret = lambda: pg.secret("approval_status")
        if approvals.inbox:
            Inbox(self.api, approvals.inbox).mount()
        credentials.mount(self.api, self.settings)
        self.notifier = Notifier(approvals.webhook, self.audit) \
            if approvals.webhook and approvals.webhook.url else None
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # started by running()
        self.api.start()

    def running(self) -> None:
        if self.api and self.api.server is None:
            self.api.start()

    async def done(self) -> None:
        # Held clients get their refusal before the loop stops (and before the audit log closes).
        why = "douane shut down before an approver answered"
        if self.shared:  # no other replica lists or decides them any more
            with contextlib.suppress(StoreUnavailable, TimeoutError):
                async with asyncio.timeout(3):
                    for pending in self.open_requests():
                        await self.shared.decide(pending.id, "denied", None, why, holder=True)
        self._close(why)
        deadline = time.monotonic() + 5
        held = bool(self.flows)
        while self.flows and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if held:
            await asyncio.sleep(0.3)  # the proxy writes those refusals

    def _close(self, why: str) -> None:
        """Deny whatever is still open (never left hanging), stop the API, close the database."""
        for pending in self.open_requests():
            self._finish(pending, "denied", None, why)
        if self.api:
            self.api.stop()
        if self.store:
            self.store.close()
        self.api = self.store = self.notifier = self.shared = None

    def audit(self, record: dict[str, Any]) -> None:
        self.audit_trail.append(record)

    # --- the hook ------------------------------------------------------------------------------

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        try:
            await self._held(flow)
        except StoreUnavailable as e:  # fail closed, and say why
            refuse(flow, 503, "this request needs an approver, and douane's shared store of "
                   "approvals is unavailable; retry shortly", "store_unavailable",
                   Reason("store.unavailable", str(e)))
            return
        st = state(flow)
        if flow.response is None and flow.live and st.interaction and \
                any(mcp.approval_answer(m) for m in st.interaction.mcp):
            await asyncio.to_thread(_drop_own_input, flow)  # a large body: off the loop

    async def _held(self, flow: http.HTTPFlow) -> None:
        st = state(flow)
        if st.decision is None or st.decision.action != "hold":
            return
        decision = st.decision
        if self.approvals is None or self.store is None:
            refuse(flow, 403, f"this request needs an approver: {explain(decision)}",
                   "approval_required", *decision.reasons, action="hold")
            return
        assert st.identity and st.upstream and st.interaction
        subject = subject_of(st.interaction)
        fp = fingerprint(st.upstream.name, st.interaction)
        grant = await self.shared.use_grant(st.identity.user, st.upstream.name, subject, fp) \
            if self.shared else await self.store.use(st.identity.user, st.upstream.name, subject,
                                                     fp)
        if grant is not None:
            self.audit({"event": "approval.grant_used", "grant_id": grant.id,
                        "approval_id": grant.approval_id, "decision_id": st.decision_id,
                        "user": st.identity.user, "upstream": grant.upstream,
                        "subject": grant.subject})
            self._allow(st, Reason("approval.grant", f"grant {grant.id} by {grant.approver} "
                                   f"({grant.reason}) until {time.ctime(grant.expires_at)}"))
            return
        wait = self.approvals.wait_for(st.upstream.name, st.upstream.protocol)
        if wait.mode == "answer":
            earlier = await self._earlier(st, fp)
            denied = earlier if earlier and earlier.status == "denied" else None
            if denied is not None:
                why = f"denied by {denied.approver}: {denied.reason}"
                until = time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                      time.gmtime(self._stands_until(denied)))
                refuse(flow, 403, f"approval {denied.id}: {why}; the denial stands until {until}",
                       "approval_denied", Reason("approval.denied", why), action="block",
                       headers={"x-douane-approval-id": denied.id})
                return
            pending = earlier if earlier and earlier.status == "pending" else \
                await self._open(flow, st, "answer", wait.timeout)
            if pending is None:
                return
            if self._by_url(flow, st):
                assert self.api
                input_required(flow, await self.api.status_url(pending.id),
                               f"douane: approval {pending.id} is pending (calling "
                               f"{pending.subject} on {pending.upstream}); open the link to "
                               "see its status, then accept to retry", *decision.reasons)
                return
            refuse(flow, 403, f"this request needs an approver: approval {pending.id} is "
                   f"pending; retry after it is approved ({explain(decision)})",
                   "approval_pending", *decision.reasons, action="hold",
                   headers={"x-douane-approval-id": pending.id})
            return
        pending = await self._open(flow, st, "hold", wait.timeout)
        if pending is None:
            return
        try:
            await self._hold(flow, pending)
            self._conclude(flow, st, pending)
        finally:
            self.flows.pop(pending.id, None)

    def _too_many(self, flow: http.HTTPFlow, user: str, decision: Decision) -> bool:
        """Refuse a request that would open one approval request more than OPEN_PER_USER for its
        user, counting those being opened (`_open` awaits before its request is listed)."""
        mine = self._opening.get(user, 0) + sum(
            p.requester.user == user for p in self.open_requests())
        if mine < OPEN_PER_USER:
            return False
        self._refuse_too_many(flow, mine, decision)
        return True

    @staticmethod
    def _refuse_too_many(flow: http.HTTPFlow, mine: int, decision: Decision) -> None:
        refuse(flow, 429, f"this request needs an approver, and {mine} of your requests "
               "already wait for one; retry once they are decided", "too_many_approvals",
               Reason("approval.too_many", f"{mine} approval requests of this user are "
                      f"open (at most {OPEN_PER_USER})"), *decision.reasons, action="refuse")

    async def _earlier(self, st: FlowState, fp: str) -> Pending | None:
        """This very request of this user asked before (answer mode): still pending (an agent
        retrying before anyone acted gets the same approval request, not a new one), or an
        approver's standing denial; None otherwise."""
        assert st.identity
        if self.shared is None:
            return next((p for p in self.open_requests() if p.mode == "answer"
                         and p.fingerprint == fp and p.requester.user == st.identity.user),
                        None) or self._denied_before(st, fp)
        row = await self.shared.latest_answer(st.identity.user, fp)
        if row is None:
            return None
        pending = self.requests.get(row["id"]) or pending_of(row)
        now = time.time()
        if pending.status == "pending" and pending.expires_at > now:
            return pending
        if pending.status == "denied" and pending.approver is not None and \
                self._stands_until(pending) > now:
            return pending
        return None

    @staticmethod
    def _by_url(flow: http.HTTPFlow, st: FlowState) -> bool:
        """A 2026-07-28 client that takes URL elicitations is answered with the approval's status
        page in an `InputRequiredResult`, until it declines or cancels it."""
        assert st.interaction
        msgs = st.interaction.mcp
        return len(msgs) == 1 and mcp.approval_answer(msgs[0]) in (None, "accept") and \
            mcp.asks_by_url(msgs[0], flow.request.headers.get("mcp-protocol-version", ""))

    def _denied_before(self, st: FlowState, fp: str) -> Pending | None:
        """An approver's standing denial of this very request by this user (answer mode)."""
        assert st.identity
        now = time.time()
        return next((p for p in self.requests.values() if p.mode == "answer"
                     and p.status == "denied" and p.approver is not None and p.fingerprint == fp
                     and p.requester.user == st.identity.user and self._stands_until(p) > now),
                    None)

    def _stands_until(self, pending: Pending) -> float:
        assert self.approvals and pending.decided_at is not None
        return pending.decided_at + self.approvals.retry_window

    async def _open(self, flow: http.HTTPFlow, st: FlowState, mode: str,
                    timeout: int) -> Pending | None:
        """A new approval request for the flow; None when its user has too many (refused)."""
        assert st.identity and st.upstream and st.interaction and st.decision
        user = st.identity.user
        if self._too_many(flow, user, st.decision):
            return None
        self._opening[user] = self._opening.get(user, 0) + 1
        try:
            now = time.time()
            self._forget_old(now)
            pending = Pending(
                id=new_approval_id(), requester=st.identity, upstream=st.upstream.name,
                protocol=st.upstream.protocol, operation=st.interaction.operation,
                subject=subject_of(st.interaction), model=st.interaction.model,
                fingerprint=fingerprint(st.upstream.name, st.interaction),
                decision_id=st.decision_id, mode=mode,
                reasons=[r.summary() for r in st.decision.reasons], risk=st.decision.risk,
                preview=await self._preview(st), created_at=now, expires_at=now + timeout)
            if self.shared:  # the fleet's count decides (this replica's is a cheap first test)
                assert self.approvals
                fleet = await self.shared.open(
                    pending, max(KEEP_DECIDED, self.approvals.retry_window), OPEN_PER_USER)
                if fleet is not None:
                    self._refuse_too_many(flow, fleet, st.decision)
                    return None
            self.requests[pending.id] = pending
        finally:
            self._opening[user] -= 1
            if not self._opening[user]:
                del self._opening[user]
        if mode == "hold":
            self.flows[pending.id] = flow
        else:
            self._timers[pending.id] = asyncio.get_running_loop().call_later(
                timeout, self._expire, pending)
        self.audit({"event": "approval.requested", "approval_id": pending.id,
                    "decision_id": pending.decision_id, "user": pending.requester.user,
                    "groups": list(pending.requester.groups), "upstream": pending.upstream,
                    "operation": pending.operation, "subject": pending.subject,
                    "model": pending.model, "reasons": pending.reasons, "risk": pending.risk,
                    "mode": mode, "timeout_seconds": timeout})
        logger.info("douane: approval %s opened for %s (%s on %s, %s mode)", pending.id,
                    loggable(pending.requester.user), loggable(pending.subject), pending.upstream,
                    mode)
        if self.notifier:
            assert self.api
            self.notifier.notify(pending, self.approvals.public_url or
                                 f"http://{self.approvals.host}:{self.api.port}")
        return pending

    async def _preview(self, st: FlowState) -> list[dict[str, str]]:
        """What the approver reads: the pieces the reasons point at first, then the last prompt
        pieces or tool arguments for context, masked when masking is configured; a piece or a
        list that was cut says so."""
        assert st.interaction and st.decision
        chosen, candidates = preview_pieces(st.interaction.texts, st.decision.reasons)
        texts = [p.text[:PREVIEW_CHARS] for p, _ in chosen]
        if self.mask.pool and self.mask.masking and texts:
            try:
                spans = await self.mask.pool.analyze(texts)
            except Exception as e:  # never show what masking could not check
                logger.warning("douane: approval preview withheld, masking failed: %s", e)
                return [{"kind": "notice", "where": "", "text": "preview withheld: masking "
                         "failed"}]
            texts = [operators.apply(self.mask.masking, t, s, {}) for t, s in zip(texts, spans,
                                                                                   strict=True)]
        out = []
        for (piece, rules), text in zip(chosen, texts, strict=True):
            shown = {"kind": piece.kind, "where": encodable(".".join(map(str, piece.path))),
                     "text": encodable(text)}  # (the inbox's page is UTF-8)
            if rules:
                shown["flagged"] = ", ".join(rules)
            if len(piece.text) > PREVIEW_CHARS:
                shown["note"] = f"cut: the first {PREVIEW_CHARS:,} of {len(piece.text):,} " \
                                "characters are shown"
            out.append(shown)
        if candidates > len(chosen):
            out.append({"kind": "notice", "where": "", "text": f"{candidates - len(chosen)} "
                        f"more piece(s) not shown ({len(chosen)} of {candidates})"})
        return out

    async def _hold(self, flow: http.HTTPFlow, pending: Pending) -> None:
        """Wait for the outcome; a kill in mitmweb does not wake `wait_for_resume`, so poll."""
        flow.intercept()
        ctx.master.addons.trigger(hooks.UpdateHook([flow]))  # mitmweb shows it as intercepted
        try:
            while pending.status in ("pending", "approving"):
                remaining = pending.expires_at - time.time()
                if remaining <= 0 and pending.status == "pending":
                    await self._settle(pending, "timed_out", None, "timed out")
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(flow.wait_for_resume(), max(0.05, min(POLL, remaining)))
                if pending.status != "pending":
                    continue  # decided, or an approver's grant is being saved
                if flow.error and flow.error.msg == Error.KILLED_MESSAGE:
                    await self._settle(pending, "denied", MITMWEB, "killed in mitmweb")
                elif not flow.intercepted:
                    await self._settle(pending, "approved", MITMWEB, "resumed in mitmweb")
                elif not flow.client_conn.connected:
                    await self._settle(pending, "abandoned", None, "the client disconnected")
        finally:
            if flow.intercepted:
                flow.resume()

    def _conclude(self, flow: http.HTTPFlow, st: FlowState, pending: Pending) -> None:
        if flow.error and flow.error.msg == Error.KILLED_MESSAGE and pending.status != "abandoned":
            flow.error, flow.live = None, True  # answer the client instead of cutting it off
        if pending.status == "approved":
            self._allow(st, Reason("approval.granted", f"approved by {pending.approver} "
                                   f"({pending.reason}), approval {pending.id}"))
        elif pending.status == "abandoned":
            st.decide("block", Reason("approval.abandoned", f"approval {pending.id}: the client "
                                      "disconnected while held"))
            if flow.killable:
                flow.kill()
        else:
            why = "no approver answered in time (timed out)" if pending.status == "timed_out" \
                else f"denied by {pending.approver or 'douane'}: {pending.reason}"
            refuse(flow, 403, f"approval {pending.id}: {why}", f"approval_{pending.status}",
                   Reason(f"approval.{pending.status}", why), action="block",
                   headers={"x-douane-approval-id": pending.id})

    @staticmethod
    def _allow(st: FlowState, reason: Reason) -> None:
        held = st.decision
        assert held
        # not st.decide(): an approval is the one thing that lowers a hold to an allow
        st.decision = Decision("allow", [*held.reasons, reason])
        st.decision.risk = held.risk

    # --- outcomes ------------------------------------------------------------------------------

    def _finish(self, pending: Pending, status: str, approver: str | None, reason: str,
                grant: Grant | None = None) -> None:
        pending.decide(status, approver, reason, round(grant.expires_at - grant.created_at)
                       if grant and grant.fingerprint is None else None)
        self._release(pending)
        record: dict[str, Any] = {"event": f"approval.{status}", "approval_id": pending.id,
                                  "decision_id": pending.decision_id,
                                  "user": pending.requester.user, "upstream": pending.upstream,
                                  "subject": pending.subject, "reason": reason}
        if approver:
            record["approver"] = approver
        if grant:
            record.update(grant_id=grant.id, grant_expires_at=grant.expires_at,
                          grant_one_shot=grant.fingerprint is not None)
        self.audit(record)
        logger.info("douane: approval %s %s%s: %s", pending.id, status,
                    f" by {loggable(approver)}" if approver else "", loggable(reason))

    def _expire(self, pending: Pending) -> None:
        if pending.status == "pending":
            self._tasks.add(task := asyncio.get_running_loop().create_task(
                self._settle(pending, "timed_out", None, "timed out")))
            task.add_done_callback(self._tasks.discard)

    async def _settle(self, pending: Pending, status: str, approver: str | None,
                      reason: str) -> None:
        """An outcome this replica saw (timed out, abandoned, decided in mitmweb). With a shared
        store it is saved first, unless another replica's decision won: that one applies. A store
        that is down does not stop it (the row expires for the others)."""
        if self.shared:
            try:
                row = await self.shared.decide(pending.id, status, approver, reason, holder=True)
                if row is None:
                    row = await self.shared.get(pending.id)
                    if row and row["status"] != "pending":
                        self._apply(pending, row)
                        return
            except StoreUnavailable as e:
                logger.warning("douane: approval %s %s while the store is unavailable: %s",
                               pending.id, status, e)
        if pending.status == "pending":
            self._finish(pending, status, approver, reason)

    def _decided_elsewhere(self, approval_id: str) -> None:
        """NOTIFY: a request was decided; if held here and not yet known, apply the decision."""
        pending = self.requests.get(approval_id)
        if pending is not None and pending.status == "pending" and self.shared:
            self._tasks.add(task := asyncio.get_running_loop().create_task(self._fetch(pending)))
            task.add_done_callback(self._tasks.discard)

    def _catch_up(self) -> None:
        """The listener (re)connected: decisions made while it was away are read once."""
        for pending in self.open_requests():
            self._decided_elsewhere(pending.id)

    async def _fetch(self, pending: Pending) -> None:
        assert self.shared
        try:
            row = await self.shared.get(pending.id)
        except StoreUnavailable:
            return  # read again when the listener is back (_catch_up)
        if row and row["status"] != "pending" and pending.status == "pending":
            self._apply(pending, row)

    def _release(self, pending: Pending) -> None:
        """A decided request's timeout is cancelled and its flow, if held here, goes on."""
        timer = self._timers.pop(pending.id, None)
        if timer:
            timer.cancel()
        flow = self.flows.get(pending.id)
        if flow is not None and flow.intercepted:
            flow.resume()

    def _apply(self, pending: Pending, row: dict[str, Any]) -> None:
        """Another replica's decision, on the request held here (audited where it was taken)."""
        pending.decide(row["status"], row["approver"], row["reason"], row["grant_seconds"])
        self._release(pending)
        logger.info("douane: approval %s %s elsewhere%s", pending.id, pending.status,
                    f" by {loggable(pending.approver)}" if pending.approver else "")

    def _forget_old(self, now: float) -> None:
        assert self.approvals
        for key, p in list(self.requests.items()):
            keep = max(KEEP_DECIDED, self.approvals.retry_window if p.status == "denied" else 0)
            if p.decided_at is not None and now - p.decided_at > keep:
                del self.requests[key]

    def open_requests(self) -> list[Pending]:
        """The requests opened by this replica still waiting for an approver."""
        return [p for p in self.requests.values() if p.status == "pending"]

    async def listing(self) -> list[Pending]:
        """The requests waiting for an approver: on every replica with a shared store."""
        if self.shared is None:
            return self.open_requests()
        rows = await self._stored(self.shared.open_rows())
        return [self.requests.get(r["id"]) or pending_of(r) for r in rows]

    async def find(self, approval_id: str) -> Pending:
        pending = self.requests.get(approval_id)
        if self.shared is not None and (pending is None or pending.status == "pending"):
            row = await self._stored(self.shared.get(approval_id))  # decided elsewhere, maybe
            pending = pending_of(row) if row else None
        if pending is None:
            raise ApprovalError(404, f"no approval request {approval_id}")
        return pending

    @staticmethod
    async def _stored(call: Any) -> Any:
        try:
            return await call
        except StoreUnavailable as e:
            raise ApprovalError(503, f"{e}; retry shortly") from None

    async def _decidable(self, approval_id: str, approver: Identity) -> Pending:
        pending = await self.find(approval_id)
        if pending.status == "pending" and pending.expires_at <= time.time():
            raise ApprovalError(409, f"approval {approval_id} is already timed_out")
        if pending.status != "pending":
            raise ApprovalError(409, f"approval {approval_id} is already {pending.status}")
        if approver.user == pending.requester.user:
            self.audit_refusal(approver, pending, "self-approval")
            raise ApprovalError(403, "nobody approves or denies their own request")
        return pending

    def audit_refusal(self, approver: Identity, pending: Pending | None, why: str) -> None:
        self.audit({"event": "approval.refused", "approver": approver.user,
                    "approver_groups": list(approver.groups), "reason": why,
                    "approval_id": pending.id if pending else None})

    async def approve(self, approval_id: str, approver: Identity, reason: str,
                      grant_seconds: int | None) -> Pending:
        pending = await self._decidable(approval_id, approver)
        assert self.approvals and self.store
        if grant_seconds is not None and grant_seconds > self.approvals.max_grant:
            raise ApprovalError(400, f"a grant lasts at most {self.approvals.max_grant} s "
                                "(approvals.max_grant)")
        grant = None
        now = time.time()
        if grant_seconds is not None or pending.mode == "answer":
            # answer mode, "this request only": a one-shot grant for the identical retry
            one_shot = grant_seconds is None
            grant = Grant(id="grt_" + pending.id[4:], user=pending.requester.user,
                          upstream=pending.upstream, subject=pending.subject,
                          fingerprint=pending.fingerprint if one_shot else None,
                          uses_left=1 if one_shot else None, created_at=now,
                          expires_at=now + (grant_seconds or self.approvals.retry_window),
                          approval_id=pending.id, approver=approver.user, reason=reason)
        if self.shared:
            return await self._decide_shared(pending, "approved", approver, reason, grant)
        if grant:
            pending.status = "approving"  # nobody else decides it while the grant is saved
            try:
                await self.store.add(grant)  # persisted before the flow goes on
            except Exception:
                pending.status = "pending"
                raise
        self._finish(pending, "approved", approver.user, reason, grant)
        return pending

    async def deny(self, approval_id: str, approver: Identity, reason: str) -> Pending:
        pending = await self._decidable(approval_id, approver)
        if self.shared:
            return await self._decide_shared(pending, "denied", approver, reason)
        self._finish(pending, "denied", approver.user, reason)
        return pending

    async def _decide_shared(self, pending: Pending, status: str, approver: Identity,
                             reason: str, grant: Grant | None = None) -> Pending:
        """One decision across the fleet: saved (with its grant) only if still pending; the
        replica holding the request is notified, or applies it here if it is this one."""
        assert self.shared
        row = await self._stored(self.shared.decide(pending.id, status, approver.user, reason,
                                                    grant))
        if row is None:
            now = await self.find(pending.id)
            raise ApprovalError(409, f"approval {pending.id} is already "
                                f"{'timed_out' if now.status == 'pending' else now.status}")
        self._finish(self.requests.get(pending.id) or pending, status, approver.user, reason,
                     grant)
        return self.requests.get(pending.id) or pending


def _drop_own_input(flow: http.HTTPFlow) -> None:
    """The client's answer to douane's own input request is douane's: the server never asked."""
    doc = protocols.document(flow, "request")
    for _, msg in mcp.each(doc):
        responses = msg.get("params", {}).get(mcp.INPUT_RESPONSES)
        if isinstance(responses, dict):
            responses.pop(mcp.APPROVAL_INPUT, None)
            if not responses:
                del msg["params"][mcp.INPUT_RESPONSES]
    protocols.write_json(flow, "request", doc)


def preview_pieces(texts: list[TextPiece], reasons: list[Reason]
                   ) -> tuple[list[tuple[TextPiece, list[str]]], int]:
    """The pieces an approver sees, each with the rules pointing at it (a reason's field names
    the n-th piece of a kind as `prompt[2]`, a span as `prompt[2..3]`, all as `prompt[*]`): the
    flagged ones first, then the last prompt texts or tool arguments (free text: not JSON keys,
    ids or enums, which policy reads too), `PREVIEW_PIECES` in all;
    and how many were candidates."""
    spans = [(r.rule, m) for r in reasons if (m := FIELD.fullmatch(r.field or ""))]
    flagged, context = [], []
    counts: dict[str, int] = {}
    for piece in texts:
        n = counts[piece.kind] = counts.get(piece.kind, -1) + 1
        rules = [rule for rule, m in spans if m["kind"] == piece.kind and (
            piece.editable if m["first"] is None else  # `[*]`: the texts, not their keys
            int(m["first"]) <= n <= int(m["last"] or m["first"]))]
        if rules:
            flagged.append((piece, rules))
        elif piece.kind in PREVIEW_KINDS and piece.editable:  # free text, not keys or enums
            context.append((piece, rules))
    shown = flagged[:PREVIEW_PIECES]
    room = PREVIEW_PIECES - len(shown)
    return shown + context[max(0, len(context) - room):], len(flagged) + len(context)
