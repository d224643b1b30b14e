"""A real OIDC-style token issuer for tests: RSA keys, discovery document and JWKS over HTTP."""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jose import jwt

AUDIENCE = "douane-tests"


def _b64(n: int) -> str:
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class SigningKey:
    def __init__(self) -> None:
        self.kid = uuid.uuid4().hex[:12]
        self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.private_pem = self.private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()).decode()
        self.public_pem = self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()

    def jwk(self) -> dict[str, str]:
        numbers = self.private.public_key().public_numbers()
        return {"kty": "RSA", "kid": self.kid, "use": "sig", "alg": "RS256",
                "n": _b64(numbers.n), "e": _b64(numbers.e)}


class TestIssuer:
    """Serves `/.well-known/openid-configuration` and `/jwks` on 127.0.0.1; mints tokens."""

    __test__ = False  # not a pytest test class

    def __init__(self, audience: str = AUDIENCE) -> None:
        self.audience = audience
        self.keys = [SigningKey()]
        self.jwks_fetches = 0
        self.down = False  # when True, the JWKS endpoint answers 503
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/.well-known/openid-configuration":
                    body = {"issuer": issuer.url, "jwks_uri": issuer.url + "/jwks",
                            "id_token_signing_alg_values_supported": ["RS256"]}
                elif self.path == "/jwks":
                    issuer.jwks_fetches += 1
                    if issuer.down:
                        self.send_response(503)
                        self.end_headers()
                        return
                    body = {"keys": [k.jwk() for k in issuer.keys]}
                else:
                    self.send_response(404)
                    self.end_headers()
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def key(self) -> SigningKey:
        return self.keys[-1]

    def claims(self, user: str, groups: list[str] | None = None, **overrides: Any) -> dict:
        now = int(time.time())
        claims = {"iss": self.url, "aud": self.audience, "sub": f"sub-{user}", "email": user,
                  "groups": groups or [], "iat": now, "nbf": now, "exp": now + 600}
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def mint(self, user: str, groups: list[str] | None = None, *, key: SigningKey | None = None,
             headers: dict[str, Any] | None = None, **overrides: Any) -> str:
        """A signed RS256 token; pass a claim as None to leave it out."""
        key = key or self.key
        return jwt.encode(self.claims(user, groups, **overrides), key.private_pem,
                          algorithm="RS256", headers={"kid": key.kid, **(headers or {})})

    def rotate(self, keep_old: bool = False) -> SigningKey:
        """Publish a new key (new kid), dropping the old one unless asked to keep it."""
        new = SigningKey()
        self.keys = [*self.keys, new] if keep_old else [new]
        return new

    def config(self, **extra: Any) -> dict[str, Any]:
        """The `identity.issuers` entry that accepts this issuer's tokens."""
        return {"issuer": self.url, "audience": self.audience, **extra}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
