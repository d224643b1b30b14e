"""Self-service per-user secrets on the approvals API: a user sets, lists and deletes their own
secrets for `credentials.per_user` upstreams, authenticated with their own token (any user, not
only approvers; only their own entries; each change audited, never the secret). `douane
credentials` without `--user` calls these.

    GET    /credentials              -> {"credentials": [upstream, ...]}  (never a secret)
    PUT    /credentials/UPSTREAM     {"secret": "..."}
    DELETE /credentials/UPSTREAM
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from douane import usersecrets
from douane.approvals.api import ApprovalError, _Handler

if TYPE_CHECKING:
    from douane.approvals.api import AdminAPI
    from douane.settings import Settings

MAX_BODY = 32 * 1024


class CredentialsHandler(_Handler):
    def initialize(self, api: AdminAPI, settings: Settings) -> None:  # type: ignore[override]
        super().initialize(api)
        self.douane = settings

    async def prepare(self) -> None:
        self.user = (await self.caller()).user

    def _store(self, upstream: str | None) -> usersecrets.UserSecrets:
        config = self.douane.config
        if upstream is not None and not any(u.name == upstream and u.per_user
                                            for u in config.upstreams):
            raise ApprovalError(404, f"no upstream {upstream[:100]!r} takes a per-user credential")
        return usersecrets.store(config.state_dir, config.credentials_key)

    async def get(self, upstream: str | None = None) -> None:
        store = self._store(upstream)
        names = await asyncio.to_thread(
            lambda: [u for u, user in store.entries()
                     if user == self.user and upstream in (None, u)])
        self.reply({"credentials": names})

    async def put(self, upstream: str) -> None:
        if len(self.request.body) > MAX_BODY:
            raise ApprovalError(413, f"the body is over {MAX_BODY} bytes")
        secret = self.body().get("secret")
        if not isinstance(secret, str):
            raise ApprovalError(400, 'send {"secret": "..."}')
        store = self._store(upstream)
        try:
            await asyncio.to_thread(store.set, upstream, self.user, secret.strip())
        except ValueError as e:
            raise ApprovalError(400, str(e)) from None
        self.api.addon.audit({"event": "credential.set", "user": self.user, "upstream": upstream})
        self.reply({"upstream": upstream, "user": self.user, "set": True})

    async def delete(self, upstream: str) -> None:
        store = self._store(upstream)
        if not await asyncio.to_thread(store.delete, upstream, self.user):
            raise ApprovalError(404, f"you hold no credential for {upstream}")
        self.api.addon.audit({"event": "credential.deleted", "user": self.user,
                              "upstream": upstream})
        self.reply({"upstream": upstream, "user": self.user, "deleted": True})


def mount(api: AdminAPI, settings: Settings) -> None:
    api.pages += [(r"/credentials/?", CredentialsHandler, {"api": api, "settings": settings}),
                  (r"/credentials/([A-Za-z0-9_.-]{1,100})", CredentialsHandler,
                   {"api": api, "settings": settings})]
