"""What each step of douane's Checkpoint costs the main thread per request, in-process.

    .venv/bin/python scripts/step_times.py [--n 300] [--only openai-chat,mcp] [--sizes s,m,l]

The real gateway (`addons/gateway.py`, the bench's config: identity, policy, audit, recording)
receives flows built in-process (no sockets: mitmproxy's own per-connection work is not in the
figures), for OpenAI chat, Responses, Anthropic messages and MCP tools/call bodies of several
sizes, each with an answer of its size. Every step of the `Order` is timed (the thread's CPU
clock, `scripts/step_timers.py`'s wrappers), and a few functions inside them (`--inner`): the
body walk, the policy's risk and secret scans, the name checks. A step's figure is its median µs
over `--n` flows, after a warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "addons"))
sys.path.insert(0, str(ROOT / "scripts"))

import step_timers  # noqa: E402
from mitmproxy.addons.proxyserver import Proxyserver  # noqa: E402
from mitmproxy.test import taddons, tflow, tutils  # noqa: E402

from douane import config as configmod  # noqa: E402
from douane import devissuer  # noqa: E402

TEXT = ("Could you look at the quarterly numbers for the Lyon office and tell me whether the "
        "shipping costs went up again? Last time we saw a 12% increase over March. ")
ANSWER = ("Sure. The account belongs to Maria Garcia; her email is maria.garcia@example.com and "
          "her phone 212-555-0147. The last payment used card 4111 1111 1111 1111 on March 3. ")
SIZES = {"s": 1, "m": 8, "l": 60}  # turns (messages, items, argument fields)
WARM_UP = 30  # flows of each body before the timed ones


def _tool_args(n: int) -> dict:
    return {"customer_id": "42", "fields": ["name", "email", "orders"],
            "notes": [{"when": f"2026-11-{i % 28 + 1:02d}", "text": TEXT} for i in range(n)]}


def openai_chat(n: int) -> tuple[str, dict, dict]:
    messages: list[dict] = [{"role": "system", "content": "You are a helpful assistant."}]
    for i in range(n - 1):
        messages += [{"role": "user", "content": TEXT},
                     {"role": "assistant", "content": None, "tool_calls": [
                         {"id": f"call_{i}", "type": "function", "function": {
                             "name": "lookup_customer", "arguments": json.dumps(_tool_args(1))}}]},
                     {"role": "tool", "tool_call_id": f"call_{i}", "content": ANSWER}]
    messages.append({"role": "user", "content": TEXT if n > 1 else "Summarise my account."})
    body: dict = {"model": "gpt-4o-mini", "max_tokens": 100, "messages": messages}
    if n > 1:
        body["tools"] = [{"type": "function", "function": {
            "name": "lookup_customer", "description": "Find a customer by id",
            "parameters": {"type": "object", "properties": {
                "customer_id": {"type": "string", "description": "the id"}}}}}]
    answer = {"id": "c", "object": "chat.completion", "created": 0, "model": "m",
              "choices": [{"index": 0, "finish_reason": "stop", "message": {
                  "role": "assistant", "content": ANSWER * max(1, n // 4)}}],
              "usage": {"prompt_tokens": 5, "completion_tokens": 50, "total_tokens": 55}}
    return "/v1/chat/completions", body, answer


def openai_responses(n: int) -> tuple[str, dict, dict]:
    items: list[dict] = []
    for i in range(n - 1):
        items += [{"role": "user", "content": [{"type": "input_text", "text": TEXT}]},
                  {"type": "function_call", "call_id": f"call_{i}", "name": "lookup_customer",
                   "arguments": json.dumps(_tool_args(1))},
                  {"type": "function_call_output", "call_id": f"call_{i}", "output": ANSWER}]
    items.append({"role": "user", "content": TEXT})
    body: dict = {"model": "gpt-4o-mini", "max_output_tokens": 100, "input": items,
                  "instructions": "Be brief."}
    if n > 1:
        body["tools"] = [{"type": "function", "name": "lookup_customer",
                          "description": "Find a customer by id", "parameters": {
                              "type": "object", "properties": {"customer_id": {"type": "string"}}}}]
    answer = {"id": "resp_1", "object": "response", "created_at": 0, "status": "completed",
              "model": "m", "output": [{"type": "message", "id": "msg_1", "status": "completed",
                                        "role": "assistant", "content": [
                                            {"type": "output_text", "annotations": [],
                                             "text": ANSWER * max(1, n // 4)}]}],
              "usage": {"input_tokens": 5, "output_tokens": 50, "total_tokens": 55}}
    return "/v1/responses", body, answer


def anthropic(n: int) -> tuple[str, dict, dict]:
    messages: list[dict] = []
    for i in range(n - 1):
        messages += [{"role": "user", "content": TEXT},
                     {"role": "assistant", "content": [
                         {"type": "text", "text": "Let me look."},
                         {"type": "tool_use", "id": f"tu_{i}", "name": "lookup_customer",
                          "input": _tool_args(1)}]},
                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": f"tu_{i}",
                                                   "content": ANSWER}]}]
    messages.append({"role": "user", "content": TEXT if n > 1 else "Summarise my account."})
    body: dict = {"model": "claude-sonnet-4", "max_tokens": 100, "messages": messages}
    if n > 1:
        body["system"] = "You are a helpful assistant."
        body["tools"] = [{"name": "lookup_customer", "description": "Find a customer by id",
                          "input_schema": {"type": "object", "properties": {
                              "customer_id": {"type": "string"}}}}]
    answer = {"id": "msg_bench", "type": "message", "role": "assistant", "model": "m",
              "content": [{"type": "text", "text": ANSWER * max(1, n // 4)}],
              "stop_reason": "end_turn", "stop_sequence": None,
              "usage": {"input_tokens": 5, "output_tokens": 50}}
    return "/anthropic/v1/messages", body, answer


def mcp(n: int) -> tuple[str, dict, dict]:
    arguments = {"customer_id": "42"} if n == 1 else _tool_args(n)
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
            "params": {"name": "lookup_customer", "arguments": arguments}}
    answer = {"jsonrpc": "2.0", "id": 1, "result": {
        "content": [{"type": "text", "text": ANSWER} for _ in range(max(1, n // 4))],
        "isError": False}}
    return "/mcp", body, answer


BODIES = {"openai-chat": openai_chat, "openai-responses": openai_responses,
          "anthropic": anthropic, "mcp": mcp}


def load_gateway():
    spec = importlib.util.spec_from_file_location("douane_gateway_script",
                                                  ROOT / "addons" / "gateway.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def config(work: Path) -> tuple[Path, str]:
    from bench_gateway import UPSTREAM_KEY, bench_config
    os.environ.setdefault("BENCH_UPSTREAM_KEY", UPSTREAM_KEY)
    path = work / "douane.yaml"
    path.write_text(yaml.safe_dump(bench_config(work, 9)))
    token = devissuer.mint(configmod.load(path, gateway=False).identity.dev_issuer, "alice",
                           ["eng"], 3600)
    return path, token


# `--inner`: functions inside the steps (`step_timers`' `also`: each call timed)
INNER = ("douane.inspect:read_request,douane.inspect:read_response,douane.protocols:load_json,"
         "douane.protocols.fields:cover,douane.untrusted:absurd_name,douane.policy.engine:risk,"
         "douane.policy.engine:_split_secrets,douane.secrets:find")


def flow(host: str, port: int, path: str, body: bytes, token: str):
    f = tflow.tflow(req=tutils.treq(host=host, port=port, scheme=b"http", path=path.encode(),
                                    method=b"POST", content=body))
    f.request.headers.clear()
    f.request.headers.update({"content-type": "application/json", "authorization":
                              f"Bearer {token}", "content-length": str(len(body)),
                              "accept": "application/json, text/event-stream"})
    return f


async def one(checkpoint, f, answer: bytes) -> None:
    await checkpoint.requestheaders(f)
    await checkpoint.request(f)
    assert f.response is None, f.response and f.response.content[:300]
    f.response = tutils.tresp(content=answer)
    f.response.headers["content-type"] = "application/json"
    await checkpoint.responseheaders(f)
    await checkpoint.response(f)
    assert f.response.status_code == 200, f.response.content[:300]


def report(rows: list, wanted: list[str], n: int) -> None:
    """Steps: median CPU µs per call (one call per request); inner functions: calls per request,
    median µs per call, and their total per request (nested calls counted in each)."""
    for name, size, req, ans, times in rows:
        print(f"\n{name} {size}: request {req} B, answer {ans} B (µs per request, n={n})")
        for key, ((calls, total), samples) in times.items():
            event, _, step = key.partition(" ")
            if ":" in key:
                print(f"    {key:<40} {calls / n:6.1f} calls x {statistics.median(samples) * 1e6:8.1f}"
                      f" = {total / n * 1e6:8.1f}")
            elif step == "*" or not wanted or any(w in step for w in wanted):
                print(f"  {step if step != '*' else event + ', all steps':<42} "
                      f"{statistics.median(samples) * 1e6:8.1f}")
        print(flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--only", default=",".join(BODIES))
    ap.add_argument("--sizes", default=",".join(SIZES))
    ap.add_argument("--inner", action="store_true", help="time functions inside the steps too")
    ap.add_argument("--steps", default="Inspect,Enforce",
                    help="print the steps whose name holds one of these ('' for all)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        path, token = config(Path(tmp))
        [checkpoint] = load_gateway().addons
        timers = step_timers.StepTimers()
        rows = []
        with taddons.context(Proxyserver(), checkpoint, timers) as tctx:
            tctx.configure(checkpoint, douane_config=str(path),
                           douane_step_timers_also=INNER if args.inner else "")
            timers.running()  # the steps wrapped
            loop = asyncio.new_event_loop()
            for name in args.only.split(","):
                for size in args.sizes.split(","):
                    url, body, answer = BODIES[name](SIZES[size])
                    raw, raw_answer = json.dumps(body).encode(), json.dumps(answer).encode()
                    for i in range(args.n + WARM_UP):
                        if i == WARM_UP:
                            step_timers._times.clear()
                        f = flow("127.0.0.1", 9, url, raw, token)
                        loop.run_until_complete(one(checkpoint, f, raw_answer))
                    rows.append((name, size, len(raw), len(raw_answer), dict(step_timers._times)))
                    step_timers._times.clear()
            loop.close()
        report(rows, [s for s in args.steps.split(",") if s], args.n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
