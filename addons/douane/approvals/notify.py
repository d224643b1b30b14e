"""The webhook: one JSON POST per new approval request, sent and retried on a thread.

The body has a Slack-compatible `text` plus the request's details, a link and the command to
approve. Every outcome is audited (`approval.notified` or `approval.notify_failed`) and a failure
is logged: a notification is never lost silently.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from douane.approvals.config import Webhook
from douane.approvals.store import Pending

logger = logging.getLogger(__name__)
BACKOFF = (0.5, 1.0, 2.0)


def message(pending: Pending, public_url: str) -> dict[str, Any]:
    reasons = "; ".join(r.get("message", r.get("rule", "")) for r in pending.reasons) or "policy"
    link = f"{public_url}/approvals/{pending.id}"
    command = f"douane approvals approve {pending.id}"
    wait = "is waiting" if pending.mode == "hold" else "will retry after approval"
    text = (f"douane: {pending.requester.user} asks to use {pending.subject} on {pending.upstream} "
            f"({pending.operation}, risk {pending.risk:g}: {reasons}). The client {wait}; "
            f"open {link} or run `{command} [--for 1h]` (deny: `douane approvals deny "
            f"{pending.id} --reason ...`). Expires in {int(pending.expires_at - time.time())} s.")
    return {"text": text, "approval_id": pending.id, "url": link, "approve_command": command,
            "approval": {k: v for k, v in pending.summary().items() if k != "preview"}}


class Notifier:
    def __init__(self, webhook: Webhook, audit: Callable[[dict[str, Any]], None]):
        self.webhook, self.audit = webhook, audit

    def notify(self, pending: Pending, public_url: str) -> threading.Thread:
        body = json.dumps(message(pending, public_url)).encode()
        thread = threading.Thread(target=self._send, args=(pending.id, pending.decision_id, body),
                                  name="douane-webhook", daemon=True)
        thread.start()
        return thread

    def _send(self, approval_id: str, decision_id: str, body: bytes) -> None:
        attempts = 1 + max(0, self.webhook.retries)
        error = ""
        for attempt in range(attempts):
            try:
                request = urllib.request.Request(self.webhook.url, body, method="POST", headers={
                    "content-type": "application/json", "user-agent": "douane-approvals"})
                with urllib.request.urlopen(request, timeout=self.webhook.timeout) as resp:
                    resp.read(65536)
                self.audit({"event": "approval.notified", "approval_id": approval_id,
                            "decision_id": decision_id, "attempts": attempt + 1})
                return
            except (urllib.error.URLError, OSError, ValueError) as e:
                # never the URL itself: webhook URLs carry their secret
                error = f"HTTP {e.code}" if isinstance(e, urllib.error.HTTPError) else \
                    type(e).__name__ + (f": {e.reason}" if isinstance(e, urllib.error.URLError)
                                        else "")
            if attempt + 1 < attempts:
                time.sleep(BACKOFF[min(attempt, len(BACKOFF) - 1)])
        logger.error("douane: could not notify approvers of %s after %d attempt(s): %s",
                     approval_id, attempts, error)
        self.audit({"event": "approval.notify_failed", "approval_id": approval_id,
                    "decision_id": decision_id, "attempts": attempts, "error": error})
