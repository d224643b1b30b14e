"""`douane explain --as USER --groups G REQUEST.json [--upstream NAME]`: the policy's decision on
a request body, with every reason, without sending anything."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mitmproxy.test import tflow, tutils

from douane import protocols
from douane.commands import add_config_option, config_file, load_config
from douane.config import Upstream
from douane.flowstate import Identity
from douane.policy import engine
from douane.untrusted import escape


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("explain", help="show the policy decision for a request, sending nothing")
    p.add_argument("request", type=Path, help="a JSON request body")
    p.add_argument("--as", dest="user", required=True, help="the caller's user id")
    p.add_argument("--groups", default="", help="comma-separated groups")
    p.add_argument("--upstream", help="upstream name (default: the first declared)")
    p.add_argument("--path", help="request path (default: the protocol's main endpoint)")
    add_config_option(p)
    p.set_defaults(func=run)


MAIN_ENDPOINTS = {"openai": "chat/completions", "anthropic": "messages"}


def default_path(upstream: Upstream) -> str:
    """The protocol's main endpoint under the upstream's path prefix, as its SDK sends it."""
    prefix = upstream.path_prefix.rstrip("/")
    endpoint = MAIN_ENDPOINTS.get(upstream.protocol)
    if endpoint is None:  # mcp, generic: the prefix is the endpoint
        return prefix or "/"
    if prefix.endswith("/v1") or (upstream.protocol == "openai" and prefix):
        return f"{prefix}/{endpoint}"  # the OpenAI SDK's base URL carries its version
    return f"{prefix}/v1/{endpoint}"


def run(args: argparse.Namespace) -> int:
    config = load_config(args)
    section = config.sections.get("policy")
    if section is None:
        print(f"{config_file(args)} has no policy section: nothing to explain", file=sys.stderr)
        return 2
    upstream = next((u for u in config.upstreams if u.name == args.upstream or
                     args.upstream is None), None)
    if upstream is None:
        print(f"no upstream named {args.upstream}", file=sys.stderr)
        return 2
    # A flow built in memory, parsed by the same code the gateway runs.
    flow = tflow.tflow(req=tutils.treq(method=b"POST", host=upstream.host,
                                       path=(args.path or default_path(upstream)).encode(),
                                       content=args.request.read_bytes()))
    flow.request.headers["content-type"] = "application/json"
    try:
        it = protocols.parse_request(upstream, flow)
    except protocols.ProtocolError as e:
        print(f"decision: refuse ({e.status} {e.code})\n  - {escape(e.message)}")
        return 0
    identity = Identity(args.user, tuple(g for g in args.groups.split(",") if g), "explain",
                        args.user, "explain")
    policy = section.policy
    grant, violations = engine.granting(policy, identity, upstream.name, it)
    decision = engine.evaluate(policy, identity, upstream.name, it)
    print(f"decision: {decision.action} (risk {decision.risk:g}; hold at {policy.hold:g}, "
          f"block at {policy.block:g}; policy version {policy.version})")
    print(f"upstream: {upstream.name} ({upstream.protocol}), operation {it.operation}, "
          f"model {escape(it.model or '-')}")
    print(f"grant:    {grant.source if grant else 'none covers this request'}")
    for reason in decision.reasons:
        where = f" in {reason.field}" if reason.field else ""
        score = f" +{reason.score:g}" if reason.score else ""
        print(escape(f"  - {reason.rule}{where}{score}: {reason.message}"))
    if not decision.reasons:
        print("  (no rule matched)")
    return 0
