"""The shared store's schema, created and migrated by douane itself.

`douane_schema_version` holds one row per migration applied. At start-up each replica takes an
advisory lock, applies the migrations newer than the database's version in order (each in its own
transaction, with its row), and releases the lock: replicas starting together migrate once. A
database migrated by a newer douane (a version this one does not know) is refused, not used.
Migrations are append-only: never edit one that has shipped, add the next.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS douane_schema_version (
    version integer PRIMARY KEY,
    name text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now())
"""

LOCK_ID = 0x646F75616E65  # pg_advisory_lock key: "douane"

MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "approvals, grants and limits", """
CREATE TABLE approvals (
    id text PRIMARY KEY,
    replica text NOT NULL,              -- the replica holding the flow (hold mode)
    status text NOT NULL,               -- pending, approved, denied, timed_out, abandoned
    mode text NOT NULL,                 -- hold | answer
    requester text NOT NULL,
    fingerprint text NOT NULL,
    summary jsonb NOT NULL,             -- what an approver reads (preview masked)
    created_at double precision NOT NULL,
    expires_at double precision NOT NULL,
    decided_at double precision,
    approver text,
    reason text,
    grant_seconds integer);
CREATE INDEX approvals_open ON approvals (status, expires_at);
CREATE INDEX approvals_retry ON approvals (requester, fingerprint);

CREATE TABLE grants (
    id text PRIMARY KEY,
    username text NOT NULL,
    upstream text NOT NULL,
    subject text NOT NULL,
    fingerprint text,                   -- a one-shot grant: that very request only
    uses_left integer,                  -- NULL: any number until it expires
    created_at double precision NOT NULL,
    expires_at double precision NOT NULL,
    approval_id text NOT NULL,
    approver text NOT NULL,
    reason text NOT NULL);
CREATE INDEX grants_lookup ON grants (username, upstream, subject);

CREATE TABLE limit_usage (
    key text PRIMARY KEY,               -- grant source | user
    seconds bigint[] NOT NULL,          -- the epoch seconds of the last minute with calls,
    counts integer[] NOT NULL,          -- and the calls of each (at most 60 pairs)
    day bigint NOT NULL,                -- days since the epoch of `tokens`
    tokens bigint NOT NULL);
"""),
    Migration(2, "session index and audit chain heads", """
CREATE TABLE flows (                    -- one row per recorded flow, of every replica
    flow_id text PRIMARY KEY,
    decision_id text, ts double precision, "user" text, groups text, upstream text, model text,
    operation text, tool text, decision text, risk double precision, masked integer,
    masked_types text, status integer, latency_ms double precision,
    file text,                          -- under recording.dir on the replica's host
    "offset" bigint,
    replica text NOT NULL);             -- the replica that holds the recording
CREATE INDEX flows_user_ts ON flows ("user", ts);
CREATE INDEX flows_ts ON flows (ts);
CREATE INDEX flows_decision_id ON flows (decision_id);

CREATE TABLE audit_heads (              -- each replica's audit chain: its newest record
    replica text PRIMARY KEY,
    host text NOT NULL,                 -- gateway.replica of its host (replica = host/worker)
    path text NOT NULL,                 -- its log, on that host
    seq bigint NOT NULL,
    mac text NOT NULL,
    updated_at double precision NOT NULL);
"""),
    Migration(3, "secrets every replica shares", """
CREATE TABLE douane_secrets (
    name text PRIMARY KEY,              -- e.g. approval_status: the key of status page links
    value bytea NOT NULL);
"""),
    Migration(4, "owners of the ids upstreams issue", """
CREATE TABLE owners (                   -- each MCP session, stored answer, conversation, chat
    key text PRIMARY KEY,               -- completion with its user: a digest of upstream, kind
    kind text NOT NULL,                 -- and id (never the id itself; douane/owners.py)
    username text NOT NULL,
    upstream text NOT NULL,
    used_at double precision NOT NULL);
CREATE INDEX owners_user ON owners (username, upstream, kind, used_at);
CREATE INDEX owners_used ON owners (used_at);
"""),
)
