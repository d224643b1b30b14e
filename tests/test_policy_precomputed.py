"""What the policy decides once per caller and upstream (`Policy.upstream_grants`), the answers
a grant remembers for the names requests repeat (models, tools), and the upstreams declared on a
host (`Config.upstream_for`): never another answer than deciding anew, and a reload decides anew."""

from __future__ import annotations

import asyncio
import fnmatch
import random
from pathlib import Path

import pytest
import yaml

from douane import config as configmod
from douane.flowstate import Identity
from douane.interaction import Interaction, McpMessage, ToolDef
from douane.policy import engine, model
from douane.policy.store import LivePolicy, PolicySection
from tests.test_policy import POLICY

USERS = """\
users:
  alice@corp:
    upstreams:
      openai: {models: ["o*", "gpt-4.1"], max_tokens: 2000}
      crm: {tools: {allow: ["read_*"], deny: ["read_secret*"]}}
  mallory@corp:
    upstreams:
      crm: {tools: {allow: ["*"]}, operations: ["GET /admin/*"]}
"""
MODELS = ("gpt-4o-mini", "gpt-4.1", "gpt-", "GPT-4o", "gpt-4o-mini ", "o3", "o", "claude-3",
          "gpt-４o", "gpt-4o-mini\u200b", "", "*", "gpt-[4]")
TOOLS = ("lookup_customer", "lookup_admin", "LOOKUP_ADMIN", "lookup_ａdmin", "delete_records",
         "read_file", "read_secret", "read_secretly", "drop", "lookup_\u200badmin", "")
GROUPS = ("engineering", "support", "interns", "Engineering", "")


def load(tmp_path: Path, text: str, name: str = "grants.yaml") -> model.Policy:
    path = tmp_path / name
    path.write_text(text)
    return model.load([path])


def random_case(rng: random.Random) -> tuple[Identity, str, Interaction]:
    groups = tuple(rng.sample(GROUPS, rng.randint(0, 3)))
    user = rng.choice(("alice@corp", "mallory@corp", "sam@corp", "eve@corp"))
    who = Identity(user, groups, "test", user, "bearer")
    upstream = rng.choice(("openai", "openai", "crm", "crm", "elsewhere"))
    if upstream == "crm" or rng.random() < 0.1:
        it = Interaction("mcp", "mcp:tools/call")
        for i in range(rng.randint(1, 3)):
            tool = rng.choice(TOOLS)
            arguments = rng.choice(({}, {"customer_id": "12"}, {"customer_id": "1234567"},
                                    {"table": "sessions", "limit": 5}, {"path": "/etc/passwd"}))
            it.mcp.append(McpMessage("tools/call", i, {"name": tool, "arguments": arguments},
                                     None, tool=tool))
        if rng.random() < 0.2:
            it.mcp.append(McpMessage("resources/read", 9, {"uri": "file:///docs/a"}, None,
                                     uri=rng.choice(("file:///docs/a", "file:///etc/x"))))
        return who, upstream, it
    it = Interaction("openai", rng.choice(("chat.completions", "responses", "embeddings")),
                     model=rng.choice(MODELS), max_tokens=rng.choice((None, 50, 600, 1500, 9000)),
                     stream=rng.random() < 0.3, has_media=rng.random() < 0.2,
                     temperature=rng.choice((None, 0.5, 1.5)))
    if rng.random() < 0.3:
        it.tools = [ToolDef(rng.choice(TOOLS) or "f", "", ("tools", 0))]
    return who, upstream, it


def outcome(decided: tuple[model.Grant | None, list]) -> tuple:
    grant, reasons = decided
    return (grant.source if grant else None,
            [(r.rule, r.message, r.field) for r in reasons])


def test_decisions_with_remembered_answers_equal_fresh_ones(tmp_path):
    """One policy serves many callers, models and tools in a row (its answers remembered across
    them); each decision equals the one of a policy loaded anew for that request alone."""
    text = POLICY + USERS
    warm = load(tmp_path, text)
    rng = random.Random(18)
    refused = allowed = 0
    for n in range(400):
        who, upstream, it = random_case(rng)
        fresh = load(tmp_path, text, f"fresh{n}.yaml")
        got = outcome(engine.granting(warm, who, upstream, it))
        assert got == outcome(engine.granting(fresh, who, upstream, it)), (who, upstream, it)
        assert engine.granting_operation(warm, who, upstream, "GET", "/admin/x") is \
            None if engine.granting_operation(fresh, who, upstream, "GET", "/admin/x") is None \
            else warm.users["mallory@corp"]
        listing = {"tools": [{"name": t} for t in TOOLS]}
        assert engine.hidden_items(warm, who, upstream, "tools/list", listing) == \
            engine.hidden_items(fresh, who, upstream, "tools/list", listing)
        refused += got[0] is None
        allowed += got[0] is not None
    assert refused > 50 and allowed > 50  # both sides exercised


def test_a_grant_remembers_its_answers_within_a_bound(tmp_path, monkeypatch):
    """Names are the clients': the answers kept per grant, and the callers kept per policy, are
    bounded; past the bound they are decided anew, the same."""
    monkeypatch.setattr(model, "REMEMBERED_ANSWERS", 8)
    policy = load(tmp_path, POLICY)
    eng = policy.groups["engineering"].upstreams["openai"]
    for i in range(50):
        name = f"gpt-{i}" if i % 2 else f"claude-{i}"
        assert eng.model_allowed(name) == fnmatch.fnmatchcase(name, "gpt-*")
        assert len(eng._answers) <= 8
        who = Identity(f"u{i}@corp", ("engineering",) if i % 3 else (), "test", "u", "bearer")
        grants = policy.upstream_grants(who.user, who.groups, "openai")
        assert [g.source for g, _ in grants] == \
            ["group engineering" if i % 3 else "default"]
        assert len(policy._upstream_grants) <= 8


def test_a_reloaded_policy_decides_anew(tmp_path):
    """A grant taken away mid-run: the next decision (on the policy now in force) refuses what
    the remembered answers of the previous version allowed, and a grant given is used at once."""
    path = tmp_path / "grants.yaml"
    path.write_text(POLICY)
    live = LivePolicy(PolicySection((path,), 1, model.load([path]), None))
    alice = Identity("alice@corp", ("engineering",), "test", "alice", "bearer")
    it = Interaction("openai", "chat.completions", model="gpt-4.1", max_tokens=100)
    call = Interaction("mcp", "mcp:tools/call")
    call.mcp.append(McpMessage("tools/call", 1, {"name": "read_file", "arguments": {}}, None,
                               tool="read_file"))
    for _ in range(3):  # remembered
        assert engine.granting(live.current, alice, "openai", it)[0] is not None
        assert engine.granting(live.current, alice, "crm", call)[0] is not None
    before = live.current

    async def reload(text: str) -> None:
        path.write_text(text)
        assert await live.reload_if_changed()

    asyncio.run(reload(POLICY.replace('models: ["gpt-*"]', 'models: ["gpt-4o-mini"]')
                       .replace('"delete_records", "read_file"', '"delete_records"')))
    grant, reasons = engine.granting(live.current, alice, "openai", it)
    assert grant is None and [r.rule for r in reasons] == ["grant.model"]
    grant, reasons = engine.granting(live.current, alice, "crm", call)
    assert grant is None and [r.rule for r in reasons] == ["grant.tool"]
    assert engine.granting(before, alice, "openai", it)[0] is not None  # the old version's own
    asyncio.run(reload(POLICY.replace("  support:\n", "  interns:\n    upstreams:\n      openai: "
                                      "{models: [\"gpt-4.1\"], max_tokens: 100}\n  support:\n")))
    intern = Identity("alice@corp", ("interns",), "test", "alice", "bearer")  # new groups
    assert engine.granting(live.current, intern, "openai", it)[0].source == "group interns"
    assert engine.granting(live.current, alice, "openai", it)[0].source == "group engineering"


UPSTREAMS = {
    "a": {"url": "http://api.example.com/v1", "protocol": "openai"},
    "b": {"url": "http://api.example.com/v1/deep", "protocol": "openai"},
    "c": {"url": "http://api.example.com/", "protocol": "openai"},
    "d": {"url": "http://*.example.com/v1", "protocol": "openai"},
    "e": {"url": "http://x.example.com/v1", "protocol": "anthropic"},  # equal prefix to d
    "f": {"url": "http://api.example.com:8080/mcp", "protocol": "mcp"},
}


def declared(tmp_path: Path) -> configmod.Config:
    path = tmp_path / "douane.yaml"
    path.write_text(yaml.safe_dump({
        "version": 1, "upstreams": UPSTREAMS, "gateway": {"state_dir": str(tmp_path / "state")},
        "identity": {"dev_issuer": {"enabled": True, "key_file": str(tmp_path / "dev.pem")}}}))
    return configmod.load(path, gateway=False)


def reference_upstream(config: configmod.Config, host: str, port: int,
                       path: str) -> configmod.Upstream | None:
    """`upstream_for` as it was, deciding every request anew."""
    found = [u for u in config.upstreams if u.matches(host, port, path)]
    return max(found, key=lambda u: len(u.path_prefix), default=None)


def test_upstreams_on_a_host_equal_matching_them_anew(tmp_path, monkeypatch):
    monkeypatch.setattr(configmod, "ON_HOST_ENTRIES", 5)
    config = declared(tmp_path)
    rng = random.Random(7)
    hosts = ("api.example.com", "API.Example.com", "x.example.com", "example.com", "evil.com",
             "y.example.com", "api.example.com.evil.com", "a.b.example.com")
    paths = ("/v1", "/v1/chat/completions", "/v1/deep", "/v1/deep/x", "/v1deep", "/", "/mcp",
             "/mcp/x", "/v2/x", "/v1/")
    seen = set()
    for _ in range(600):
        host, port, p = rng.choice(hosts), rng.choice((80, 8080, 443)), rng.choice(paths)
        got = config.upstream_for(host, port, p)
        assert got == reference_upstream(config, host, port, p), (host, port, p)
        seen.add(got.name if got else None)
        assert len(config._on_host) <= 5
    assert seen == {None, "a", "b", "c", "d", "f"}  # e: d, declared before it, wins


@pytest.mark.parametrize("host", ["x.example.com", "X.EXAMPLE.COM"])
def test_of_equal_prefixes_the_first_declared_wins(tmp_path, host):
    config = declared(tmp_path)
    assert config.upstream_for(host, 80, "/v1/messages").name == "d"


def _runs_in_full(pieces):
    """`engine._secret_runs` without its shortcut: every run `streams` makes."""
    from douane.protocols import streams
    runs = [(run, True) for run in streams.read_together(
        [p for p in pieces if p.kind in engine.SECRET_KINDS]) if len(run) > 1]
    return runs + [(run, False) for run in streams.read_in_order(pieces)]


def test_the_runs_a_secret_may_be_split_across_are_all_found_without_walking_one_text():
    """A request or answer of one text besides its keys (`_secret_runs`' shortcut) has no run, as
    the full walk finds; with two texts or more the walk is made (random pieces: a shortcut that
    dropped a run of two texts, say `< 3`, fails here)."""
    from douane.interaction import TextPiece
    from douane.protocols import fields
    rng = random.Random(18)
    paths = [(fields.KEYS,), ("messages", 0, "content"), ("messages", 1, "content"),
             ("messages", 2, "content", 0, "text"), ("messages", 2, "content", 1, "text"),
             ("messages", 2, "content", 1, "image_url", "url"), ("input", 0, "arguments",
                                                                 fields.JSON_STRING),
             ("input", 1, "arguments", fields.JSON_STRING), ("system",), ("params", "name"),
             ("params", "arguments", "a"), ("params", "arguments", "b"),
             ("content", 0, "source", "data", fields.DECODED), (0, "text"), (1, "text")]
    kinds = (*engine.SECRET_KINDS, "completion", "resource")
    shortcut = 0
    for _ in range(4000):
        pieces = [TextPiece(rng.choice(kinds), "user", "x", rng.choice(paths))
                  for _ in range(rng.randint(0, 5))]
        got, full = engine._secret_runs(pieces), _runs_in_full(pieces)
        assert got == full, [(p.kind, p.path) for p in pieces]
        shortcut += not full
    assert shortcut > 500  # (the shortcut's cases drawn often)
