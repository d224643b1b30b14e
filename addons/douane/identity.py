"""Who is calling: every flow is authenticated before anything else looks at it.

Where a token can come from ("identity headers"):
- `Proxy-Authorization` (regular proxy mode): Basic with the JWT as password, as
  `HTTPS_PROXY=http://user:JWT@host:port` sends it on CONNECT, or Bearer. Identity established at
  CONNECT applies to every flow inside that tunnel.
- `Authorization: Bearer JWT` (reverse mode, MCP, OpenAI SDK with the token as api_key).
- `x-api-key: JWT` (Anthropic SDK with the token as api_key).
- Trusted headers from an auth proxy in front, honoured only from configured source addresses and
  stripped from every other request.
A refusal is a 401 (407 for proxy auth) in the target API's shape; the request never goes upstream.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
import time
import weakref

from mitmproxy import connection, http
from mitmproxy.proxy.mode_specs import RegularMode

from douane import devissuer, headerfields
from douane.config import TrustedHeaders
from douane.flowstate import Identity, Reason, state
from douane.refusals import refuse
from douane.resource import challenge
from douane.settings import Settings
from douane.tokens import TokenError, TokenVerifier, looks_like_jwt

logger = logging.getLogger(__name__)


PROXY_AUTHORIZATION = b"proxy-authorization"


def _lower(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape").lower()  # as mitmproxy compares names


class Authenticate:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.verifier: TokenVerifier | None = None
        # identity established on CONNECT, for the flows inside that tunnel
        self.tunnels: weakref.WeakKeyDictionary[connection.Client, Identity] = \
            weakref.WeakKeyDictionary()
        self._prefetch: asyncio.Task[None] | None = None
        self._stripped: frozenset[bytes] = frozenset()  # the identity headers no request keeps

    def configure(self, updated: set[str]) -> None:
        trusted = self.settings.config.identity.trusted_headers
        self._stripped = frozenset({*map(_lower, trusted.names()), PROXY_AUTHORIZATION})
        if "douane_config" not in updated and self.verifier is not None:
            return
        identity = self.settings.config.identity
        dev_key = None
        if identity.dev_issuer:
            dev_key = devissuer.public_jwk(identity.dev_issuer)
            logger.warning("douane: the LOCAL DEV ISSUER is enabled (%s): tokens minted with "
                           "`douane token` are accepted. Turn identity.dev_issuer off outside "
                           "local development.", identity.dev_issuer.issuer)
        self.verifier = TokenVerifier(identity, dev_key)

    def running(self) -> None:
        # Fetch the issuers' keys early so the first request does not wait for the IdP.
        if self.verifier and self.verifier.keysets:
            self._prefetch = asyncio.get_running_loop().create_task(self._fetch_keys())

    async def _fetch_keys(self) -> None:
        assert self.verifier
        await asyncio.gather(*(k.refresh() for k in self.verifier.keysets.values()))

    async def http_connect(self, flow: http.HTTPFlow) -> None:
        if flow.response or not flow.live:
            return
        header = flow.request.headers.pop("proxy-authorization", None)
        if header is None:
            self._refuse(flow, TokenError("missing", "proxy authentication required: use "
                                          "http://user:TOKEN@host:port as the proxy URL"), proxy=True)
            return
        identity = await self._from_proxy_authorization(flow, header)
        if identity:
            self.tunnels[flow.client_conn] = identity
            state(flow).identity = identity

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        st = state(flow)
        config = self.settings.config.identity.trusted_headers
        # one pass: the trusted headers (stripped from everyone) and Proxy-Authorization
        taken = headerfields.pop(flow.request.headers, self._stripped)
        trusted = self._trusted_header_identity(flow, config, taken)
        proxy_auth = taken.get(PROXY_AUTHORIZATION)
        tunnel = self.tunnels.get(flow.client_conn) if self.tunnels else None  # (a weak ref per get)
        if tunnel is not None:
            if tunnel.expires_at is not None and tunnel.expires_at < time.time():
                self._refuse(flow, TokenError("expired", "the token given on CONNECT has expired; "
                                              "reconnect with a fresh token"))
                return
            st.identity = tunnel
        elif proxy_auth is not None:
            st.identity = await self._from_proxy_authorization(flow, proxy_auth)
        elif trusted is not None:
            st.identity = trusted
        else:
            st.identity = await self._from_request_headers(flow)

    async def _from_proxy_authorization(self, flow: http.HTTPFlow, header: str) -> Identity | None:
        scheme, _, value = header.partition(" ")
        token = value.strip()
        if scheme.lower() == "basic":
            try:
                token = base64.b64decode(token, validate=True).decode().partition(":")[2]
            except (ValueError, UnicodeDecodeError):
                token = ""
        elif scheme.lower() != "bearer":
            token = ""
        return await self._verify(flow, token, "proxy-authorization", proxy=True)

    async def _from_request_headers(self, flow: http.HTTPFlow) -> Identity | None:
        headers = flow.request.headers
        auth = headerfields.get(headers, b"authorization", "")
        token, source = (auth[7:].strip(), "bearer") if auth[:7].lower() == "bearer " else \
            (headerfields.get(headers, b"x-api-key", "").strip(), "x-api-key")
        # Through a regular proxy, SDKs still send a placeholder api key: ask for proxy auth.
        in_proxy = isinstance(flow.client_conn.proxy_mode, RegularMode)
        if not token or (in_proxy and not looks_like_jwt(token)):
            self._refuse(flow, TokenError("missing", "authentication required: send an OIDC "
                                          "access token as a Bearer token (or as the proxy "
                                          "password)"), proxy=in_proxy)
            return None
        return await self._verify(flow, token, source)

    async def _verify(self, flow: http.HTTPFlow, token: str, source: str,
                      proxy: bool = False) -> Identity | None:
        assert self.verifier
        if not looks_like_jwt(token):
            error = TokenError("not_a_token", "douane expects an OIDC access token (a JWT), "
                                              "not a provider API key or password")
            self._refuse(flow, error, proxy)
            return None
        try:
            return await self.verifier.verify(token, source)
        except TokenError as e:
            self._refuse(flow, e, proxy)
            return None

    @staticmethod
    def _trusted_header_identity(flow: http.HTTPFlow, config: TrustedHeaders,
                                 taken: dict[bytes, str]) -> Identity | None:
        if not config.sources:  # (none honoured: spares the lookups below)
            return None
        values = {name: taken.get(_lower(name)) for name in config.names()}
        user = values[config.user] or values[config.email]
        if not user:
            return None
        peer = ipaddress.ip_address(flow.client_conn.peername[0])
        if not any(peer in net for net in config.sources):
            logger.warning("douane: ignored identity headers from untrusted address %s", peer)
            return None
        groups = tuple(g.strip() for g in (values[config.groups] or "").split(",") if g.strip())
        return Identity(user=user, groups=groups, issuer="trusted-header", subject=user,
                        source="header")

    def _refuse(self, flow: http.HTTPFlow, error: TokenError, proxy: bool = False) -> None:
        if proxy:
            headers = {"proxy-authenticate": 'Basic realm="douane"'}
        else:
            description = error.message.replace('"', "'")
            # an MCP client finds its authorization server from resource_metadata
            headers = {"www-authenticate": f'Bearer realm="douane"'
                                          f'{challenge(flow, state(flow).upstream)}, '
                                          f'error="invalid_token", '
                                          f'error_description="{description}"'}
        refuse(flow, 407 if proxy else 401, error.message, f"identity_{error.code}",
               Reason(f"identity.{error.code}", error.message), headers=headers)
