"""douane as the OAuth resource server of its MCP upstreams (RFC 9728, RFC 8707, MCP authorization).

MCP clients (the SDKs' OAuth helpers, IDEs, agents) find where to log in from the resource they
call, so nobody pastes a token:
- `GET /.well-known/oauth-protected-resource<path>` answers the upstream's protected-resource
  metadata: the resource identifier, the configured issuers as `authorization_servers`, the scopes;
- a 401 for an MCP upstream carries `WWW-Authenticate: Bearer resource_metadata="<absolute URL>"`
  and the scope to ask for (`identity.Authenticate` adds `challenge()`);
- `ResourceAccess` (after authentication): a token must name the resource in `aud` (a token issued
  for another resource is refused, 401) and carry the resource's scopes (403 `insufficient_scope`
  naming the scope needed, so the client steps up);
- on every MCP upstream, `Origin`, when a browser sends one, must be the one called, the
  resource's, or one the upstream lists in `origins` (403): a page on another site cannot drive an
  MCP endpoint (DNS rebinding).
The resource identifier is `resource.uri` when configured (recommended: it is what tokens are
issued for), else the URL the client called (scheme and `Host` of its request, the upstream's path).
"""

from __future__ import annotations

import json
from urllib.parse import urlsplit

from mitmproxy import http

from douane import headerfields
from douane.config import Upstream
from douane.flowstate import Reason, state
from douane.refusals import DECISION_HEADER, refuse
from douane.settings import Settings

WELL_KNOWN = "/.well-known/oauth-protected-resource"


def resource_uri(flow: http.HTTPFlow, upstream: Upstream) -> str:
    assert upstream.resource is not None
    if upstream.resource.uri:
        return upstream.resource.uri
    scheme = "https" if flow.client_conn.tls_established else "http"
    return f"{scheme}://{flow.request.host_header or flow.request.pretty_host}" \
           f"{upstream.path_prefix.rstrip('/')}"


def metadata_url(flow: http.HTTPFlow, upstream: Upstream) -> str:
    """The path-inserted well-known URL of the resource's metadata (RFC 9728 section 3.1)."""
    parts = urlsplit(resource_uri(flow, upstream))
    return f"{parts.scheme}://{parts.netloc}{WELL_KNOWN}{parts.path.rstrip('/')}"


def challenge(flow: http.HTTPFlow, upstream: Upstream | None) -> str:
    """The WWW-Authenticate parameters that send an MCP client to the metadata ("" if none)."""
    if upstream is None or upstream.resource is None:
        return ""
    out = f', resource_metadata="{metadata_url(flow, upstream)}"'
    if upstream.resource.scopes:
        out += f', scope="{" ".join(upstream.resource.scopes)}"'
    return out


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


class ProtectedResourceMetadata:
    """Before authentication: the metadata document, and the Origin check of MCP requests."""

    def __init__(self, settings: Settings):
        self.settings = settings

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        req = flow.request
        path = req.path.split("?")[0]
        if path.startswith(WELL_KNOWN):
            self._serve(flow, path[len(WELL_KNOWN):] or "/")
            return
        upstream = state(flow).upstream
        if upstream is None or upstream.protocol != "mcp":
            return
        origin = headerfields.get(req.headers, b"origin")
        if origin is None:
            return
        allowed = {_origin(f"{'https' if flow.client_conn.tls_established else 'http'}://"
                           f"{req.host_header or req.pretty_host}"), *upstream.origins}
        if upstream.resource is not None:
            allowed.add(_origin(resource_uri(flow, upstream)))
        if origin.lower() not in allowed:
            refuse(flow, 403, "this Origin may not call the MCP server", "origin_refused",
                   Reason("resource.origin", "Origin not allowed"))

    def _serve(self, flow: http.HTTPFlow, target: str) -> None:
        config = self.settings.config
        req = flow.request
        for upstream in config.upstreams:
            if upstream.resource is None or not upstream.matches(req.host.lower(), req.port,
                                                                  upstream.path_prefix):
                continue
            uri = resource_uri(flow, upstream)
            if urlsplit(uri).path.rstrip("/") != target.rstrip("/"):
                continue
            st = state(flow)
            st.upstream = upstream
            if req.method not in ("GET", "HEAD"):
                refuse(flow, 405, f"{req.method} is not allowed on resource metadata",
                       "method_not_allowed", Reason("resource.method", req.method))
                return
            doc = {"resource": uri,
                   "authorization_servers": [i.issuer for i in config.identity.issuers],
                   "bearer_methods_supported": ["header"],
                   "resource_name": upstream.name}
            if upstream.resource.scopes:
                doc["scopes_supported"] = list(upstream.resource.scopes)
            st.decide("allow", Reason("resource.metadata", f"metadata of {upstream.name}"))
            flow.response = http.Response.make(200, json.dumps(doc), {
                "content-type": "application/json", "cache-control": "max-age=300",
                DECISION_HEADER: st.decision_id})
            return


class ResourceAccess:
    """After authentication: the token was issued for this resource and carries its scopes; a
    token issued only for MCP resources (every audience of it douane accepts is a resource's
    `uri`) opens those resources alone, not the model APIs or another MCP server (RFC 8707: the
    token an MCP client obtained for one server is no token for the rest of the gateway)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._config: object = None
        self._general: dict[str, frozenset[str]] = {}  # issuer -> its audiences not a resource's

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        st = state(flow)
        upstream, identity = st.upstream, st.identity
        if upstream is None or identity is None \
                or identity.source == "header":  # an auth proxy in front vouches, no token
            return
        if upstream.resource is None or not upstream.resource.audience:
            general = self._general_audiences().get(identity.issuer)
            if general is not None and not any(a in general for a in identity.audiences):
                refuse(flow, 401, "the token was issued for an MCP resource, not for this "
                       "upstream: use a token issued for the gateway", "identity_wrong_resource",
                       Reason("identity.wrong_resource",
                              "the token's aud names only MCP resources, not this upstream"),
                       headers={"www-authenticate": 'Bearer realm="douane", error="invalid_token"'})
                return
            if upstream.resource is None:
                return
        uri = resource_uri(flow, upstream)
        params = f'Bearer realm="douane"{challenge(flow, upstream)}'
        if upstream.resource.audience and uri not in identity.audiences:
            refuse(flow, 401, f"the token was not issued for this resource ({uri}): ask the "
                   "authorization server for a token with this resource", "identity_wrong_resource",
                   Reason("identity.wrong_resource", "the token's aud does not name the resource"),
                   headers={"www-authenticate": f'{params}, error="invalid_token"'})
            return
        missing = [s for s in upstream.resource.scopes if s not in identity.scopes]
        if missing:
            refuse(flow, 403, f"the token lacks the scope {' '.join(missing)}",
                   "insufficient_scope", Reason("identity.insufficient_scope",
                                                f"missing scope {' '.join(missing)}"),
                   headers={"www-authenticate": f'{params}, error="insufficient_scope"'})

    def _general_audiences(self) -> dict[str, frozenset[str]]:
        """Per issuer that accepts a resource's URI as audience, the audiences it accepts that
        are no resource's (an issuer naming none is absent: every token of it is general)."""
        config = self.settings.config
        if config is not self._config:
            resources = {u.resource.uri for u in config.upstreams
                         if u.resource and u.resource.audience and u.resource.uri}
            self._general = {i.issuer: frozenset(i.audiences) - resources
                             for i in config.identity.issuers if resources & set(i.audiences)}
            self._config = config
        return self._general
