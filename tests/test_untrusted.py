"""Values douane did not write: escaped for terminals and logs, scrubbed and bounded for records,
absurd names refused, folder names injective."""

from __future__ import annotations

import json

import pytest

from douane import untrusted
from douane.interaction import Interaction, McpMessage, ToolCall, ToolDef


@pytest.mark.parametrize(("raw", "shown"), [
    ("eve\nforged line", "eve\\x0aforged line"),
    ("\x1b[2K\radmin", "\\x1b[2K\\x0dadmin"),  # ANSI erase line + carriage return
    ("a\x00b\x7fc\x85d\x9be", "a\\x00b\\x7fc\\x85d\\x9be"),  # NUL, DEL, C1 NEL and CSI
    ("safe\u202eexe.txt", "safe\\u202eexe.txt"),  # bidi override
    ("x\u2028y\u2029z\u2066w\u200f", "x\\u2028y\\u2029z\\u2066w\\u200f"),
    ("plain text, é and 李", "plain text, é and 李"),
])
def test_escape(raw, shown):
    assert untrusted.escape(raw) == shown
    assert "\n" not in untrusted.escape(raw) and "\x1b" not in untrusted.escape(raw)


def test_escape_keeps_what_it_is_told_to():
    assert untrusted.escape("a\nb\tc\x1b", keep="\n\t") == "a\nb\tc\\x1b"


def test_scrub_bounds_and_redacts():
    key = "ghp_" + "aB3dE5gH7jK9mN1pQ3sT5vW7yZ9bC1dF2hJ4"
    assert untrusted.scrub(f"tool {key}") == "tool <SECRET:detector.secret.github_token>"
    long = "x" * 1020 + key + "y" * 5000  # a secret straddling the cut is still redacted
    cut = untrusted.scrub(long)
    assert key[:8] not in cut and cut.startswith("x" * 1020)
    assert cut.endswith(f"…[cut: {len(long)} characters, sha256 {untrusted.digest(long)}]")
    assert len(cut) < 1100
    assert untrusted.scrub_all({"a": ["v"] * 100, "n": 3})["a"][-1] == "…[cut: 100 items]"
    assert untrusted.loggable(f"u\n{key} " + "z" * 500).startswith(
        "u\\x0a<SECRET:detector.secret.github_token> zzz")


def test_absurd_names():
    it = Interaction("openai", "chat.completions", model="gpt-4o")
    assert untrusted.absurd_name(it) is None
    it.model = "m" * 257
    assert untrusted.absurd_name(it) == "the model name is 257 characters long (at most 256)"
    it.model = "gpt\x1b[8m"
    assert untrusted.absurd_name(it) == "the model name contains control characters"
    for field, value in (("tools", ToolDef("a\nb", "", ())), ("tool_calls", ToolCall(
            "t" * 300, {}, None, ())), ("mcp", McpMessage("tools/call", 1, {}, tool="\u202ex"))):
        it = Interaction("openai", "x")
        getattr(it, field).append(value)
        assert untrusted.absurd_name(it).startswith("the tool name"), field


def test_slug_is_injective_and_bounded():
    names = ["иван@x", "олег@x", "a/b", "a_b", "a b", "A/B", "", ".", "..", "x" * 200,
             "x" * 201, "李@x", "e\u0301", "é"]
    slugs = [untrusted.slug(n) for n in names]
    assert len(set(slugs)) == len(names)
    assert all(len(s) <= 62 and "/" not in s and not s.startswith((".", "-")) for s in slugs)
    assert slugs[0].startswith("ivan@x--")


def test_scrub_all_scans_once_and_still_finds_each_secret():
    key = "AKIA" + "Q7WERTY2UIOP3ASD"
    record = {"user": "alice@example.com", "decision_id": "dcn_0123456789abcdef0123",
              "groups": ["engineering", f"x {key}"], "model": "m" * 2000}
    clean = untrusted.scrub_all(record)
    assert clean["groups"][1] == "x <SECRET:detector.secret.aws_access_key>"
    assert clean["model"].startswith("m" * 1024 + "…[cut: 2000 characters")
    assert untrusted.scrub_all(record) == clean
    assert untrusted.scrub_all({"user": "alice@example.com"}) == {"user": "alice@example.com"}
    assert "alice@example.com" in untrusted._clean  # not scanned again
    assert untrusted.scrub_all({"user": "alice@example.com", "k": key}) == {
        "user": "alice@example.com", "k": "<SECRET:detector.secret.aws_access_key>"}
    assert key not in untrusted._clean


def test_a_match_across_two_values_hides_no_secret_in_the_second():
    """Red team, stop 27: joined by a newline, `the password is` + `[x]password=...` read as one
    password whose value looks like a placeholder; the secret behind it went unseen, and the
    value was remembered clean for later records too."""
    values = ["the password is", "[x]password=Hunter2!x-4f9q"]
    assert not untrusted.clean(values)
    assert not untrusted.clean(values[1:])
    assert "Hunter2" not in json.dumps(untrusted.scrub_all({"a": values[0], "b": values[1]}))



@pytest.mark.parametrize(("record", "as_is"), [
    ({"user": "alice", "n": 1, "f": 0.5, "ok": True, "none": None, "groups": ["eng"],
      "latency_ms": {"total": 1.2}, "reasons": [{"rule": "r", "message": "m"}]}, True),
    ({"model": "gpt\ud800", "user": "alice"}, False),  # a lone surrogate: written escaped
    ({"nested": {"deep": ["x" * 1025]}}, False),  # a string past the limit: cut
    ({"groups": [f"g{i}" for i in range(untrusted.LIST_ITEMS + 1)]}, False),  # too many items
    ({"pair": ("a", "b\udc80")}, False),  # in a tuple
    ({"user": "alice", "k": "AKIA" + "Q7WERTY2UIOP3ASD"}, False),  # a secret
    ({"user": "alice", "raw": b"AKIA"}, False),  # a value the walk does not know: it decides
])
def test_scrub_all_keeps_a_record_as_the_full_walk_does(record, as_is):
    """A dict nothing in which changes is returned as it is (no copy, no call per string); any
    other is what the full walk makes of it (the walk of a list holding it: never the shortcut)."""
    kept = untrusted.scrub_all(record)
    walked = untrusted.scrub_all([record])[0]
    assert json.dumps(kept, default=repr) == json.dumps(walked, default=repr)
    assert (kept is record) is as_is
