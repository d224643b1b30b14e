"""Unmasked originals for auditors only, sealed with their RSA public key beside the recording.

Off unless `recording.originals.public_key` names the auditors' PEM public key. For every flow in
which douane masked something, the request body before request-side masking and the response body
before response masking (for a stream, the bytes as they came from the upstream) are sealed: a
fresh Fernet key per flow encrypts them and is itself wrapped with RSA-OAEP (SHA-256). The gateway
holds only the public key: it can write originals, never read them back. One JSON line per flow is
appended to `<session>.originals` next to `<session>.mitm`; `douane sessions reveal` opens one with
the private key. Flows where nothing was masked keep no original: their recording is the original.
"""

from __future__ import annotations

import base64
import json
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.fernet import Fernet
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from mitmproxy import http

from douane.flowstate import peek
from douane.protocols import streams
from douane.settings import Settings

OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
SUFFIX = ".originals"


@dataclass
class Original:
    request: bytes | None = None
    response: bytes | None = None
    chunks: list[bytes] = field(default_factory=list)  # a stream, as the upstream sent it

    def payload(self) -> dict[str, str | None]:
        response = b"".join(self.chunks) if self.chunks else self.response
        return {"request": _b64(self.request), "response": _b64(response)}


_originals: weakref.WeakKeyDictionary[http.HTTPFlow, Original] = weakref.WeakKeyDictionary()


def take(flow: http.HTTPFlow) -> Original | None:
    return _originals.pop(flow, None)


def public_key(pem: bytes) -> rsa.RSAPublicKey:
    """The auditors' key; ValueError unless it is an RSA public key of at least 2048 bits."""
    if b"PRIVATE KEY" in pem:
        raise ValueError("this is a private key: the gateway must hold only the auditors' "
                         "public key")
    expected = "expected an RSA public key of at least 2048 bits (PEM)"
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, UnsupportedAlgorithm):
        raise ValueError(expected) from None
    if not isinstance(key, rsa.RSAPublicKey) or key.key_size < 2048:
        raise ValueError(expected)
    return key


def seal(key: rsa.RSAPublicKey, flow_id: str, decision_id: str | None,
         original: Original) -> bytes:
    """One line of a `.originals` file."""
    fernet_key = Fernet.generate_key()
    token = Fernet(fernet_key).encrypt(json.dumps(original.payload()).encode())
    record = {"flow_id": flow_id, "decision_id": decision_id,
              "key": _b64(key.encrypt(fernet_key, OAEP)), "data": token.decode()}
    return json.dumps(record).encode() + b"\n"


def find(path: Path, flow_id: str) -> dict[str, Any] | None:
    """The sealed record of a flow; a torn last line (a crash mid-write) is skipped."""
    if not path.exists():
        return None
    with path.open("rb") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("flow_id") == flow_id:
                return record
    return None


def unseal(key: rsa.RSAPrivateKey, record: dict[str, Any]) -> Original:
    """ValueError when `key` is not the one the record was sealed for."""
    fernet_key = key.decrypt(base64.b64decode(record["key"]), OAEP)
    payload = json.loads(Fernet(fernet_key).decrypt(record["data"].encode()))
    return Original(*(base64.b64decode(payload[k]) if payload[k] is not None else None
                      for k in ("request", "response")))


def _b64(data: bytes | None) -> str | None:
    return base64.b64encode(data).decode() if data is not None else None


class KeepOriginals:
    """Captures bodies before masking touches them. Runs just before `Mask` (`addons/gateway.py`);
    does nothing (masking's hot path is untouched) unless originals are configured."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.enabled = False

    def configure(self, updated: set[str]) -> None:
        recording = self.settings.config.sections.get("recording")
        self.enabled = recording is not None and recording.originals_key is not None

    def request(self, flow: http.HTTPFlow) -> None:
        st = peek(flow)
        if not self.enabled or flow.response or not flow.live or st is None \
                or st.interaction is None:
            return
        _originals[flow] = Original(request=flow.request.raw_content)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        original = _originals.get(flow) if self.enabled else None
        rewriter = streams.rewriter_of(flow)
        if original is None or rewriter is None or not flow.response \
                or flow.response.stream is not rewriter:
            return

        def tee(data: bytes) -> Any:
            original.chunks.append(data)
            return rewriter(data)

        flow.response.stream = tee

    def response(self, flow: http.HTTPFlow) -> None:
        original = _originals.get(flow) if self.enabled else None
        if original is not None and flow.response and streams.rewriter_of(flow) is None:
            original.response = flow.response.raw_content
