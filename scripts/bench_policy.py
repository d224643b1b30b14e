"""Policy evaluation benchmark: a realistic policy (100 rules, 20 groups, 50 tools) against a few
thousand synthetic interactions; prints p50/p99 microseconds per evaluation."""

from __future__ import annotations

import hashlib
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

from douane.flowstate import Identity
from douane.interaction import Interaction, McpMessage, TextPiece, ToolDef
from douane.policy import engine, model

WORDS = ["deploy", "service", "customer", "invoice", "report", "latency", "database", "cluster", "summary", "weather", "refund", "shipment", "kubernetes", "incident", "roadmap", "budget", "forecast", "contract", "review"]


def build_policy(folder: Path) -> model.Policy:
    rng = random.Random(1)
    tools = [f"{verb}_{noun}" for verb in ("get", "list", "create", "update", "delete")
             for noun in ("customer", "order", "invoice", "ticket", "user", "file", "report",
                          "job", "secret", "record")]
    groups = {}
    for g in range(20):
        allowed = rng.sample(tools, 15)
        groups[f"team{g}"] = {
            "upstreams": {
                "openai": {"models": ["gpt-4o*", "gpt-4.1*"], "max_tokens": 4000 + g * 100},
                "crm": {"tools": {"allow": allowed, "deny": ["*_secret"], "arguments": {
                    t: {"id": {"regex": "^[0-9]{1,8}$"}, "limit": {"range": [1, 500]}}
                    for t in allowed[:5]}}}},
            "limits": {"requests_per_minute": 600}}
    rules = [{"id": f"rule{i}", "literal": f"codename {rng.choice(WORDS)}{i}", "score": 30}
             for i in range(60)]
    rules += [{"id": f"regex{i}", "regex": rf"\b{rng.choice(WORDS)}-{i}[0-9]{{2,}}\b",
               "score": 20, "in": ["prompt", "tool_arguments", "tool_result"]} for i in range(40)]
    doc = {"version": 1, "groups": groups, "rules": rules,
           "tool_risk": [{"tools": ["delete_*"], "score": 50}],
           "thresholds": {"hold": 50, "block": 80}}
    path = folder / "bench-policy.yaml"
    path.write_text(yaml.safe_dump(doc))
    return model.load([path])


def interactions(n: int) -> list[tuple[Identity, str, Interaction]]:
    rng = random.Random(2)
    out = []
    for i in range(n):
        identity = Identity(f"user{i % 50}@corp", (f"team{i % 20}", f"team{(i + 7) % 20}"),
                            "bench", "s", "bearer")
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 120)))
        if i % 3:
            it = Interaction("openai", "chat.completions", model="gpt-4o", max_tokens=1000,
                             texts=[TextPiece("prompt", "system", "You are helpful.", ("m", 0)),
                                    TextPiece("prompt", "user", text, ("m", 1))],
                             tools=[ToolDef("get_weather", "", ("tools", 0))])
            out.append((identity, "openai", it))
        else:
            tool = rng.choice(["get_customer", "list_order", "delete_record", "update_ticket"])
            it = Interaction("mcp", "mcp:tools/call")
            it.mcp.append(McpMessage("tools/call", i, {"name": tool, "arguments": {
                "id": str(rng.randint(1, 9999)), "limit": 10, "note": text[:200]}}, None,
                tool=tool))
            it.texts.append(TextPiece("tool_arguments", "user", text[:200], ("a",)))
            out.append((identity, "crm", it))
    return out


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    with tempfile.TemporaryDirectory() as folder:
        policy = build_policy(Path(folder))
    cases = interactions(n)
    for identity, upstream, it in cases[:200]:  # warm-up
        engine.evaluate(policy, identity, upstream, it)
    timings = []
    actions: dict[str, int] = {}
    digest = hashlib.sha256()  # every decision and its reasons: equal digests, equal decisions
    for identity, upstream, it in cases:
        start = time.perf_counter_ns()
        decision = engine.evaluate(policy, identity, upstream, it)
        timings.append((time.perf_counter_ns() - start) / 1000)
        actions[decision.action] = actions.get(decision.action, 0) + 1
        digest.update(repr(decision.summary()).encode())
    timings.sort()
    p50, p99 = statistics.median(timings), timings[int(len(timings) * 0.99) - 1]
    print(f"policy: {len(policy.rules)} rules, {len(policy.groups)} groups, 50 tools; "
          f"{n} interactions (avg prompt {sum(len(i.prompt_text()) for *_, i in cases) // n} chars)")
    print(f"decisions: {actions}, digest {digest.hexdigest()[:16]}")
    print(f"per evaluation: p50 {p50:.1f} us, p99 {p99:.1f} us, max {timings[-1]:.1f} us "
          f"(targets: p50 < 100 us, p99 < 1000 us)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
