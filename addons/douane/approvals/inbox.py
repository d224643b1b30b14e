"""The approver inbox: a small web page on the approvals API's server, for people.

    GET  /inbox                    the pending approval requests, their previews and reasons
    GET  /inbox/login              authorization code + PKCE at the configured issuer
    GET  /inbox/callback           the issuer's answer: the access token is verified exactly like
                                   an API bearer token, then only the identity is kept
    POST /inbox/ID/approve         form: for (empty: this request only), reason
    POST /inbox/ID/deny            form: reason (required)
    POST /inbox/logout

The session is a signed cookie (HttpOnly, Secure, SameSite=Strict) holding the approver's
identity as verified at login (user, groups) until the access token's expiry, at most
`SESSION_SECONDS`; never a token. Its key lives as long as the process: a restart logs everyone
out. Forms carry tornado's XSRF token; pages forbid framing and load nothing. Decisions go through
`AdminAPI.approver` and `Approvals.approve`/`deny`, the API's own path (approver groups,
no self-approval, the audit record naming the approver).
"""

from __future__ import annotations

import hmac
import json
import logging
import secrets
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx
import tornado.template
import tornado.web
from authlib.integrations.base_client.errors import OAuthError
from authlib.integrations.httpx_client import AsyncOAuth2Client

from douane.approvals.api import ID, ApprovalError, bounded_reason, grant_duration
from douane.approvals.config import Inbox as InboxSettings
from douane.flowstate import Identity
from douane.login import MAX_METADATA, TIMEOUT
from douane.tokens import TokenError

if TYPE_CHECKING:
    from douane.approvals.api import AdminAPI

logger = logging.getLogger(__name__)
SESSION, LOGIN = "douane_inbox", "douane_inbox_login"
SESSION_SECONDS = 8 * 3600  # the longest session, whatever the token's lifetime
LOGIN_SECONDS = 600  # the person has this long at the issuer
DURATIONS = (("", "this request only"), ("15m", "15 minutes"), ("1h", "1 hour"),
             ("8h", "8 hours"), ("1d", "1 day"), ("7d", "7 days"))

PAGE = tornado.template.Template("""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>douane approvals</title>
{% if refresh %}<meta http-equiv="refresh" content="0; url={{ root }}/inbox">{% end %}
<style nonce="{{ nonce }}">
body { font-family: sans-serif; max-width: 60em; margin: 1em auto; padding: 0 1em; }
.preview { white-space: pre-wrap; background: #f3f3f3; padding: .4em; overflow-wrap: anywhere; }
.error { color: #a00; } section { border-top: 1px solid #ccc; padding: .5em 0; }
</style></head><body>
<h1>douane approvals</h1>
{% if error %}<p class="error" id="error">{{ error }}</p>{% end %}
{% if notice %}<p id="notice">{{ notice }}</p>{% end %}
{% if approver is None %}
<p><a id="login" href="{{ root }}/inbox/login">Log in</a> at {{ issuer }} as an approver.</p>
{% else %}
<form method="post" action="{{ root }}/inbox/logout">{% raw xsrf %}
<p>Logged in as <b id="approver">{{ approver.user }}</b> <button id="logout">Log out</button></p>
</form>
{% if refresh %}<p><a id="continue" href="{{ root }}/inbox">Open the inbox</a></p>{% end %}
{% if approvals is not None and not approvals %}<p id="empty">No pending approval requests.</p>{% end %}
{% for a in approvals or () %}
<section class="approval" id="{{ a.id }}">
<h2>{{ a.id }}</h2>
<p><b>{{ a.requester.user }}</b> ({{ ", ".join(a.requester.groups) }}) &rarr;
{{ a.upstream }} ({{ a.protocol }} {{ a.operation }}) {{ a.subject }}{% if a.model and a.model != a.subject %},
model {{ a.model }}{% end %}; risk {{ a.risk }}; open for {{ max(0, int(a.expires_at - now)) }} s
more ({{ a.mode }} mode)</p>
<ul class="reasons">{% for r in a.reasons %}<li>{{ r.get("rule") }}{% if r.get("field") %}
({{ r["field"] }}){% end %}: {{ r.get("message") }}</li>{% end %}</ul>
{% for p in a.preview %}<p><i>{{ p.get("kind") }} {{ p.get("where") }}{% if p.get("flagged") %}
flagged by {{ p["flagged"] }}{% end %}{% if p.get("note") %} ({{ p["note"] }}){% end %}</i></p>
<div class="preview">{{ p.get("text") }}</div>{% end %}
<form method="post" action="{{ root }}/inbox/{{ a.id }}/approve">{% raw xsrf %}
<select name="for">{% for value, label in durations %}<option value="{{ value }}">{{ label }}</option>{% end %}</select>
<input name="reason" maxlength="{{ reason_chars }}" placeholder="reason (optional)">
<button class="approve">Approve</button></form>
<form method="post" action="{{ root }}/inbox/{{ a.id }}/deny">{% raw xsrf %}
<input name="reason" maxlength="{{ reason_chars }}" required placeholder="reason (shown to the requester)">
<button class="deny">Deny</button></form>
</section>
{% end %}
{% end %}
</body></html>
""")


class Inbox:
    def __init__(self, api: AdminAPI, settings: InboxSettings) -> None:
        self.api, self.settings = api, settings
        self._metadata: dict[str, Any] | None = None

    def mount(self) -> None:
        """Add the inbox's routes and cookie settings to the API's server."""
        self.api.pages += [(rf"/inbox/{name}", handler, {"inbox": self}) for name, handler in (
            ("?", PageHandler), ("login", LoginHandler), ("callback", CallbackHandler),
            (f"{ID}/(approve|deny)", DecideHandler), ("logout", LogoutHandler))]
        self.api.app_settings.update(
            cookie_secret=secrets.token_hex(32), xsrf_cookies=True,
            xsrf_cookie_kwargs={"httponly": True, "secure": True, "samesite": "Strict"})

    @property
    def base(self) -> str:
        return self.api.settings.base_url(self.api.port)

    def client(self) -> AsyncOAuth2Client:
        secret = self.settings.client_secret
        return AsyncOAuth2Client(
            client_id=self.settings.client_id, client_secret=secret,
            token_endpoint_auth_method="client_secret_basic" if secret else "none",
            scope=" ".join(dict.fromkeys(("openid", *self.settings.scopes))),
            redirect_uri=self.base + "/inbox/callback", code_challenge_method="S256",
            timeout=TIMEOUT)

    async def endpoint(self, name: str) -> str:
        if self._metadata is None:
            url = self.settings.issuer.rstrip("/") + "/.well-known/openid-configuration"
            async with httpx.AsyncClient(timeout=TIMEOUT) as http:
                resp = await http.get(url)
            meta = resp.json() if resp.status_code == 200 and len(resp.content) <= MAX_METADATA \
                else None
            if not isinstance(meta, dict) or meta.get("issuer") != self.settings.issuer:
                raise ApprovalError(502, f"{url} is not this issuer's discovery document")
            self._metadata = meta
        url = self._metadata.get(name)
        if not isinstance(url, str):
            raise ApprovalError(502, f"{self.settings.issuer} has no {name}")
        return url


class _Page(tornado.web.RequestHandler):
    nonce: str
    listed: list[Any] | None = None  # the open requests, read before the page is rendered
    _unlisted: str | None = None  # why they could not be read

    def initialize(self, inbox: Inbox) -> None:
        self.inbox = inbox
        self.api = inbox.api

    def set_default_headers(self) -> None:
        self.nonce = secrets.token_urlsafe(16)
        self.set_header("content-security-policy",
                        f"default-src 'none'; style-src 'nonce-{self.nonce}'; form-action "
                        "'self'; frame-ancestors 'none'; base-uri 'none'")
        self.set_header("x-frame-options", "DENY")
        self.set_header("x-content-type-options", "nosniff")
        self.set_header("referrer-policy", "same-origin")  # no-referrer would null Origin
        self.set_header("cache-control", "no-store")

    def check_xsrf_cookie(self) -> None:
        """Tornado's token, and the form's Origin: another port of the same host is same-site
        (the Strict cookie goes along) and can plant a known `_xsrf` cookie."""
        super().check_xsrf_cookie()
        base = urlsplit(self.inbox.base)
        if self.request.headers.get("origin") != f"{base.scheme}://{base.netloc}":
            raise ApprovalError(403, "a form from another origin")

    def get_current_user(self) -> Identity | None:
        raw = self.get_signed_cookie(SESSION, max_age_days=SESSION_SECONDS / 86400)
        try:
            doc = json.loads(raw) if raw else None
        except ValueError:
            return None
        if not isinstance(doc, dict) or not doc.get("exp", 0) > time.time():
            return None
        return Identity(doc["user"], tuple(doc["groups"]), doc["issuer"], doc["subject"],
                        "inbox", int(doc["exp"]))

    def page(self, status: int = 200, **values: Any) -> None:
        values.setdefault("approver", self.current_user)
        values.setdefault("approvals", None)
        self.set_status(status)
        self.set_header("content-type", "text/html; charset=utf-8")
        self.finish(PAGE.generate(
            nonce=self.nonce, root=urlsplit(self.inbox.base).path, xsrf=self.xsrf_form_html(),
            issuer=self.inbox.settings.issuer, durations=DURATIONS, now=time.time(),
            reason_chars=1000, error=values.pop("error", None), notice=values.pop("notice", None),
            refresh=values.pop("refresh", False), **values))

    async def list_open(self) -> None:
        try:
            self.listed = sorted(await self.api.addon.listing(), key=lambda p: p.created_at)
        except ApprovalError as e:  # the shared store is down: the page says so
            self.listed, self._unlisted = [], e.message

    def inbox_page(self, approver: Identity, status: int = 200, **values: Any) -> None:
        if self._unlisted and "error" not in values:
            values["error"] = self._unlisted
        self.page(status, approver=approver, approvals=self.listed or [], **values)

    def approver(self) -> Identity:
        user = self.current_user
        if user is None:
            raise ApprovalError(401, "log in first")
        return self.api.approver(user)  # the API's check: an approver group

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        error = kwargs.get("exc_info", (None, None))[1]
        message = error.message if isinstance(error, ApprovalError) else self._reason
        user = self.current_user
        if user and set(user.groups) & set(self.api.settings.approver_groups):
            self.inbox_page(user, status_code, error=message)  # e.g. their own request
        else:
            self.page(status_code, approver=None, error=message)


class PageHandler(_Page):
    async def get(self) -> None:
        if self.current_user is None:
            self.page()  # a link, not a redirect: a cross-site arrival lacks the Strict cookie
        else:
            approver = self.approver()
            await self.list_open()
            self.inbox_page(approver)


class LoginHandler(_Page):
    async def get(self) -> None:
        state, verifier = secrets.token_urlsafe(32), secrets.token_urlsafe(64)
        endpoint = await self.inbox.endpoint("authorization_endpoint")
        async with self.inbox.client() as client:
            url, _ = client.create_authorization_url(endpoint, state=state, code_verifier=verifier,
                                                     resource=self.inbox.settings.resource)
        # Lax, not Strict: it must come back with the issuer's (cross-site) redirect
        self.set_signed_cookie(LOGIN, json.dumps({"state": state, "verifier": verifier,
                                                  "exp": time.time() + LOGIN_SECONDS}),
                               expires_days=None, httponly=True, secure=True, samesite="Lax",
                               path=urlsplit(self.inbox.base).path + "/inbox/callback")
        self.redirect(url)


class CallbackHandler(_Page):
    async def get(self) -> None:
        path = urlsplit(self.inbox.base).path + "/inbox/callback"
        raw = self.get_signed_cookie(LOGIN, max_age_days=LOGIN_SECONDS / 86400)
        self.clear_cookie(LOGIN, path=path)
        login = json.loads(raw) if raw else {}
        if not login or login["exp"] < time.time() or not hmac.compare_digest(
                self.get_query_argument("state", ""), login["state"]):
            raise ApprovalError(400, "this login answer does not match a login started here: "
                                "log in again")
        if self.get_query_argument("iss", self.inbox.settings.issuer) != \
                self.inbox.settings.issuer:
            raise ApprovalError(400, "the login answer comes from another issuer (iss)")
        code = self.get_query_argument("code", "")
        if not code:
            raise ApprovalError(401, "the issuer refused the login")
        endpoint = await self.inbox.endpoint("token_endpoint")
        try:
            async with self.inbox.client() as client:
                token = await client.fetch_token(endpoint, code=code,
                                                 code_verifier=login["verifier"],
                                                 resource=self.inbox.settings.resource)
            identity = await self.api.verifier.verify(str(token.get("access_token")), "bearer")
        except (OAuthError, httpx.HTTPError) as e:
            raise ApprovalError(502, f"the issuer did not answer the login "
                                f"({type(e).__name__})") from None
        except TokenError as e:
            raise ApprovalError(401, e.message) from None
        approver = self.api.approver(identity)
        expires = min(identity.expires_at or time.time() + 3600, time.time() + SESSION_SECONDS)
        self.set_signed_cookie(SESSION, json.dumps({
            "user": approver.user, "groups": list(approver.groups), "issuer": approver.issuer,
            "subject": approver.subject, "exp": expires}), expires_days=None, expires=expires,
            httponly=True, secure=True, samesite="Strict", path="/")
        self.api.addon.audit({"event": "approval.login", "approver": approver.user,
                              "approver_groups": list(approver.groups),
                              "issuer": approver.issuer, "session_expires_at": expires})
        # a page, not a redirect: after the issuer's cross-site redirect a browser would not
        # send the Strict cookie just set; a same-site refresh does
        self.page(approver=approver, refresh=True, notice="Logged in.")


class DecideHandler(_Page):
    async def post(self, approval_id: str, action: str) -> None:
        approver = self.approver()
        reason = self.get_body_argument("reason", "")
        await self.list_open()  # shown with an error too (write_error)
        if action == "approve":
            grant = grant_duration(self.get_body_argument("for", ""))
            pending = await self.api.addon.approve(approval_id, approver,
                                                   bounded_reason(reason, "approved"), grant)
        else:
            if not reason.strip():
                raise ApprovalError(400, "a denial needs a reason (it is shown to the requester)")
            pending = await self.api.addon.deny(approval_id, approver, bounded_reason(reason))
        await self.list_open()
        self.inbox_page(approver, notice=f"{pending.id} {pending.status}")


class LogoutHandler(_Page):
    def post(self) -> None:
        self.clear_cookie(SESSION, path="/")
        self.page(approver=None, notice="Logged out.")
