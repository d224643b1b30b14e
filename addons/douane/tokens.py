"""OIDC access-token (JWT) verification against issuers' JWKS, with python-jose.

Checks, in order, before any claim is trusted: compact JWS form (JWE refused), header algorithm on
the issuer's asymmetric allow-list (never `none`, never HS*), no key-carrying headers (`jku`, `x5u`,
`jwk`, `x5c`: keys only ever come from the configured JWKS), known issuer, signature with the key of
that `kid`, then `exp` (required), `nbf` and `iat` when present, and audience, all with a small leeway.

A token whose signature verified is remembered for `VERIFIED_CACHE_SECONDS` (its time claims are
checked again on every use), so a client sending the same token on every request does not pay an
RSA verification each time (~0.6 ms of event-loop time); a key removed from the JWKS therefore
stops accepting its tokens at most that long after the refresh.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
import urllib.request
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any

from jose import jwk, jws
from jose.exceptions import JOSEError

from douane.config import DevIssuer, IdentityConfig, Issuer
from douane.flowstate import Identity

logger = logging.getLogger(__name__)

MAX_TOKEN_BYTES = 16 * 1024
KEY_HEADERS = ("jku", "x5u", "jwk", "x5c")
VERIFIED_CACHE_SECONDS = 60
VERIFIED_CACHE_SIZE = 4096


class TokenError(Exception):
    """A token was refused; `code` is a stable rule id suffix, the message is safe to show."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def looks_like_jwt(value: str) -> bool:
    return value.count(".") in (2, 4) and len(value) > 20


def _segment(part: str, what: str) -> dict[str, Any]:
    try:
        raw = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise TokenError("malformed", f"the token's {what} is not base64url JSON") from None
    if not isinstance(doc, dict):
        raise TokenError("malformed", f"the token's {what} is not a JSON object")
    return doc


@dataclass
class KeySet:
    """One issuer's JWKS: fetched on demand, refreshed on an unknown kid at most every
    `refresh_seconds`, and kept when the IdP is down."""

    issuer: Issuer
    refresh_seconds: int
    timeout_seconds: int
    keys: dict[str, dict[str, Any]] = field(default_factory=dict)
    fetched_at: float = float("-inf")
    _jwks_uri: str | None = None
    _inflight: asyncio.Future[None] | None = None

    async def key_for(self, kid: str | None, alg: str) -> dict[str, Any]:
        key = self._find(kid, alg)
        stale = time.monotonic() - self.fetched_at >= self.refresh_seconds
        if key is None and (stale or self._inflight is not None):
            await self.refresh()
            key = self._find(kid, alg)
        if key is None:
            if not self.keys:
                raise TokenError("jwks_unavailable",
                                 "the identity provider's signing keys cannot be fetched")
            raise TokenError("unknown_key", "the token was signed with an unknown key")
        return key

    def _find(self, kid: str | None, alg: str) -> dict[str, Any] | None:
        if kid is not None:
            return self.keys.get(kid)
        kty = "EC" if alg.startswith("ES") else "RSA"
        candidates = [k for k in self.keys.values() if k.get("kty") == kty]
        return candidates[0] if len(candidates) == 1 else None

    async def refresh(self) -> None:
        # One fetch at a time per issuer: concurrent requests with a new kid share it.
        if self._inflight is None:
            self._inflight = asyncio.ensure_future(self._fetch())
        inflight = self._inflight
        try:
            await asyncio.shield(inflight)
        finally:
            if self._inflight is inflight and inflight.done():
                self._inflight = None

    async def _fetch(self) -> None:
        self.fetched_at = time.monotonic()
        try:
            if self._jwks_uri is None:
                self._jwks_uri = self.issuer.jwks_uri or (await asyncio.to_thread(
                    self._get, self.issuer.issuer.rstrip("/") + "/.well-known/openid-configuration"
                ))["jwks_uri"]
            doc = await asyncio.to_thread(self._get, self._jwks_uri)
            keys = {k.get("kid", f"#{i}"): k for i, k in enumerate(doc["keys"])
                    if isinstance(k, dict) and k.get("use", "sig") == "sig"}
        except Exception as e:  # the IdP is down or answers garbage: keep the last good keys
            logger.warning("douane: cannot refresh keys of issuer %s: %s (keeping %d cached)",
                           self.issuer.issuer, e, len(self.keys))
            return
        self.keys = keys
        logger.info("douane: %d signing key(s) for issuer %s", len(keys), self.issuer.issuer)

    def _get(self, url: str) -> dict[str, Any]:
        with urllib.request.urlopen(url, timeout=self.timeout_seconds) as resp:
            return json.loads(resp.read(1024 * 1024))


class TokenVerifier:
    def __init__(self, identity: IdentityConfig, dev_public_jwk: dict[str, Any] | None = None):
        self.identity = identity
        self.keysets = {i.issuer: KeySet(i, identity.jwks_refresh_seconds,
                                         identity.jwks_timeout_seconds) for i in identity.issuers}
        self.dev = identity.dev_issuer
        self.dev_key = dev_public_jwk
        # token -> (claims, issuer, when its signature was verified, the identity they make)
        self._verified: OrderedDict[str, tuple[dict[str, Any], Issuer, float, Identity]] = \
            OrderedDict()

    async def verify(self, token: str, source: str) -> Identity:
        cached = self._verified.get(token)
        if cached and time.monotonic() - cached[2] < VERIFIED_CACHE_SECONDS:
            claims, _, _, identity = cached
            self._check_times(claims)  # (the rest of its claims do not change with the clock)
            return identity if identity.source == source else replace(identity, source=source)
        if len(token) > MAX_TOKEN_BYTES:
            raise TokenError("oversized", "the token is too large")
        parts = token.split(".")
        if len(parts) == 5:
            raise TokenError("jwe", "encrypted tokens (JWE) are not accepted")
        if len(parts) != 3 or not all(parts):
            raise TokenError("malformed", "the token is not a signed JWT")
        header, claims = _segment(parts[0], "header"), _segment(parts[1], "payload")
        alg = header.get("alg")
        if any(h in header for h in KEY_HEADERS):
            raise TokenError("key_header", "tokens carrying their own key reference are refused")
        if "crit" in header:
            raise TokenError("crit_header", "tokens with critical header extensions are refused")
        issuer_name = claims.get("iss")
        if not isinstance(issuer_name, str):
            raise TokenError("no_issuer", "the token names no issuer")

        if self.dev is not None and issuer_name == self.dev.issuer:
            issuer, key = self._dev_issuer(self.dev), self.dev_key
            self._check_alg(alg, issuer)
        else:
            keyset = self.keysets.get(issuer_name)
            if keyset is None:
                raise TokenError("unknown_issuer", "the token's issuer is not trusted")
            issuer = keyset.issuer
            self._check_alg(alg, issuer)
            key = await keyset.key_for(header.get("kid"), alg)
        if key is None:
            raise TokenError("unknown_key", "the token was signed with an unknown key")
        try:
            jws.verify(token, jwk.construct(key, alg), algorithms=[alg])
        except (JOSEError, ValueError, TypeError):
            raise TokenError("bad_signature", "the token's signature is invalid") from None
        self._check_claims(claims, issuer)
        identity = self._identity(claims, issuer, source)
        self._verified[token] = (claims, issuer, time.monotonic(), identity)
        if len(self._verified) > VERIFIED_CACHE_SIZE:
            self._verified.popitem(last=False)
        return identity

    def _check_times(self, claims: dict[str, Any]) -> None:
        """The claims that expire with the clock, of claims whose types `_check_claims` checked."""
        now, leeway = time.time(), self.identity.leeway_seconds
        if claims["exp"] < now - leeway:
            raise TokenError("expired", "the token has expired")
        nbf, iat = claims.get("nbf"), claims.get("iat")
        if nbf is not None and nbf > now + leeway:
            raise TokenError("not_yet_valid", "the token is not valid yet (nbf)")
        if iat is not None and iat > now + leeway:
            raise TokenError("issued_in_future", "the token was issued in the future (iat)")

    @staticmethod
    def _dev_issuer(dev: DevIssuer) -> Issuer:
        return Issuer(dev.issuer, (dev.audience,), None, ("RS256",), "sub", "groups")

    @staticmethod
    def _check_alg(alg: Any, issuer: Issuer) -> None:
        if not isinstance(alg, str) or alg not in issuer.algorithms:
            raise TokenError("bad_algorithm", f"the token's algorithm {str(alg)[:10]!r} is not "
                                              f"allowed (allowed: {', '.join(issuer.algorithms)})")

    def _check_claims(self, claims: dict[str, Any], issuer: Issuer) -> None:
        def number(name: str) -> float | None:
            value = claims.get(name)
            if value is None:
                return None
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise TokenError("malformed", f"the token's {name} claim is not a number")
            return value

        exp, _, _ = number("exp"), number("nbf"), number("iat")  # each a number if present
        if exp is None:
            raise TokenError("no_expiry", "the token has no expiry (exp)")
        self._check_times(claims)
        aud = claims.get("aud")
        auds = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        if not set(auds) & set(issuer.audiences):
            raise TokenError("wrong_audience", "the token is not meant for this gateway (aud)")

    @staticmethod
    def _identity(claims: dict[str, Any], issuer: Issuer, source: str) -> Identity:
        user = claims.get(issuer.user_claim)
        if not isinstance(user, str) or not user:
            raise TokenError("no_user", f"the token has no {issuer.user_claim} claim")
        groups: Any = claims
        for part in issuer.groups_claim.split("."):
            groups = groups.get(part) if isinstance(groups, dict) else None
        if isinstance(groups, str):
            groups = groups.replace(",", " ").split()
        groups = tuple(str(g) for g in groups) if isinstance(groups, list) else ()
        exp = claims.get("exp")
        aud = claims.get("aud")
        scope = claims.get("scope", claims.get("scp", ""))
        return Identity(user=user, groups=groups, issuer=issuer.issuer,
                        subject=str(claims.get("sub", "")), source=source,
                        expires_at=int(exp) if isinstance(exp, int | float) else None,
                        audiences=tuple(str(a) for a in ([aud] if isinstance(aud, str) else
                                                         aud if isinstance(aud, list) else [])),
                        scopes=tuple(str(s) for s in (scope.split() if isinstance(scope, str) else
                                                      scope if isinstance(scope, list) else [])))
