"""The `approvals:` config section. Without it, a "hold" decision is refused (403) as before.

```yaml
approvals:
  listen: 127.0.0.1:8181          # the admin API (approvers); loopback by default
  public_url: https://douane-admin.corp.example   # link in notifications; default the API's address
  approver_groups: [approvers]    # an approver's token must carry one of these groups
  database: approvals.sqlite3     # time-boxed grants; default <state_dir>/approvals.sqlite3
  max_grant: 7d                   # the longest `approve --for` allowed
  retry_window: 1h                # answer mode: how long an approval waits for the retry (and a denial answers it)
  protocols:                      # defaults per protocol (shown): mode hold | answer, timeout
    openai: {mode: hold, timeout: 5m}
    anthropic: {mode: hold, timeout: 5m}
    generic: {mode: hold, timeout: 5m}
    mcp: {mode: answer, timeout: 15m}   # MCP clients give up on a call after 60-120 s
  upstreams:                      # per upstream, over its protocol's defaults
    crm: {mode: hold, timeout: 45s}
  webhook:                        # a JSON POST per new approval request (Slack-compatible `text`)
    url: https://hooks.slack.com/services/T000/B000/XXXX   # or {env: NAME} / {file: PATH}
    retries: 3                    # attempts after the first, 0.5 s, 1 s, 2 s apart
    timeout: 5s
  inbox:                          # the approver inbox web page at <public_url>/inbox (OIDC login)
    client_id: douane-inbox       # its client at the issuer (redirect URI <public_url>/inbox/callback)
    client_secret: {env: DOUANE_INBOX_CLIENT_SECRET}   # optional: a confidential client
    issuer: https://idp.corp.example   # optional: default the first identity.issuers entry
```
`timeout` is how long an approval request stays open: in `hold` mode the client waits that long
(then gets a "timed out" refusal); in `answer` mode the client is refused at once with the approval
id and retries after an approver acted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from douane.config import PROTOCOLS, View

MODES = ("hold", "answer")
DEFAULTS = {"openai": ("hold", 300), "anthropic": ("hold", 300), "generic": ("hold", 300),
            "mcp": ("answer", 900)}
MCP_HOLD_TIMEOUT = 45  # an MCP hold shorter than the 60 s after which clients abandon a call


def seconds(text: str | int) -> int | None:
    """A duration: an integer of seconds, or 30s, 15m, 1h, 7d."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    m = re.fullmatch(r"\s*(\d+)\s*([smhd]?)\s*", str(text))
    return int(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)] \
        if m else None


def _duration(v: View, key: str, default: int) -> int:
    value = seconds(v.get(key, (int, str), default))
    if value is None or value <= 0:
        raise v.error("expected a positive duration such as 45s, 5m or 1h", key)
    return value


@dataclass(frozen=True)
class Wait:
    mode: str  # hold: the client waits; answer: refused at once with the approval id
    timeout: int  # seconds an approval request stays open


@dataclass(frozen=True)
class Webhook:
    url: str = field(repr=False)  # may carry a secret (Slack hook URLs do)
    retries: int
    timeout: int


@dataclass(frozen=True)
class Inbox:
    issuer: str
    client_id: str
    client_secret: str | None = field(repr=False)  # None: a public client (PKCE alone)
    resource: str  # what the access token is asked for (RFC 8707): a douane audience
    scopes: tuple[str, ...]


@dataclass(frozen=True)
class ApprovalSettings:
    host: str
    port: int
    public_url: str | None  # None: the API's own address
    approver_groups: tuple[str, ...]
    database: Path
    max_grant: int
    retry_window: int
    protocols: dict[str, Wait]
    upstreams: dict[str, Wait]
    webhook: Webhook | None
    inbox: Inbox | None = None

    def base_url(self, port: int | None) -> str:
        return (self.public_url or f"http://{self.host}:{port}").rstrip("/")

    def wait_for(self, upstream: str, protocol: str) -> Wait:
        return self.upstreams.get(upstream) or self.protocols[protocol]


def _wait(v: View, base: Wait) -> Wait:
    v.only("mode", "timeout")
    mode = v.get("mode", str, base.mode)
    if mode not in MODES:
        raise v.error("expected hold or answer", "mode")
    default = MCP_HOLD_TIMEOUT if (mode, base.mode) == ("hold", "answer") else base.timeout
    return Wait(mode, _duration(v, "timeout", default))


def parse(v: View) -> ApprovalSettings:
    v.only("listen", "public_url", "approver_groups", "database", "max_grant", "retry_window",
           "protocols", "upstreams", "webhook", "inbox")
    listen = v.get("listen", str, "127.0.0.1:8181")
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise v.error(f"expected HOST:PORT such as 127.0.0.1:8181, got {listen!r}", "listen")
    groups = v.strings("approver_groups")
    if not groups:
        raise v.error("name at least one approver group", "approver_groups")
    protocols = {p: Wait(*DEFAULTS[p]) for p in PROTOCOLS}
    for name, pv in v.named("protocols"):
        if name not in PROTOCOLS:
            raise pv.error(f"unknown protocol (expected one of: {', '.join(PROTOCOLS)})")
        protocols[name] = _wait(pv, protocols[name])
    declared = _declared_upstreams(v)
    upstreams = {}
    for name, uv in v.named("upstreams"):
        if name not in declared:
            raise uv.error("not a declared upstream")
        upstreams[name] = _wait(uv, protocols[declared[name]])
    webhook = None
    if "webhook" in v.data:
        wv = v.sub("webhook")
        wv.only("url", "retries", "timeout")
        raw = wv.data.get("url")
        url = wv.secret("url") if isinstance(raw, dict) else wv.get("url", str)
        if url is not None and not re.match(r"https?://", url):
            raise wv.error("expected an http(s) URL", "url")
        webhook = Webhook(url or "", wv.get("retries", int, 3), _duration(wv, "timeout", 5))
    state_dir = v.doc.resolve(v.doc.root().sub("gateway").get("state_dir", str, ".douane"))
    return ApprovalSettings(
        host=host.strip("[]"), port=int(port),
        public_url=(v.get("public_url", str, None) or "").rstrip("/") or None,
        approver_groups=groups,
        database=v.path_value("database", state_dir / "approvals.sqlite3"),
        max_grant=_duration(v, "max_grant", 7 * 86400),
        retry_window=_duration(v, "retry_window", 3600),
        protocols=protocols, upstreams=upstreams, webhook=webhook,
        inbox=_inbox(v.sub("inbox"), v.get("public_url", str, None), host.strip("[]"))
        if "inbox" in v.data else None)


def _inbox(v: View, public_url: str | None, host: str) -> Inbox:
    v.only("client_id", "client_secret", "issuer")
    # its session cookie is Secure: browsers keep it over https, or plain http on loopback only
    base = urlsplit(public_url) if public_url else None
    loopback = (base.hostname if base else host) in ("127.0.0.1", "::1", "localhost")
    if not (loopback or (base and base.scheme == "https")):
        raise v.error("the inbox needs approvals.public_url in https (or a loopback listen)")
    issuers = [i for i in v.doc.root().sub("identity").get("issuers", list, [])
               if isinstance(i, dict)]
    wanted = v.get("issuer", str, None)
    issuer = next((i for i in issuers if not wanted or i.get("issuer") == wanted), None)
    if issuer is None:
        raise v.error("not an identity.issuers entry" if wanted else
                      "the inbox logs approvers in at an identity.issuers entry: add one",
                      "issuer" if wanted else None)
    audiences = issuer.get("audience")
    resource = issuer.get("resource") or (audiences[0] if isinstance(audiences, list)
                                          and audiences else audiences)
    if not isinstance(resource, str):
        raise v.error(f"{issuer.get('issuer')} has no audience or resource to ask tokens for")
    scopes = issuer.get("scopes") or []
    return Inbox(issuer=str(issuer.get("issuer")), client_id=v.get("client_id", str),
                 client_secret=v.secret("client_secret"), resource=resource,
                 scopes=tuple(s for s in ([scopes] if isinstance(scopes, str) else scopes)
                              if isinstance(s, str)))


def _declared_upstreams(v: View) -> dict[str, str]:
    ups = v.doc.root().get("upstreams", dict, {})
    return {str(n): u.get("protocol") for n, u in ups.items() if isinstance(u, dict)}
