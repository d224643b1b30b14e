"""Pure policy evaluation: an interaction and an identity in, a decision with its reasons out.

Order: grants (least privilege: what is not granted is refused), then risk (deny rules, built-in
detectors and tool risk add weighted scores; the total chooses allow, hold or block). Reasons name
the rule, the field and the score, never the matched text.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from typing import Any

from douane import secrets
from douane.flowstate import Decision, Identity, Reason
from douane.interaction import Interaction, TextPiece
from douane.policy import detectors
from douane.policy.model import Grant, Policy, UpstreamGrant, names_match
from douane.policy.normalize import Normalized, decoded_base64, normalize, unseen
from douane.protocols import fields, streams
from douane.protocols.mcp import uri_problem

SECRET_KINDS = streams.READ_KINDS  # where the secrets detector looks
INJECTION_KINDS = ("tool_result", "resource")  # where the injection detectors look
_KEYS_PATH = (fields.KEYS,)  # the path of a kind's keys and structural values (`fields.cover`)
QUIET_CHARS = 2048  # a request's texts tested as one (`risk`) up to this many characters
LIMITED_OPERATIONS = ("chat.completions", "responses", "messages", "completions")
MODEL_OPERATIONS = (*LIMITED_OPERATIONS, "embeddings")
# What each API calls its output ceiling, so a refusal names the parameter the caller can set.
MAX_TOKENS_PARAMETER = {"responses": "max_output_tokens",
                        "chat.completions": "max_completion_tokens (or max_tokens)"}


def grant_violations(ug: UpstreamGrant, it: Interaction) -> list[Reason]:
    """Why this grant does not cover the interaction (empty: it does)."""
    out: list[Reason] = []
    if it.granted and not ug.grants_operation(*it.operation.split(" ", 1)):
        out.append(Reason("grant.operation", f"{it.operation[:200]} is not granted", "operation"))
    if ug.models is not None and not it.model and it.operation in MODEL_OPERATIONS and \
            "*" not in ug.models:
        # the upstream picks one (a deployment's, a stored prompt's): name it to be held to it
        out.append(Reason("grant.model", "name the model: the grant allows some models only",
                          "model"))
    elif it.model and not ug.model_allowed(it.model):
        out.append(Reason("grant.model", f"model {it.model} is not granted", "model"))
    if ug.max_tokens is not None and it.operation in LIMITED_OPERATIONS:
        parameter = MAX_TOKENS_PARAMETER.get(it.operation, "max_tokens")
        if it.max_tokens is None:
            out.append(Reason("grant.max_tokens", f"set {parameter} (at most {ug.max_tokens})",
                              "max_tokens"))
        elif it.max_tokens > ug.max_tokens:
            out.append(Reason("grant.max_tokens", f"the requested {parameter} {it.max_tokens} "
                              f"is above the granted {ug.max_tokens}", "max_tokens"))
    for beta in it.betas:
        if not ug.beta_allowed(beta):
            header = "openai-beta" if it.protocol == "openai" else "anthropic-beta"
            out.append(Reason("grant.beta", f"{header} {beta} is not granted",
                              f"headers.{header}"))
    if it.stream and not ug.stream:
        out.append(Reason("grant.stream", "streaming is not granted", "stream"))
    if it.has_media and not ug.media:
        out.append(Reason("grant.media", "images, audio and files are not granted", "media"))
    if it.temperature is not None and ug.temperature is not None and \
            not ug.temperature[0] <= it.temperature <= ug.temperature[1]:
        out.append(Reason("grant.temperature", f"temperature must be within "
                          f"{ug.temperature[0]}..{ug.temperature[1]}", "temperature"))
    if it.tools and not ug.tools:
        out.append(Reason("grant.tools", "offering tools to the model is not granted", "tools"))
    for tool in it.tools:
        if ug.tools and not ug.tool_allowed(tool.name):
            out.append(Reason("grant.tool", f"tool {tool.name} is not granted", "tools"))
    for kind in dict.fromkeys(it.hosted_tools):
        if kind not in ug.hosted_tools:
            out.append(Reason("grant.hosted_tool", f"the hosted tool {kind} is not granted",
                              "tools"))
    for url in dict.fromkeys(it.mcp_servers):
        if not ug.mcp_server_allowed(url):
            out.append(Reason("grant.mcp_server", f"the MCP server {url[:100]!r} is not granted",
                              "tools"))
    for msg in it.mcp:
        if msg.method == "tools/call" and msg.tool is not None:
            if not ug.tool_allowed(msg.tool):
                out.append(Reason("grant.tool", f"tool {msg.tool} is not granted", "params.name"))
                continue
            arguments = msg.params.get("arguments") or {}
            for arg, constraint in ug.tool_arguments(msg.tool).items():
                if arg not in arguments:
                    continue
                problem = constraint.violation(arguments[arg])
                if problem:
                    out.append(Reason("grant.argument", f"argument {arg} of {msg.tool} {problem}",
                                      f"arguments.{arg}"))
        elif msg.uri is not None and not ug.resource_allowed(msg.uri):
            out.append(Reason("grant.resource", f"resource {msg.uri} is not granted", "params.uri"))
        elif msg.prompt is not None and not ug.prompt_allowed(msg.prompt):
            out.append(Reason("grant.prompt", f"prompt {msg.prompt} is not granted", "params.name"))
    return out


def granting(policy: Policy, identity: Identity, upstream: str,
             it: Interaction) -> tuple[Grant | None, list[Reason]]:
    """The first grant that covers the interaction, or the reasons none does."""
    reasons: list[Reason] = []
    for grant, ug in policy.upstream_grants(identity.user, identity.groups, upstream):
        violations = grant_violations(ug, it)
        if not violations:
            return grant, []
        reasons = reasons or violations
    if not reasons:
        reasons = [Reason("grant.upstream", f"no grant for upstream {upstream}", "upstream")]
    return None, reasons


def granting_operation(policy: Policy, identity: Identity, upstream: str, method: str,
                       path: str) -> Grant | None:
    """The first grant naming this operation (one no parser reads) on this upstream."""
    return next((g for g, ug in policy.upstream_grants(identity.user, identity.groups, upstream)
                 if ug.grants_operation(method, path)), None)


def _labels(pieces: Iterable[TextPiece]) -> Iterable[tuple[str, TextPiece]]:
    counts: dict[str, int] = {}
    for piece in pieces:
        n = counts.get(piece.kind, 0)
        counts[piece.kind] = n + 1
        yield f"{piece.kind}[{n}]", piece


def risk(policy: Policy, pieces: list[TextPiece]) -> list[Reason]:
    """Every rule and detector that matches, once per rule, with the first field it matched.

    Rules run once over each kind's texts joined (a phrase split across messages, or mid-word
    across two tool argument values, is caught there); a `local` rule that misses the join cannot
    match any single text, so only the rules that hit it are run again per text, to name the
    field. A match only the join holds names the texts it spans (`prompt[2..3]`). A text holding
    tag characters is read both with them decoded and without them, alone and in the join."""
    found: dict[str, Reason] = {}
    # most small requests hold no secret: one test of every text read and of every run of texts
    # read as one (`_secret_runs`) proves it for each at once (a larger one's joined texts seldom
    # pass it: each is scanned, as the test would cost more)
    read = [p.text for p in pieces if p.kind in SECRET_KINDS] if policy.secrets else []
    runs = _secret_runs(pieces) if read else []
    run_texts = ["".join([p.text for p in run]) for run, _ in runs]
    size = sum(map(len, read))
    # (`all_quiet` holds for texts when it holds for each: a keys' piece known quiet is left out)
    tested = [p.text for p in pieces if p.kind in SECRET_KINDS and not (
        p.path == _KEYS_PATH and _quiet_keys(p.text))] if read and size <= QUIET_CHARS else read
    quiet = not read or size + sum(map(len, run_texts)) <= QUIET_CHARS and \
        secrets.all_quiet(tested + run_texts)
    # else the texts alone may still be (a tool call's short argument joined to its name)
    scan = not quiet and (size > QUIET_CHARS or not secrets.all_quiet(tested))
    if not scan and policy.ruled_kinds.isdisjoint([p.kind for p in pieces]) and not (
            policy.injection and any(p.kind in INJECTION_KINDS and
                                     detectors.injections(normalize(p.text)) for p in pieces)):
        # no text to look at alone (the common small request): only what a run's join holds
        for piece in pieces if read else ():
            if piece.kind in SECRET_KINDS:
                piece.secret_free = piece.text  # the recording's writer trusts it
        if not quiet:
            _split_secrets(pieces, runs, found)
        return list(found.values())
    readings: list[list[Normalized]] = [[] for _ in pieces]
    joined = _joined(policy, pieces, readings)
    # per kind, the rules worth running on each text: the local ones that hit the join, the rest
    todo = {kind: [r for r in policy.rules_by_kind[kind] if not r.local or r.matches(joins[0][0])
                   or (len(joins) > 1 and r.matches(joins[1][0]))]
            for kind, joins in joined.items()}
    for i, (label, piece) in enumerate(_labels(pieces)):
        hidden: list[Normalized] | None = None
        for rule in todo.get(piece.kind, ()):
            if rule.id in found:
                continue
            if not rule.decode_base64:
                if any(rule.matches(text) for text in readings[i]):
                    found[rule.id] = Reason(rule.id, f"deny rule {rule.id} matched", label,
                                            rule.score)
                continue
            # one text of every run decoded: linear, where a normalisation per run is not
            hidden = hidden if hidden is not None else \
                [Normalized(normalize(" ".join(decoded_base64(piece.text))))]
            if any(rule.matches(t) for t in (*readings[i], *hidden)):
                found[rule.id] = Reason(rule.id, f"deny rule {rule.id} matched", label, rule.score)
        if policy.secrets and piece.kind in SECRET_KINDS:
            text = piece.text
            found_in = secrets.find(text) if scan else []
            if not found_in:
                piece.secret_free = text  # the recording's writer trusts it (`secret_free`)
            for secret in found_in:
                kind = secret.kind
                if kind.rule not in found:
                    found[kind.rule] = Reason(kind.rule, "a high-entropy token (credential?) is "
                                              "in the text" if kind is secrets.HIGH_ENTROPY_KIND
                                              else "a secret is in the text", label, kind.score)
        if policy.injection and piece.kind in INJECTION_KINDS:
            plain = readings[i][0].text if readings[i] else normalize(piece.text)
            for rule_id, score in detectors.injections(plain):
                if rule_id not in found:
                    found[rule_id] = Reason(rule_id, "prompt-injection phrasing in a tool result",
                                            label, score)
    if not quiet:
        _split_secrets(pieces, runs, found)
    for kind, joins in joined.items():
        for rule in todo[kind]:
            for text, starts in joins:
                if len(starts) < 2 or rule.id in found or \
                        not (rule.local or rule.matches(text)):
                    continue
                span = rule.span(text)
                if span is None:
                    continue
                first, last = (bisect.bisect_right(starts, span[0]) - 1,
                               bisect.bisect_right(starts, span[1] - 1) - 1)
                found[rule.id] = Reason(rule.id, f"deny rule {rule.id} matched across texts",
                                        f"{kind}[{first}..{last}]", rule.score)
    return list(found.values())


_KNOWN_KEYS: dict[str, bool] = {}  # a keys' piece (at most QUIET_CHARS) -> `secrets.quiet` of it
KNOWN_KEYS = 1024  # the keys' pieces remembered (then all forgotten at once)


def _quiet_keys(text: str) -> bool:
    """`secrets.quiet` of a keys' piece (`fields.KEYS`: a body's keys, ids and enums), remembered:
    a client sends the same keys again and again, whatever its texts say."""
    known = _KNOWN_KEYS.get(text)
    if known is None:
        if len(_KNOWN_KEYS) >= KNOWN_KEYS:
            _KNOWN_KEYS.clear()
        known = _KNOWN_KEYS[text] = secrets.quiet(text)
    return known


def _secret_runs(pieces: list[TextPiece]) -> list[tuple[list[TextPiece], bool]]:
    """The runs of texts a secret may be split across (`_split_secrets`), each with whether a
    high-entropy run counts in it: parts in a row (a message's content parts, messages or
    Responses input items in a row) the model reads as one text, as an answer's blocks are read
    (`streams.read_together`; the recording redacts the same runs); and what else it reads in
    sequence (`streams.read_in_order`: around an image, system or instructions then the first
    message, a message then a tool call's argument values), where only a key's shape counts: two
    ordinary ids side by side make one high-entropy run."""
    # a run holds two texts a reader reads, and the keys' piece is in none (`read_together` keeps
    # it alone, `read_in_order` leaves it out): a one-message request or answer has no run
    if sum(p.path != _KEYS_PATH for p in pieces if p.kind in SECRET_KINDS) < 2:
        return []
    runs = [(run, True) for run in streams.read_together(
        [p for p in pieces if p.kind in SECRET_KINDS]) if len(run) > 1]
    return runs + [(run, False) for run in streams.read_in_order(pieces)]


def _split_secrets(pieces: list[TextPiece], runs: list[tuple[list[TextPiece], bool]],
                   found: dict[str, Reason]) -> None:
    """A secret split across the texts of a run (`_secret_runs`) that no text holds alone."""
    labels: dict[int, str] = {}
    for run, high_entropy in runs:
        for secret, first, last in secrets.find_across([p.text for p in run], high_entropy):
            rule = secret.kind.rule
            if rule not in found:  # `prompt[2..3]`, `prompt[1]..tool_arguments[0]`
                labels = labels or {id(piece): label for label, piece in _labels(pieces)}
                a, b = labels[id(run[first])], labels[id(run[last])]
                span = a[:-1] + ".." + b.split("[")[1] if a.split("[")[0] == b.split("[")[0] \
                    else f"{a}..{b}"
                found[rule] = Reason(rule, "a secret is in the text, split across its parts",
                                     span, secret.kind.score)


def _joined(policy: Policy, pieces: list[TextPiece], readings: list[list[Normalized]]
            ) -> dict[str, list[tuple[Normalized, list[int]]]]:
    """Per text kind that has rules: its texts normalised (into `readings`: decoded, and without
    tag characters when they hold some) and joined by spaces, with where each text starts in the
    join (by its index among the kind's texts). Two joins when a text holds tags."""
    texts: dict[str, list[list[Normalized]]] = {}
    for i, piece in enumerate(pieces):
        if policy.rules_by_kind[piece.kind]:
            without_tags = unseen(piece.text)
            readings[i] = [Normalized(normalize(piece.text)),
                           *([Normalized(without_tags)] if without_tags is not None else [])]
            texts.setdefault(piece.kind, []).append(readings[i])
    out = {}
    for kind, kind_texts in texts.items():
        out[kind] = [_join([r[0] for r in kind_texts])]
        if any(len(r) > 1 for r in kind_texts):
            out[kind].append(_join([r[-1] for r in kind_texts]))
    return out


def _join(texts: list[Normalized]) -> tuple[Normalized, list[int]]:
    if len(texts) == 1:
        return texts[0], [0]
    parts: list[str] = []
    starts, at = [], 0
    for text in texts:
        if parts and not (parts[-1].endswith(" ") or text.text.startswith(" ")):
            parts.append(" ")
            at += 1
        starts.append(at)
        parts.append(text.text)
        at += len(text.text)
    return Normalized("".join(parts)), starts


def tool_risk(policy: Policy, it: Interaction) -> list[Reason]:
    out = []
    for msg in it.mcp:
        if msg.method == "tools/call" and msg.tool:
            for globs, score in policy.tool_risk:
                if names_match(msg.tool, globs):
                    out.append(Reason("tool_risk", f"calling {msg.tool} is risky", "params.name",
                                      score))
                    break
    return out


def request_risk(policy: Policy, it: Interaction) -> list[Reason]:
    """Deny rules and detectors on the request's texts and on the MCP tool and prompt names it
    calls (a denied phrase is denied as a name too), then tool risk."""
    names = [TextPiece("tool_arguments" if m.tool else "prompt", "user", m.tool or m.prompt or "",
                       ("params", "name")) for m in it.mcp if m.tool or m.prompt]
    return risk(policy, it.texts + names) + tool_risk(policy, it)


def decide(policy: Policy, reasons: list[Reason], hold_allowed: bool = True) -> Decision:
    score = sum(r.score for r in reasons)
    if score >= policy.block or (not hold_allowed and score >= policy.hold):
        action = "block"
    elif score >= policy.hold:
        action = "hold"
    else:
        action = "allow"
    decision = Decision(action, reasons)
    decision.risk = score
    return decision


def evaluate(policy: Policy, identity: Identity, upstream: str, it: Interaction) -> Decision:
    """The request-side decision. Grant failures block outright; risk decides the rest."""
    grant, violations = granting(policy, identity, upstream, it)
    if grant is None:
        return Decision("block", violations, status=403)
    return decide(policy, request_risk(policy, it))


def evaluate_response(policy: Policy, pieces: list[TextPiece]) -> Decision:
    """A response cannot be held (the upstream has acted): at the hold threshold it is blocked."""
    return decide(policy, risk(policy, pieces), hold_allowed=False)


# MCP listings: the key of their items and the field a grant matches.
LISTINGS = {"tools/list": ("tools", "name"), "resources/list": ("resources", "uri"),
            "resources/templates/list": ("resourceTemplates", "uriTemplate"),
            "prompts/list": ("prompts", "name")}


def hidden_items(policy: Policy, identity: Identity, upstream: str, method: str,
                 result: dict[str, Any]) -> list[int]:
    """Indexes of listed tools, resources, resource templates or prompts the caller may not
    use."""
    grants = [ug for _, ug in policy.upstream_grants(identity.user, identity.groups, upstream)]
    key, field = LISTINGS[method]
    allowed = {
        "tools/list": lambda ug, v: ug.tool_allowed(v),
        "resources/list": lambda ug, v: uri_problem(v) is None and ug.resource_allowed(v),
        "resources/templates/list": lambda ug, v: ug.resource_allowed(v),
        "prompts/list": lambda ug, v: ug.prompt_allowed(v),
    }[method]
    hidden = []
    for i, item in enumerate(result.get(key) or []):
        value = item.get(field) if isinstance(item, dict) else None
        if not isinstance(value, str) or not any(allowed(ug, value) for ug in grants):
            hidden.append(i)
    return hidden
