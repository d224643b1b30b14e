"""Which upstream a flow is for, and the credential douane injects for it.

`Route` matches every flow against the declared upstreams (host, port, path prefix) before
authentication, so even a refusal is shaped like the target API. `Broker` runs after
authentication: it refuses flows no upstream declares (unless their host is pass-through) and
strips every client credential. `InjectCredential`, the request's last step, adds the upstream
credential douane holds: a request held for an approver, shown in mitmweb or refused on the way
never carries it. Clients hold no provider key.
"""

from __future__ import annotations

import logging

from mitmproxy import http

from douane.flowstate import Reason, state
from douane.refusals import guarded, refuse
from douane.settings import Settings

logger = logging.getLogger(__name__)

CLIENT_CREDENTIAL_HEADERS = ("authorization", "x-api-key", "proxy-authorization")


class Route:
    def __init__(self, settings: Settings):
        self.settings = settings

    @guarded
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        req = flow.request
        state(flow).upstream = self.settings.config.upstream_for(req.host.lower(), req.port,
                                                                 req.path.split("?")[0])


class Broker:
    def __init__(self, settings: Settings):
        self.settings = settings

    @guarded
    def http_connect(self, flow: http.HTTPFlow) -> None:
        """Refuse tunnels to hosts douane does not govern before any TLS is set up."""
        if flow.response or not flow.live:
            return
        config = self.settings.config
        host, port = flow.request.host.lower(), flow.request.port
        if not any(u.matches(host, port, u.path_prefix) for u in config.upstreams) \
                and not config.passthrough(host):
            refuse(flow, 403, f"no upstream is declared for {host}:{port}", "undeclared_upstream",
                   Reason("route.undeclared", f"CONNECT to undeclared {host}:{port}"))

    @guarded
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
            refuse(flow, 403, f"no upstream is declared for {host}:{flow.request.port}"
                   f"{flow.request.path.split('?')[0]}", "undeclared_upstream",
                   Reason("route.undeclared", "no declared upstream matches"))
            return
        for name in CLIENT_CREDENTIAL_HEADERS:
            flow.request.headers.pop(name, None)
        credential = upstream.credential
        if credential is not None and credential.value is None:
            refuse(flow, 503, f"upstream {upstream.name} has no credential configured "
                   f"({credential.source})", "upstream_credential_missing",
                   Reason("route.no_credential", f"{credential.source} is not set"))
            return
        if upstream.connect_to:
            # A stand-in serves this upstream: decided and recorded as the declared upstream,
            # sent to the stand-in with the Host the client asked for.
            host_header = flow.request.host_header
            flow.request.scheme, flow.request.host, flow.request.port = upstream.connect_to
            flow.request.host_header = host_header

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self._forget_credential(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._forget_credential(flow)

    @staticmethod
    def _forget_credential(flow: http.HTTPFlow) -> None:
        # The credential has been sent; drop it so no later view of the flow (mitmweb, a
        # recording, a replay) holds it.
        st = state(flow)
        if st.upstream and st.upstream.credential and flow.request:
            flow.request.headers.pop(st.upstream.credential.header, None)


class InjectCredential:
    """The upstream credential, added when every other step has let the request go."""

    @guarded
    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        upstream = state(flow).upstream
        if upstream is not None and upstream.credential is not None:
            flow.request.headers[upstream.credential.header] = upstream.credential.value
