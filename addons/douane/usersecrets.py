"""Per-user upstream secrets (`douane credentials set`), encrypted at rest in the state dir.

One file per (upstream, user), named by a digest of both (a user name never becomes a file name),
holding a Fernet token (AES-128-CBC + HMAC-SHA256) of the upstream, the user and the secret: a
file copied under another name decrypts to a pair that does not match and is ignored. The key is
`gateway.credentials_key` ({env:/file:}) or one generated once into the state dir. Files are
written whole (temporary file, then rename), mode 0600.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

from douane import statefile

MAX_SECRET = 16 * 1024  # a provider key or a personal access token, not a file


@functools.cache
def store(state_dir: Path, key: str | None) -> UserSecrets:
    """The store of a configuration (its key read once), shared by the gateway's addons."""
    return UserSecrets(state_dir, key)


class UserSecrets:
    def __init__(self, state_dir: Path, key: str | None = None):
        self.dir = state_dir / "user-credentials"
        key_bytes = key.encode() if key else statefile.create_once(
            state_dir / "user-credentials.key", Fernet.generate_key)
        self.fernet = Fernet(key_bytes.strip())

    def _file(self, upstream: str, user: str) -> Path:
        digest = hashlib.sha256(json.dumps([upstream, user]).encode()).hexdigest()
        return self.dir / f"{digest}.fernet"

    def get(self, upstream: str, user: str) -> str | None:
        try:
            token = self._file(upstream, user).read_bytes()
        except FileNotFoundError:
            return None
        entry = self._open(token)
        if entry is None or entry["upstream"] != upstream or entry["user"] != user:
            return None
        return entry["secret"]

    def set(self, upstream: str, user: str, secret: str) -> None:
        if not secret or len(secret) > MAX_SECRET or any(c in secret for c in "\r\n\0"):
            raise ValueError(f"a secret is one line of 1 to {MAX_SECRET} characters")
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        data = self.fernet.encrypt(json.dumps(
            {"upstream": upstream, "user": user, "secret": secret}).encode())
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".tmp-")  # mode 0600
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._file(upstream, user))
        except BaseException:
            os.unlink(tmp)
            raise

    def delete(self, upstream: str, user: str) -> bool:
        try:
            self._file(upstream, user).unlink()
            return True
        except FileNotFoundError:
            return False

    def entries(self) -> Iterator[tuple[str, str]]:
        """(upstream, user) of every secret held, never the secret."""
        for file in sorted(self.dir.glob("*.fernet")):
            entry = self._open(file.read_bytes())
            if entry is not None and file == self._file(entry["upstream"], entry["user"]):
                yield entry["upstream"], entry["user"]

    def _open(self, token: bytes) -> dict[str, str] | None:
        try:
            entry = json.loads(self.fernet.decrypt(token))
        except (InvalidToken, ValueError):
            return None  # another key's file, or not ours: never a credential
        return entry if isinstance(entry, dict) and all(
            isinstance(entry.get(k), str) for k in ("upstream", "user", "secret")) else None
