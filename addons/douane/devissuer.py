"""A local token issuer for development only: `douane token alice --groups engineering`.

Its RSA key is generated on first use into the state dir (mode 0600, never committed). The gateway
accepts its tokens only when the config sets `identity.dev_issuer.enabled: true`, and says so loudly.
"""

from __future__ import annotations

import base64
import time
import uuid
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jose import jwt

from douane.config import DevIssuer
from douane.statefile import create_once

KID = "douane-dev"


def _new_key() -> bytes:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())


def _private_key(key_file: Path) -> rsa.RSAPrivateKey:
    loaded = serialization.load_pem_private_key(create_once(key_file, _new_key), password=None)
    assert isinstance(loaded, rsa.RSAPrivateKey), f"{key_file} does not hold an RSA key"
    return loaded


def public_jwk(dev: DevIssuer) -> dict[str, Any]:
    numbers = _private_key(dev.key_file).public_key().public_numbers()

    def b64(n: int) -> str:
        return base64.urlsafe_b64encode(n.to_bytes((n.bit_length() + 7) // 8, "big")) \
            .rstrip(b"=").decode()

    return {"kty": "RSA", "kid": KID, "alg": "RS256", "use": "sig",
            "n": b64(numbers.n), "e": b64(numbers.e)}


def mint(dev: DevIssuer, user: str, groups: list[str], ttl_seconds: int) -> str:
    key = _private_key(dev.key_file)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    now = int(time.time())
    claims = {"iss": dev.issuer, "aud": dev.audience, "sub": user, "groups": groups,
              "iat": now, "exp": now + ttl_seconds, "jti": uuid.uuid4().hex}
    return jwt.encode(claims, pem.decode(), algorithm="RS256", headers={"kid": KID})
