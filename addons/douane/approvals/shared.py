"""Approvals and grants in the shared store (`database:` PostgreSQL), for a fleet of replicas.

A request held on replica A is a row every replica lists and decides. A decision is one UPDATE of
a row still pending (and not the approver's own), in the transaction that saves its grant and
sends `NOTIFY douane_approvals, '<id>'`: exactly one decision wins across replicas, and A learns
of it at once. A one-shot grant is consumed by one locked UPDATE, so it passes once across the
fleet. Every call raises `StoreUnavailable` when the database cannot answer.
"""

from __future__ import annotations

import time
from typing import Any

from psycopg.types.json import Jsonb

from douane.approvals.store import Grant, Pending
from douane.flowstate import Identity
from douane.store.postgres import PgStore

CHANNEL = "douane_approvals"
# the first key of a user's lock while their requests are counted (two-key advisory locks do not
# share the migrations' one-key space)
USER_LOCK = 0x61707072  # "appr"
GRANT_COLUMNS = ("id, username AS user, upstream, subject, fingerprint, uses_left, created_at, "
                 "expires_at, approval_id, approver, reason")


def pending_of(row: dict[str, Any]) -> Pending:
    """A request as a replica other than its holder sees it (no flow, no event to wait on)."""
    doc = row["summary"]
    return Pending(
        id=row["id"], requester=Identity(doc["user"], tuple(doc["groups"]), "", "", ""),
        upstream=doc["upstream"], protocol=doc["protocol"], operation=doc["operation"],
        subject=doc["subject"], model=doc["model"], fingerprint=row["fingerprint"],
        decision_id=doc["decision_id"], mode=row["mode"], reasons=doc["reasons"],
        risk=doc["risk"], preview=doc["preview"], created_at=row["created_at"],
        expires_at=row["expires_at"], status=row["status"], approver=row["approver"],
        reason=row["reason"], grant_seconds=row["grant_seconds"], decided_at=row["decided_at"])


class SharedApprovals:
    def __init__(self, pg: PgStore):
        self.pg = pg

    async def open(self, pending: Pending, keep: float, most: int) -> int | None:
        """Save a new request unless its user already has `most` open on the fleet (then that
        count, and nothing saved); requests decided more than `keep` seconds ago are dropped.
        The count and the insert hold a lock on the user's name: two replicas opening at once
        cannot both pass with one slot left."""
        async def insert(conn: Any) -> int | None:
            now = time.time()
            await conn.execute("DELETE FROM approvals WHERE coalesce(decided_at, expires_at) < %s",
                               (now - keep,))
            await conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))",
                               (USER_LOCK, pending.requester.user))
            row = await (await conn.execute(
                "SELECT count(*) AS n FROM approvals WHERE requester = %s AND status = 'pending' "
                "AND expires_at > %s", (pending.requester.user, now))).fetchone()
            if row["n"] >= most:
                return row["n"]
            await conn.execute(
                "INSERT INTO approvals (id, replica, status, mode, requester, fingerprint, "
                "summary, created_at, expires_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (pending.id, self.pg.replica, pending.status, pending.mode, pending.requester.user,
                 pending.fingerprint, Jsonb(pending.summary()), pending.created_at,
                 pending.expires_at))
            return None
        return await self.pg.run(insert, transaction=True)

    async def get(self, approval_id: str) -> dict[str, Any] | None:
        return await self.pg.fetchone("SELECT * FROM approvals WHERE id = %s", (approval_id,))

    async def open_rows(self) -> list[dict[str, Any]]:
        return await self.pg.fetchall("SELECT * FROM approvals WHERE status = 'pending' AND "
                                      "expires_at > %s ORDER BY created_at", (time.time(),))

    async def latest_answer(self, user: str, fp: str) -> dict[str, Any] | None:
        """The last answer-mode request of this very request by this user, on any replica."""
        return await self.pg.fetchone(
            "SELECT * FROM approvals WHERE requester = %s AND fingerprint = %s AND mode = "
            "'answer' ORDER BY created_at DESC LIMIT 1", (user, fp))

    async def decide(self, approval_id: str, status: str, approver: str | None, reason: str,
                     grant: Grant | None = None, holder: bool = False) -> dict[str, Any] | None:
        """Decide a request still pending (never by its requester; unexpired, but for its
        holder's own outcomes: timed out, abandoned, shut down), save its grant and notify the
        holder, atomically; None when it was no longer decidable (another replica's decision
        won, it expired, or the approver is its requester)."""
        now = time.time()
        seconds = round(grant.expires_at - grant.created_at) \
            if grant and grant.fingerprint is None else None

        async def update(conn: Any) -> dict[str, Any] | None:
            row = await (await conn.execute(
                "UPDATE approvals SET status = %s, approver = %s, reason = %s, decided_at = %s, "
                "grant_seconds = %s WHERE id = %s AND status = 'pending' AND "
                "(expires_at > %s OR %s) AND requester IS DISTINCT FROM %s RETURNING *",
                (status, approver, reason, now, seconds, approval_id, now, holder,
                 approver))).fetchone()
            if row is None:
                return None
            if grant is not None:
                await conn.execute("DELETE FROM grants WHERE expires_at <= %s OR uses_left = 0",
                                   (now,))
                await conn.execute(
                    "INSERT INTO grants (id, username, upstream, subject, fingerprint, uses_left, "
                    "created_at, expires_at, approval_id, approver, reason) VALUES "
                    "(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                    (grant.id, grant.user, grant.upstream, grant.subject, grant.fingerprint,
                     grant.uses_left, grant.created_at, grant.expires_at, grant.approval_id,
                     grant.approver, grant.reason))
            await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, approval_id))
            return row
        return await self.pg.run(update, transaction=True)

    async def use_grant(self, user: str, upstream: str, subject: str, fp: str) -> Grant | None:
        """`GrantStore.use` across replicas: the matching unexpired grant, one use of a one-shot
        grant consumed (its row locked: a second replica waits, then finds it used)."""
        row = await self.pg.fetchone(
            f"""WITH g AS (SELECT id FROM grants WHERE username = %(user)s AND
                    upstream = %(upstream)s AND subject = %(subject)s AND
                    (fingerprint IS NULL OR fingerprint = %(fp)s) AND expires_at > %(now)s AND
                    (uses_left IS NULL OR uses_left > 0)
                  ORDER BY fingerprint IS NULL, expires_at DESC LIMIT 1 FOR UPDATE)
            UPDATE grants SET uses_left = uses_left - 1 FROM g WHERE grants.id = g.id
            RETURNING {", ".join("grants." + c for c in GRANT_COLUMNS.split(", "))}""",
            {"user": user, "upstream": upstream, "subject": subject, "fp": fp,
             "now": time.time()})
        return Grant(**row) if row else None
