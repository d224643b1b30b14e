"""The admin API approvers use (and `douane approvals` talks to), on its own port, loopback by
default. Tornado ships with mitmproxy and runs on mitmproxy's own event loop.

    GET  /approvals                    pending approval requests
    GET  /approvals/ID                 one request (also after its outcome)
    POST /approvals/ID/approve         {"for": "1h", "reason": "..."}   (for: optional time box)
    POST /approvals/ID/deny            {"reason": "..."}
    GET  /status/ID/KEY                the requester's view of one request: its status only

Every call carries `Authorization: Bearer <OIDC token>`, verified like any client token; the
token's groups must include an approver group, and nobody decides their own request. The status
page is the exception: its URL is the capability (KEY, an HMAC of the id under a key of this
process), handed to the requester's MCP client in an `InputRequiredResult`; it shows the status,
the subject and the approver's reason, never the request's content.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import tornado.httpserver
import tornado.netutil
import tornado.web

from douane.approvals.config import ApprovalSettings, seconds
from douane.flowstate import Identity
from douane.store import StoreUnavailable
from douane.tokens import TokenError, TokenVerifier

if TYPE_CHECKING:
    from douane.approvals.addon import Approvals

logger = logging.getLogger(__name__)
ID = r"(apr_[0-9a-f]{16})"
REASON_CHARS = 1000
# tornado reads a body (up to 100 MB) before any handler checks the caller's token, and keeps an
# idle connection an hour: bounds for douane's own HTTP servers
SERVER_LIMITS: dict[str, Any] = {"max_body_size": 4 * 1024**2, "body_timeout": 30,
                                 "idle_connection_timeout": 60}


class ApprovalError(tornado.web.HTTPError):
    """A refused API call: its message is the JSON error shown to the approver."""

    def __init__(self, status: int, message: str):
        super().__init__(status)
        self.message = message


def bounded_reason(text: object, default: str = "") -> str:
    """The approver's reason: it reaches the held client and the audit records, bounded."""
    reason = str(text or default).strip()
    if len(reason) > REASON_CHARS:
        raise ApprovalError(400, f"the reason is {len(reason)} characters long (at most "
                            f"{REASON_CHARS})")
    return reason


def grant_duration(value: object) -> int | None:
    """An approval's time box (`for`): None approves this request only."""
    if value is None or value == "":
        return None
    grant = seconds(value) if isinstance(value, int | str) else None
    if grant is None or grant <= 0:
        raise ApprovalError(400, f"not a duration: {str(value)[:40]!r} (e.g. 15m, 1h, 1d)")
    return grant


class _Handler(tornado.web.RequestHandler):
    approver: Identity

    def initialize(self, api: AdminAPI) -> None:
        self.api = api

    async def prepare(self) -> None:
        self.approver = self.api.approver(await self.caller())

    async def caller(self) -> Identity:
        """The identity of the caller's bearer token (verified like the gateway's)."""
        auth = self.request.headers.get("authorization", "")
        if auth[:7].lower() != "bearer ":
            raise ApprovalError(401, "send your OIDC token as Authorization: Bearer")
        try:
            return await self.api.verifier.verify(auth[7:].strip(), "bearer")
        except TokenError as e:
            raise ApprovalError(401, e.message) from None

    def check_xsrf_cookie(self) -> None:
        pass  # a bearer token, not a cookie, authenticates these calls: no forgery to fear

    def body(self) -> dict[str, Any]:
        try:
            doc = json.loads(self.request.body or b"{}")
        except ValueError:
            raise ApprovalError(400, "the body is not JSON") from None
        if not isinstance(doc, dict):
            raise ApprovalError(400, "the body must be a JSON object")
        return doc

    def reason(self, doc: dict[str, Any], default: str = "") -> str:
        return bounded_reason(doc.get("reason"), default)

    def reply(self, doc: dict[str, Any], status: int = 200) -> None:
        self.set_status(status)
        self.set_header("content-type", "application/json")
        self.set_header("cache-control", "no-store")
        self.finish(json.dumps(doc))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        error = kwargs.get("exc_info", (None, None))[1]
        self.reply({"error": error.message if isinstance(error, ApprovalError) else self._reason},
                   status_code)


class ListHandler(_Handler):
    async def get(self) -> None:
        self.reply({"approvals": [p.summary() for p in await self.api.addon.listing()]})


class ShowHandler(_Handler):
    async def get(self, approval_id: str) -> None:
        self.reply((await self.api.addon.find(approval_id)).summary())


class ApproveHandler(_Handler):
    async def post(self, approval_id: str) -> None:
        doc = self.body()
        grant = grant_duration(doc.get("for"))
        pending = await self.api.addon.approve(approval_id, self.approver,
                                               self.reason(doc, "approved"), grant)
        self.reply(pending.summary())


class DenyHandler(_Handler):
    async def post(self, approval_id: str) -> None:
        reason = self.reason(self.body())
        if not reason:
            raise ApprovalError(400, "a denial needs a reason (it is shown to the requester)")
        self.reply((await self.api.addon.deny(approval_id, self.approver, reason)).summary())


class StatusHandler(_Handler):
    async def prepare(self) -> None:
        pass  # the URL is the capability (checked in get)

    async def get(self, approval_id: str, key: str) -> None:
        try:
            expected = await self.api.status_key(approval_id)
        except StoreUnavailable as e:
            raise ApprovalError(503, f"{e}; retry shortly") from None
        if not hmac.compare_digest(key, expected):
            raise ApprovalError(404, f"no approval request {approval_id}")
        p = await self.api.addon.find(approval_id)
        self.reply({"id": p.id, "status": p.status, "upstream": p.upstream, "subject": p.subject,
                    "expires_at": p.expires_at, "reason": p.reason if p.decided_at else None})


class AdminAPI:
    def __init__(self, addon: Approvals, settings: ApprovalSettings, verifier: TokenVerifier):
        self.addon, self.settings, self.verifier = addon, settings, verifier
        self.server: tornado.httpserver.HTTPServer | None = None
        self.port: int | None = None
        self._status_secret = secrets.token_bytes(32)  # status links last as long as the process
        # with a shared store: the fleet's key, so a link answers on every replica
        self.shared_secret: Callable[[], Awaitable[bytes]] | None = None
        self.pages: list[Any] = []  # more routes on the same server (the inbox)
        self.app_settings: dict[str, Any] = {}

    async def status_key(self, approval_id: str) -> str:
        if self.shared_secret is not None:  # read once; StoreUnavailable until it is
            self._status_secret = await self.shared_secret()
            self.shared_secret = None
        return hmac.new(self._status_secret, approval_id.encode(), hashlib.sha256).hexdigest()[:32]

    def approver(self, identity: Identity) -> Identity:
        """`identity` if it may decide approval requests (an approver group), else refused."""
        if not set(identity.groups) & set(self.settings.approver_groups):
            self.addon.audit_refusal(identity, None, "not in an approver group")
            raise ApprovalError(403, f"{identity.user} is not an approver (needs one of the "
                                f"groups {', '.join(self.settings.approver_groups)})")
        return identity

    async def status_url(self, approval_id: str) -> str:
        base = self.settings.base_url(self.port)
        return f"{base}/status/{approval_id}/{await self.status_key(approval_id)}"

    def start(self) -> None:
        app = tornado.web.Application([
            (r"/approvals/?", ListHandler, {"api": self}),
            (rf"/approvals/{ID}", ShowHandler, {"api": self}),
            (rf"/approvals/{ID}/approve", ApproveHandler, {"api": self}),
            (rf"/approvals/{ID}/deny", DenyHandler, {"api": self}),
            (rf"/status/{ID}/([0-9a-f]{{32}})", StatusHandler, {"api": self}),
            *self.pages,
        ], **self.app_settings)
        sockets = tornado.netutil.bind_sockets(self.settings.port, self.settings.host)
        self.port = sockets[0].getsockname()[1]
        self.server = tornado.httpserver.HTTPServer(app, xheaders=False, **SERVER_LIMITS)
        self.server.add_sockets(sockets)
        logger.info("douane: approvals API serving on http://%s:%d", self.settings.host,
                    self.port)

    def stop(self) -> None:
        if self.server:
            self.server.stop()
            self.server = None
