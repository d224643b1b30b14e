"""Which upstream a flow is for, what operation it is, and the credential douane injects for it.

`Route` normalises the request target (`douane.operations`) and matches every flow against the
declared upstreams (host, port, path prefix) before authentication, so even a refusal is shaped
like the target API. A routed flow is sent upstream in origin form, on the normalised path, with
a Host header naming the routed upstream: the upstream sees exactly what the audit records.
`Broker` runs after authentication: it refuses ambiguous paths (400), flows no upstream declares
(unless their host is pass-through) and operations no parser reads and no grant names
(default-deny), strips every client credential and chooses the upstream credential: the user's own
secret for an upstream acting on the user's behalf (`credentials.per_user`; a user without one is
refused, told how to set it), else the one of the first of the caller's groups the upstream lists
(`credentials.by_group`), else the upstream's `credential`. `InjectCredential`, the request's last
step, adds it: a request held for an approver, shown in mitmweb or refused on the way never carries
it. Clients hold no provider key.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

from mitmproxy import http

from douane import forwarding, headerfields, operations, protocols, upstreamerrors, usersecrets
from douane.config import Credential, Upstream
from douane.flowstate import Reason, state
from douane.interaction import Interaction
from douane.policy import engine
from douane.policy.model import Policy
from douane.protocols import decoding, streams
from douane.refusals import refuse
from douane.settings import Settings
from douane.untrusted import loggable, quoted

logger = logging.getLogger(__name__)

# the client's credentials, and the headers choosing what the org's key acts on (OpenAI's
# organization and project: a user key reaches every one its owner may): douane chooses both
# (on a model's upstream a client's organization or project is refused: `douane.forwarding`)
CLIENT_CREDENTIAL_HEADERS = frozenset({b"authorization", b"x-api-key", b"proxy-authorization",
                                       b"openai-organization", b"openai-project"})
METHOD_OVERRIDES = frozenset(h.encode() for h in operations.METHOD_OVERRIDES)
# What an MCP server needs of a request: its framing and the Streamable HTTP transport's headers
# (the 2026-07-28 metadata ones, `Mcp-Param-*` too, must match the body: `mcp.check_headers`).
# Anything else a client sends (a cookie, a custom x-* header, a user agent) is text no rule reads,
# handed to the server beside the org's credential: dropped. douane adds its own after this.
MCP_HEADERS = frozenset({b"host", b"content-length", b"transfer-encoding", b"content-encoding",
                         b"content-type", b"accept", b"mcp-session-id", b"mcp-protocol-version",
                         b"mcp-method", b"mcp-name", b"last-event-id"})
MCP_PARAM_HEADER = protocols.mcp.PARAM_HEADER.encode()
# of a host and path a refusal quotes back (`untrusted.quoted`): a name is longer than a value
HOST_CHARS = 120
DEFAULT_PORTS = {"http": 80, "https": 443}  # a Host header names no port of these


class Route:
    def __init__(self, settings: Settings):
        self.settings = settings

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        req = flow.request
        config = self.settings.config
        host = req.host.lower()
        st = state(flow)
        try:
            target = operations.normalize_target(req.path)
        except operations.PathError:
            # refused by Broker once the caller is known, in the shape of the upstream the raw
            # path (or else the host) points at; a host only pass-through is left be
            st.upstream = config.upstream_for(host, req.port, req.path.split("?")[0]) or next(
                (u for u in config.upstreams if u.matches(host, req.port, u.path_prefix)), None)
            return
        st.upstream = config.upstream_for(host, req.port, target.split("?")[0])
        if st.upstream is None:
            return  # pass-through or refused by Broker once the caller is known
        # Reverse mode forwards an absolute-form request line as is; the Host header a client
        # sends inside a tunnel, too. The upstream sees the target douane routed and audits.
        host_header = req.host if DEFAULT_PORTS.get(req.scheme) == req.port else \
            f"{req.host}:{req.port}"  # (as `url.hostport`)
        if req.is_http2 or req.is_http3:
            req.host_header = host_header
        else:
            if req.data.authority:
                req.authority = b""
            if headerfields.get(req.headers, b"host") != host_header:
                headerfields.put(req.headers, "Host", host_header)  # as `req.host_header =`
        if target != req.path:
            req.path = target
        if not req.data.method.isupper():
            req.method = req.method  # upper case, as matched


class Broker:
    def __init__(self, settings: Settings,
                 policy: Callable[[], Policy | None] = lambda: None):
        self.settings = settings
        self.policy = policy  # the policy in force, for grants naming operations

    def http_connect(self, flow: http.HTTPFlow) -> None:
        """Refuse tunnels to hosts douane does not govern before any TLS is set up."""
        if flow.response or not flow.live:
            return
        config = self.settings.config
        host, port = flow.request.host.lower(), flow.request.port
        if not any(u.matches(host, port, u.path_prefix) for u in config.upstreams) \
                and not config.passthrough(host):
            shown = quoted(f"{host}:{port}", HOST_CHARS)
            refuse(flow, 403, f"no upstream is declared for {shown}", "undeclared_upstream",
                   Reason("route.undeclared", f"CONNECT to undeclared {shown}"))

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        st = state(flow)
        upstream = st.upstream
        if upstream is None:
            host = flow.request.host.lower()
            if self.settings.config.passthrough(host):
                st.decide("allow", Reason("route.passthrough", f"{host} is pass-through"))
                return
            target = f"{host}:{flow.request.port}{flow.request.path.split('?')[0]}"
            refuse(flow, 403, f"no upstream is declared for {quoted(target, HOST_CHARS)}",
                   "undeclared_upstream",
                   Reason("route.undeclared", "no declared upstream matches"))
            return
        try:
            operations.normalize_target(flow.request.path)  # Route sent on what it normalised
        except operations.PathError as e:
            refuse(flow, 400, f"{e}; send a plain path", "ambiguous_path",
                   Reason("route.path", str(e)))
            return
        overrides = headerfields.present(flow.request.headers, METHOD_OVERRIDES)
        if overrides:
            override = overrides[0].decode()
            refuse(flow, 400, f"the {override} header would make this request another operation "
                   "upstream", "method_override", Reason("route.method_override", override))
            return
        if upstream.protocol == "mcp" and "?" in flow.request.path:
            # no MCP request has a query; the server would read one no rule reads
            refuse(flow, 400, f"an MCP request to {upstream.name} carries no query string",
                   "query_refused", Reason("route.query", "a query string on an MCP request"))
            return
        dropped: set[bytes] = set()
        if upstream.protocol == "generic":
            screened = self._screened_generic(flow, upstream)
            if screened is None:
                return
            dropped = screened
            if dropped:
                state(flow).dropped_headers = forwarding.dropped_names(dropped)
        elif upstream.protocol in forwarding.FORWARDED:
            screened = self._screened(flow, upstream)
            if screened is None:
                return
            dropped = screened
            forwarding.own_idempotency_key(flow.request.headers, st.identity.user
                                           if (st := state(flow)).identity else None)
        if not self._operation_allowed(flow):
            return
        headerfields.pop(flow.request.headers, CLIENT_CREDENTIAL_HEADERS | dropped)
        if upstream.protocol == "mcp":
            forwarding.keep(flow.request.headers, MCP_HEADERS, MCP_PARAM_HEADER)
            if name := forwarding.folded(flow.request.headers):
                refuse(flow, 403, f"the {name} header is refused: its value is folded over "
                       "several lines", "header_refused", Reason(
                           "route.header", f"{name}: its value is folded over several lines",
                           f"headers.{name}"))
                return
        if protocols.is_websocket(flow.request):
            # no permessage-deflate: mitmproxy inflates a message whole, unbounded, before any
            # hook (a client's deflate bomb)
            headerfields.pop(flow.request.headers, (b"sec-websocket-extensions",))
        if not self._choose_credential(flow, upstream):
            return
        if upstream.connect_to:
            # A stand-in serves this upstream: decided and recorded as the declared upstream,
            # sent to the stand-in with the Host the client asked for.
            host_header = flow.request.host_header
            flow.request.scheme, flow.request.host, flow.request.port = upstream.connect_to
            flow.request.host_header = host_header

    def _screened(self, flow: http.HTTPFlow, upstream: Upstream) -> set[bytes] | None:
        """A model API's query holds only the parameters its operation documents, and no header
        changes the account the org's key bills or turns on a feature nobody granted: the
        headers to drop (no provider reads them), or None once refused."""
        req = flow.request
        path, _, query = req.path.partition("?")
        problem = forwarding.query_problem(upstream.protocol, req.method, path, query)
        if problem:
            refuse(flow, 400, f"{problem}; douane passes only the parameters an operation "
                   "documents", "query_refused", Reason("route.query", problem, "query"))
            return None
        if query and (problem := forwarding.query_secret(query)):  # goes on to the provider
            refuse(flow, 403, f"{problem}: refused", "query_refused",
                   Reason("route.query", problem, "query"))
            return None
        refused, dropped = forwarding.screen(upstream.protocol, req.headers)
        if refused:
            name, why = refused
            refuse(flow, 403, f"the {name} header is refused: {why}", "header_refused",
                   Reason("route.header", f"{name}: {why}", f"headers.{name}"))
            return None
        header = forwarding.BETA_HEADER[upstream.protocol]
        if forwarding.betas(req.headers, header) and \
                (self.policy() is None or state(flow).identity is None):  # no grant to read
            name = header.decode()
            refuse(flow, 403, f"{name} is refused: no policy grants a beta feature",
                   "header_refused", Reason("route.header", f"{name}: no policy grants a beta "
                                            "feature", f"headers.{name}"))
            return None
        return dropped

    def _screened_generic(self, flow: http.HTTPFlow, upstream: Upstream) -> set[bytes] | None:
        """A generic upstream gets the parameters and headers its `forward:` lists, no secret in
        their values: the headers to drop, or None once refused."""
        req = flow.request
        query = req.path.partition("?")[2]
        if problem := forwarding.generic_query_problem(query, upstream.forward_query):
            refuse(flow, 400, f"{problem}; douane passes only the query parameters the operator "
                   "listed", "query_refused", Reason("route.query", problem, "query"))
            return None
        if problem := forwarding.query_secret(query):
            refuse(flow, 403, f"{problem}: refused", "query_refused",
                   Reason("route.query", problem, "query"))
            return None
        refused, dropped = forwarding.generic_screen(req.headers, upstream.forward_headers,
                                                     protocols.is_websocket(req))
        if refused:
            name, why = refused
            refuse(flow, 403, f"the {name} header is refused: {why}", "header_refused",
                   Reason("route.header", f"{name}: {why}", f"headers.{name}"))
            return None
        return dropped

    def _choose_credential(self, flow: http.HTTPFlow, upstream: Upstream) -> bool:
        st = state(flow)
        groups = st.identity.groups if st.identity else ()
        if upstream.per_user:
            user = st.identity.user if st.identity else None
            config = self.settings.config
            store = usersecrets.store(config.state_dir, config.credentials_key)
            secret = store.get(upstream.name, user) if user else None
            if secret is None:
                shown = loggable(user or "your user name", 100)
                refuse(flow, 403, f"upstream {upstream.name} acts on your behalf and needs your "
                       f"own credential, which douane does not hold for {shown}: set it with "
                       f"`douane credentials set {upstream.name}` (your token, through the "
                       f"approvals API) or have the operator run `douane credentials set "
                       f"{upstream.name} --user {shown}` on the gateway host",
                       "user_credential_missing",
                       Reason("route.no_user_credential",
                              f"no per-user credential for {upstream.name}"))
                return False
            header, fmt = upstream.per_user
            st.credential = Credential(header, fmt.replace("{secret}", secret), "per-user secret",
                                       secret=secret)
            return True
        credential = next((c for group, c in upstream.group_credentials if group in groups),
                          upstream.credential)
        if credential is not None and credential.value is None:
            refuse(flow, 503, f"upstream {upstream.name} has no credential configured "
                   f"({credential.source})", "upstream_credential_missing",
                   Reason("route.no_credential", f"{credential.source} is not set"))
            return False
        st.credential = credential
        return True

    def _operation_allowed(self, flow: http.HTTPFlow) -> bool:
        """Default-deny: what no parser reads passes only when a grant names it (refused here,
        before the credential is injected)."""
        st, req = state(flow), flow.request
        assert st.upstream
        method, path = req.method, req.path.split("?")[0]
        if protocols.is_websocket(req):
            if not st.upstream.allow_websocket:
                refuse(flow, 403, f"WebSocket connections to {st.upstream.name} are not allowed",
                       "websocket_refused", Reason("protocol.websocket", "WebSocket upgrade refused"))
                return False
            masking = self.settings.config.sections.get("masking")
            if masking and st.identity and not set(st.identity.groups) & set(
                    masking.exempt_groups):
                # masking does not read WebSocket messages: its answers would leave unmasked
                refuse(flow, 403, f"WebSocket connections to {st.upstream.name} are not allowed "
                       "while douane masks answers (it does not mask WebSocket messages)",
                       "websocket_refused", Reason("protocol.websocket_unmasked",
                                                   "WebSocket upgrade refused: masking applies"))
                return False
            if protocols.declared(st.upstream, method, path, websocket=True):
                return True
        elif protocols.declared(st.upstream, method, path):
            return True
        policy = self.policy()
        grant = engine.granting_operation(policy, st.identity, st.upstream.name, method, path) \
            if policy and st.identity else None
        operation = f"{method} {path}"[:200]
        if grant is None:
            st.interaction = Interaction(st.upstream.protocol, operation)  # for the audit record
            refuse(flow, 403, f"douane does not govern {quoted(operation, HOST_CHARS)} on "
                   f"{st.upstream.name} and no "
                   "grant names it", "endpoint_not_governed",
                   Reason("route.operation", f"{operation} is not declared nor granted",
                          "operation"))
            return False
        st.granted_operation = True
        st.decide("allow", Reason("grant.operation", f"{operation} is granted by {grant.source}",
                                  "operation"))
        return True

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self._forget_credential(flow)
        st = state(flow)
        status = flow.response.status_code if flow.response else 0
        if st.credential and flow.response and _echoes(st.credential, b"\n".join(
                v for _, v in flow.response.headers.fields)):
            _refuse_echo(flow, "a header")
        elif protocols.is_websocket(flow.request) and st.upstream and status not in (0, 101) and \
                status < 400:
            # an upgrade passes on any path: answered as a plain GET, it would be an operation
            # nobody granted (`/v1/conversations/{id}`, an admin listing) with the org's key
            refuse(flow, 502, f"{st.upstream.name} answered a WebSocket upgrade without "
                   "upgrading", "websocket_not_upgraded",
                   Reason("protocol.websocket_not_upgraded", f"the upstream answered {status}"))
        elif st.upstream and (why := upstreamerrors.unframed(flow)):
            refuse(flow, 502, f"{st.upstream.name}: {why}", "upstream_unframed",
                   Reason("upstream.unframed", why))

    def streamheaders(self, flow: http.HTTPFlow) -> None:
        """A stream (once `Inspect` rewrites it) is checked for the credential sent as its events
        pass (`streams.EchoGuard`): the one that holds it, and all after, never leave; the stream
        ends with the API's error event, and the decision says why."""
        st = state(flow)
        rewriter = streams.rewriter_of(flow)
        if st.credential and st.credential.secret and rewriter is not None:
            streams.guard_echo(rewriter, st.credential.secret,
                               lambda where: _stream_echo(flow, rewriter, where))

    def response(self, flow: http.HTTPFlow) -> None:
        """An answer whose body holds the credential sent (an upstream echoing its request: an
        error message quoting the key, an echo service) is refused: the caller would hold the
        org's key. Read decoded (after `Inspect.response`, which decodes what it reads), bounded;
        a stream has gone out already (its events are the upstream's, rewritten)."""
        st = state(flow)
        if not st.credential or not flow.response or flow.response.stream or \
                (st.decision and st.decision.action in ("refuse", "block", "error")):
            return
        body = flow.response.raw_content or b""
        encoding = headerfields.get(flow.response.headers, b"content-encoding", "identity")
        if encoding.strip().lower() not in ("", "identity"):
            try:
                body = decoding.decode(body, encoding,
                                       self.settings.config.limits.answer_size_limit)
            except (decoding.TooLarge, ValueError):
                _refuse_echo(flow, "a body that cannot be decoded to be checked for it")
                return
        if _echoes(st.credential, body):
            _refuse_echo(flow, "its body")

    def error(self, flow: http.HTTPFlow) -> None:
        self._forget_credential(flow)

    @staticmethod
    def _forget_credential(flow: http.HTTPFlow) -> None:
        # The credential has been sent; drop it so no later view of the flow (mitmweb, a
        # recording, a replay) holds it.
        st = state(flow)
        if st.credential and flow.request:
            headerfields.pop(flow.request.headers, (st.credential.header.lower().encode(),))


def _echoes(credential: Credential, data: bytes) -> bool:
    """`data` holds the credential, as is or in a form a client decodes back
    (`streams.EchoForms`: base64, hex, percent, JSON escapes, across lines)."""
    secret = credential.secret
    if not secret:
        return False
    if secret.encode("utf-8", "surrogateescape") in data:
        return True
    # (Latin-1: every byte one character, so an ASCII form reads the same in any text)
    return _forms(secret).within(data.decode("latin-1")) if secret.isascii() else False


@functools.lru_cache(maxsize=64)
def _forms(secret: str) -> streams.EchoForms:
    return streams.EchoForms.of(secret)


def _refuse_echo(flow: http.HTTPFlow, where: str) -> None:
    name = state(flow).upstream.name if state(flow).upstream else "the upstream"
    refuse(flow, 502, f"{name} answered with the credential douane sent it; the answer is "
           "withheld", "upstream_credential_echo",
           Reason("upstream.credential_echo", f"the upstream's answer holds its credential in "
                  f"{where}"))


def _stream_echo(flow: http.HTTPFlow, rewriter: streams.StreamRewriter, where: str) -> None:
    st = state(flow)
    name = st.upstream.name if st.upstream else "the upstream"
    st.decide("refuse", Reason("upstream.credential_echo", f"the upstream's stream holds its "
                               f"credential in {where}"), status=502)
    rewriter.abort(f"{name} answered with the credential douane sent it; the rest of the "
                   "answer is withheld", 502)


class InjectCredential:
    """The upstream credential, added when every other step has let the request go."""

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        forwarding.frame_body(flow.request)
        st = state(flow)
        if st.upstream is not None and st.credential is not None and st.credential.value:
            headerfields.put(flow.request.headers, st.credential.header, st.credential.value)
            for name, value in st.credential.headers:
                headerfields.put(flow.request.headers, name, value)
