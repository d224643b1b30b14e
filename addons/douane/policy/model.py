"""The policy file format, parsed once into compiled, immutable objects.

```yaml
version: 1
default:                      # the authenticated but unlisted
  upstreams:
    openai: {models: ["gpt-4o-mini"], max_tokens: 1000}
groups:
  engineering:
    upstreams:
      openai:
        models: ["gpt-4*", "o*"]    # globs; default: any
        max_tokens: 8000            # ceiling on max_tokens / max_completion_tokens
        stream: true                # default true
        tools: true                 # may offer tools to the model; default true
        hosted_tools: [web_search]  # provider-run tools allowed; default none
        mcp_servers: ["https://mcp.example.com/*"]   # remote MCP servers a model may use; default none
        media: true                 # images, audio, files; default true
        temperature: [0, 1.2]       # allowed range; default any
        operations: ["GET /v1/models", "GET /v1/files/*/content"]  # what douane does not parse
        betas: ["responses=experimental"]  # anthropic-beta / OpenAI-Beta values (globs); default none
      crm:                          # an MCP upstream
        tools:
          allow: ["lookup_*", "delete_records"]
          deny: ["*_admin"]
          arguments:                # per tool, per argument: regex, enum, range, prefix, max_length
            lookup_customer: {customer_id: {regex: "^[0-9]{1,10}$"}}
            delete_records: {table: {enum: [sessions, cache]}, limit: {range: [1, 100]}}
        resources: ["file:///docs/*"]
        prompts: ["summarize"]
    limits: {requests_per_minute: 60, tokens_per_day: 2000000}   # per user of the group
                              # batch_size: 20 -> at most 20 JSON-RPC messages per MCP request
users:
  alice@corp.example:         # same shape as a group; added to her groups' grants
    upstreams: {anthropic: {models: ["claude-*"]}}
rules:                        # deny rules: each match adds its score
  - id: internal.hostnames
    regex: "\\bcorp-db-[0-9]+\\b"     # or literal: "..."; matched on normalised text
    in: [prompt, tool_arguments]      # text kinds; default [prompt, tool_arguments]
    score: 60
    decode_base64: false              # also match inside base64 runs and behind escapes (%70, \\u0070, &#112;)
detectors: {secrets: true, injection: true}   # built-in detectors (scores in detectors.py)
tool_risk:                    # risk of calling a tool, by name glob
  - {tools: ["delete_*", "exec*", "*_write"], score: 50}
thresholds: {hold: 50, block: 80}   # total score: >= hold -> approval, >= block -> refuse
```

A caller's grants are the union of the grants of their user entry and of each of their groups
(or `default` when none applies): a request passes when one grant allows all of it.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import re
import re._constants as _constants
import re._parser as _parser
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from douane import operations
from douane.config import ConfigError, Document, View
from douane.interaction import HOSTED_TOOLS
from douane.operations import Operation
from douane.policy.normalize import (
    Normalized,
    fold_pattern,
    normalize,
    skeleton,
    skeleton_pattern,
)

KINDS = ("prompt", "tool_description", "tool_arguments", "tool_result", "resource", "completion")


@functools.lru_cache(maxsize=4096)  # names repeat; at most 128 characters each (mcp.NAME_CHARS)
def name_key(name: str) -> str:
    """A tool name as deny lists, argument constraints and tool risk compare it: normalised as
    deny rules see text (case, width, look-alikes, invisible characters) and stripped."""
    return normalize(name).strip()


GLOB_TOKENS = re.compile(r"(\*|\?|\[[^\]]*\])")


@functools.lru_cache(maxsize=1024)
def glob_key(glob: str) -> str:
    """A name glob normalised like `name_key`, its wildcards kept."""
    return "".join(part if GLOB_TOKENS.fullmatch(part) else normalize(part)
                   for part in GLOB_TOKENS.split(glob)).strip()


def names_match(name: str, globs: tuple[str, ...]) -> bool:
    key = name_key(name)
    return any(fnmatch.fnmatchcase(key, glob_key(g)) for g in globs)


@functools.lru_cache(maxsize=1024)
def uri_glob(glob: str) -> re.Pattern[str]:
    """A resource glob: `*` is any run of characters but `/` (one path segment), `**` any run,
    `?` one character but `/`; everything else is literal."""
    return re.compile("".join({"**": ".*", "*": "[^/]*", "?": "[^/]"}.get(part, re.escape(part))
                              for part in re.split(r"(\*\*|\*|\?)", glob)))


@dataclass(frozen=True)
class ArgConstraint:
    regex: re.Pattern[str] | None = None
    enum: tuple[object, ...] | None = None
    range: tuple[float, float] | None = None
    prefix: str | None = None
    max_length: int | None = None

    def violation(self, value: object) -> str | None:
        if self.enum is not None and value not in self.enum:
            return "is not one of the allowed values"
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if self.range is not None and not (number and self.range[0] <= value <= self.range[1]):
            return f"is outside {self.range[0]}..{self.range[1]}"
        if self.regex is None and self.prefix is None and self.max_length is None:
            return None
        if not isinstance(value, str):
            return "must be a string"
        if self.regex is not None and not self.regex.fullmatch(value):
            return "does not match the allowed pattern"
        # no escaping the prefix with ../ segments or backslashes
        if self.prefix is not None and (not value.startswith(self.prefix)
                                        or "/../" in f"/{value}/" or "\\" in value):
            return f"is not under {self.prefix}"
        if self.max_length is not None and len(value) > self.max_length:
            return f"is longer than {self.max_length}"
        return None


REMEMBERED_ANSWERS = 4096  # per grant and per policy


@dataclass(frozen=True)
class UpstreamGrant:
    models: tuple[str, ...] | None  # None: any
    max_tokens: int | None
    stream: bool
    tools: bool
    media: bool
    temperature: tuple[float, float] | None
    tools_allow: tuple[str, ...]  # MCP tool globs ("*" when unspecified)
    tools_deny: tuple[str, ...]
    arguments: dict[str, dict[str, ArgConstraint]]  # by normalised tool name
    resources: tuple[str, ...]
    prompts: tuple[str, ...]
    hosted_tools: tuple[str, ...] = ()  # HOSTED_TOOLS kinds; none unless named
    mcp_servers: tuple[str, ...] = ()  # URL globs of remote MCP servers; none unless named
    operations: tuple[Operation, ...] = ()  # operations no parser reads, allowed by name
    org_listings: bool = False  # its operations may list every user's stored objects
    betas: tuple[str, ...] = ()  # beta header value globs (lower case) it allows; none unless named

    def beta_allowed(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, g) for g in self.betas)

    # the answers below for the names requests repeat (a grant never changes: a new policy
    # makes new grants); bounded, as the names are the clients'
    _answers: dict[tuple[str, str], bool] = field(default_factory=dict, init=False, repr=False,
                                                  compare=False)

    def grants_operation(self, method: str, path: str) -> bool:
        return any(op.matches(method, path) for op in self.operations)

    def _remembered(self, what: str, name: str, answer) -> bool:
        key = (what, name)
        known = self._answers.get(key)
        if known is None:
            if len(self._answers) >= REMEMBERED_ANSWERS:
                self._answers.clear()
            known = self._answers[key] = answer(name)
        return known

    def model_allowed(self, model: str) -> bool:
        return self.models is None or self._remembered(
            "model", model, lambda m: any(fnmatch.fnmatchcase(m, g) for g in self.models or ()))

    def tool_allowed(self, name: str) -> bool:
        """Allow globs match the name as sent (a variant of an allowed name is not allowed);
        deny globs match it normalised (any variant of a denied name is denied)."""
        return self._remembered("tool", name, lambda n: any(
            fnmatch.fnmatchcase(n, g) for g in self.tools_allow) and not names_match(
            n, self.tools_deny))

    def tool_arguments(self, name: str) -> dict[str, ArgConstraint]:
        """The argument constraints of a tool, by its normalised name."""
        return self.arguments.get(name_key(name), {})

    def resource_allowed(self, uri: str) -> bool:
        return any(uri_glob(g).fullmatch(uri) for g in self.resources)

    def prompt_allowed(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, g) for g in self.prompts)

    def mcp_server_allowed(self, url: str) -> bool:
        target = server_url(url)
        return target is not None and any(uri_glob(g).fullmatch(target)
                                          for g in self.mcp_servers)


def server_url(url: str) -> str | None:
    """A remote MCP server's `scheme://host[:port]/path` (query ignored), or None for a URL that
    could be read two ways (credentials, dot segments, percent-encoding in the path)."""
    if url.startswith("connector:"):
        return url
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme, path = parts.scheme.lower(), parts.path or "/"
    if scheme not in ("http", "https") or not parts.hostname or "@" in parts.netloc or \
            "%" in path or "\\" in url or any(s in (".", "..") for s in path.split("/")):
        return None
    default = {"http": 80, "https": 443}[scheme]
    return f"{scheme}://{parts.hostname}{f':{port}' if port not in (None, default) else ''}{path}"


@dataclass(frozen=True)
class Limits:
    requests_per_minute: int | None = None
    tokens_per_day: int | None = None
    batch_size: int | None = None  # JSON-RPC messages in one MCP request


@dataclass(frozen=True)
class Grant:
    source: str  # "group engineering", "user alice@...", "default"
    upstreams: dict[str, UpstreamGrant]
    limits: Limits


# Skeletons of literals at least this long are matched anywhere, even inside longer words; shorter
# ones only between word edges; and a literal with fewer letters than SHORTEST_SKELETON only as
# written (`ssn` would be found in "%s%s\n" and `pii` in "(p, 1, 1)").
UNBOUNDED_SKELETON = 12
SHORTEST_SKELETON = 4
# Regex syntax whose meaning depends on what surrounds a match (conservative: `[^...]` counts too).
EDGE_SENSITIVE = re.compile(r"[\^$]|\\[AZz]|\(\?<?[=!]")


@dataclass(frozen=True)
class Rule:
    id: str
    pattern: re.Pattern[str]  # compiled on normalised text
    kinds: frozenset[str]
    score: float
    decode_base64: bool
    # A substring every match contains: the regex only runs on texts that hold it (Python's re
    # has no multi-pattern engine, so this keeps 100 rules cheap on the common, clean text).
    required: str | None
    # A literal's letters and digits (leetspeak read as letters), also looked for in a text's
    # skeleton: separators and punctuation between letters do not hide it. A `bounded` (short)
    # one must start and end at word edges (`acme merger` is in the skeleton of "pacme-merger").
    skeleton: str | None = None
    bounded: bool = False

    def matches(self, text: Normalized) -> bool:
        if self.skeleton is not None:  # a literal: its skeleton is in every text it is in
            return self.skeleton in text.skeleton and (
                not self.bounded or self.required in text.text  # type: ignore[operator]
                or any(self.letters.search(r) for r in text.readings))
        return (self.required is None or self.required in text.text) and \
            self.pattern.search(text.text) is not None

    def span(self, text: Normalized) -> tuple[int, int] | None:
        """Where the rule first matches in the normalised text."""
        found = self.pattern.search(text.text)
        if found or self.skeleton is None:
            return found.span() if found else None
        return next((m.span() for r in text.readings if (m := self.letters.search(r))), None)

    @functools.cached_property
    def letters(self) -> re.Pattern[str]:
        """A literal's skeleton, found in a text's readings."""
        return skeleton_pattern(self.skeleton or "", self.bounded)

    @functools.cached_property
    def local(self) -> bool:
        """A match inside one text is also a match inside texts joined by spaces: no anchors or
        lookarounds (which see a text's edges) and no base64 decoding (which sees each text)."""
        return not self.decode_base64 and not EDGE_SENSITIVE.search(self.pattern.pattern)


@dataclass(frozen=True, eq=False)
class Policy:
    version: str  # hash of the policy files
    files: tuple[Path, ...]
    default: Grant | None
    groups: dict[str, Grant]
    users: dict[str, Grant]
    rules: tuple[Rule, ...]
    secrets: bool
    injection: bool
    tool_risk: tuple[tuple[tuple[str, ...], float], ...]
    hold: float
    block: float
    # (user, groups, upstream) -> `upstream_grants`; bounded (groups come from tokens)
    _upstream_grants: dict[tuple[str, tuple[str, ...], str],
                           tuple[tuple[Grant, UpstreamGrant], ...]] = field(
        default_factory=dict, init=False, repr=False)

    @functools.cached_property
    def rules_by_kind(self) -> dict[str, tuple[Rule, ...]]:
        return {kind: tuple(r for r in self.rules if kind in r.kinds) for kind in KINDS}

    @functools.cached_property
    def ruled_kinds(self) -> frozenset[str]:
        """The text kinds some deny rule reads."""
        return frozenset(kind for kind, rules in self.rules_by_kind.items() if rules)

    def grants_for(self, user: str, groups: tuple[str, ...]) -> list[Grant]:
        found = ([self.users[user]] if user in self.users else []) + \
            [self.groups[g] for g in groups if g in self.groups]
        return found or ([self.default] if self.default else [])

    def upstream_grants(self, user: str, groups: tuple[str, ...],
                        upstream: str) -> tuple[tuple[Grant, UpstreamGrant], ...]:
        """The caller's grants naming the upstream, in order: decided once per caller and
        upstream for this policy (a reload makes a new policy, so a new answer)."""
        key = (user, groups, upstream)
        found = self._upstream_grants.get(key)
        if found is None:
            if len(self._upstream_grants) >= REMEMBERED_ANSWERS:
                self._upstream_grants.clear()
            found = self._upstream_grants[key] = tuple(
                (g, g.upstreams[upstream]) for g in self.grants_for(user, groups)
                if upstream in g.upstreams)
        return found


def load(files: list[Path], upstreams: frozenset[str] | None = None) -> Policy:
    """Parse and merge policy files; later files add groups, users and rules. With `upstreams`
    (the names the configuration declares), a grant naming any other upstream is an error: it
    would never apply, and a typo must not silently leave a grant off."""
    default, groups, users, rules = None, {}, {}, []
    secrets = injection = True
    tool_risk: list[tuple[tuple[str, ...], float]] = []
    hold, block = 50.0, 80.0
    digest = hashlib.sha256()
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(str(path), None, "", f"cannot read the policy file: {e.strerror}") \
                from None
        digest.update(text.encode())
        root = Document(str(path), text).root()
        root.only("version", "default", "groups", "users", "rules", "detectors", "tool_risk",
                  "thresholds")
        if "default" in root.data:
            default = _grant("default", root.sub("default"), upstreams)
        groups.update({n: _grant(f"group {n}", v, upstreams) for n, v in root.named("groups")})
        users.update({n: _grant(f"user {n}", v, upstreams) for n, v in root.named("users")})
        rules += [_rule(v) for v in root.views("rules")]
        det = root.sub("detectors")
        det.only("secrets", "injection")
        secrets = det.get("secrets", bool, secrets)
        injection = det.get("injection", bool, injection)
        for v in root.views("tool_risk"):
            v.only("tools", "score")
            tool_risk.append((v.strings("tools"), v.get("score", float)))
        th = root.sub("thresholds")
        th.only("hold", "block")
        hold, block = th.get("hold", float, hold), th.get("block", float, block)
        if hold > block:
            raise th.error("hold must not be above block")
    return Policy(digest.hexdigest()[:12], tuple(files), default, groups, users, tuple(rules),
                  secrets, injection, tuple(tool_risk), hold, block)


def _grant(source: str, v: View, upstreams: frozenset[str] | None) -> Grant:
    v.only("upstreams", "limits")
    for name, uv in v.named("upstreams"):
        if upstreams is not None and name not in upstreams:
            raise uv.error(f"no upstream named {name!r} is declared in the configuration "
                           f"(declared: {', '.join(sorted(upstreams)) or 'none'})")
    lv = v.sub("limits")
    lv.only("requests_per_minute", "tokens_per_day", "batch_size")
    limits = Limits(lv.get("requests_per_minute", int, None), lv.get("tokens_per_day", int, None),
                    lv.get("batch_size", int, None))
    return Grant(source, {name: _upstream_grant(uv) for name, uv in v.named("upstreams")}, limits)


def _upstream_grant(v: View) -> UpstreamGrant:
    v.only("models", "max_tokens", "stream", "tools", "media", "temperature", "resources",
           "prompts", "hosted_tools", "mcp_servers", "operations", "org_listings", "betas")
    ops = []
    for n, text in enumerate(v.strings("operations", ())):
        try:
            ops.append(operations.parse(text))
        except ValueError as e:
            raise View(v.data, v.path + ("operations", str(n)), v.doc).error(str(e)) from None
    tools = v.data.get("tools", True)
    allow: tuple[str, ...] = ("*",)
    deny: tuple[str, ...] = ()
    arguments: dict[str, dict[str, ArgConstraint]] = {}
    if isinstance(tools, dict):
        tv = v.sub("tools")
        tv.only("allow", "deny", "arguments")
        allow, deny = tv.strings("allow", ("*",)), tv.strings("deny", ())
        for tool, av in tv.named("arguments"):
            constraints = arguments.setdefault(name_key(tool), {})
            for arg, c in av.data.items():
                if not isinstance(c, dict):
                    raise av.error("expected a mapping of constraints", str(arg))
                constraints[str(arg)] = _constraint(View(c, av.path + (str(arg),), av.doc))
        tools = True
    elif not isinstance(tools, bool):
        raise v.error("expected true/false or a mapping with allow/deny/arguments", "tools")
    temperature = v.get("temperature", list, None)
    if temperature is not None and (len(temperature) != 2 or not all(
            isinstance(t, int | float) for t in temperature)):
        raise v.error("expected [min, max]", "temperature")
    hosted = v.strings("hosted_tools", ())
    for kind in hosted:
        if kind not in HOSTED_TOOLS:
            raise v.error(f"unknown hosted tool {kind!r} (expected: {', '.join(HOSTED_TOOLS)}; "
                          "remote MCP servers go in mcp_servers)", "hosted_tools")
    servers = v.strings("mcp_servers", ())
    for glob in servers:
        if not glob.startswith(("https://", "http://", "connector:")) or \
                server_url(glob.replace("*", "x")) is None:
            raise v.error(f"expected an http(s) URL glob or connector:ID, not {glob!r}",
                          "mcp_servers")
    return UpstreamGrant(
        models=v.strings("models", None), max_tokens=v.get("max_tokens", int, None),
        stream=v.get("stream", bool, True), tools=tools, media=v.get("media", bool, True),
        temperature=tuple(temperature) if temperature else None,
        tools_allow=allow, tools_deny=deny, arguments=arguments,
        resources=v.strings("resources", ("*",)), prompts=v.strings("prompts", ("*",)),
        hosted_tools=hosted, mcp_servers=servers, operations=tuple(ops),
        org_listings=v.get("org_listings", bool, False),
        betas=tuple(b.lower() for b in v.strings("betas", ())))


def _constraint(v: View) -> ArgConstraint:
    v.only("regex", "enum", "range", "prefix", "max_length")
    regex = v.get("regex", str, None)
    try:
        compiled = re.compile(regex) if regex is not None else None
    except re.error as e:
        raise v.error(f"invalid regex: {e}", "regex") from None
    rng = v.get("range", list, None)
    if rng is not None and (len(rng) != 2 or not all(isinstance(x, int | float) for x in rng)):
        raise v.error("expected [min, max]", "range")
    enum = v.get("enum", list, None)
    return ArgConstraint(compiled, tuple(enum) if enum is not None else None,
                         tuple(rng) if rng else None, v.get("prefix", str, None),
                         v.get("max_length", int, None))


def _rule(v: View) -> Rule:
    v.only("id", "regex", "literal", "in", "score", "decode_base64")
    rule_id = v.get("id", str)
    if ("regex" in v.data) == ("literal" in v.data):
        raise v.error("give exactly one of regex or literal")
    if "regex" in v.data:
        try:
            pattern = re.compile(fold_pattern(v.get("regex", str)), re.IGNORECASE)
        except re.error as e:
            raise v.error(f"invalid regex: {e}", "regex") from None
        required = required_literal(pattern.pattern)
        letters = None
    else:
        required = normalize(v.get("literal", str))
        pattern = re.compile(re.escape(required))
        letters = skeleton(required).split("\n")[-1]  # punctuation in a literal is punctuation
        letters = letters if len(letters) >= SHORTEST_SKELETON else None
    kinds = v.strings("in", ("prompt", "tool_arguments"))
    for kind in kinds:
        if kind not in KINDS:
            raise v.error(f"unknown text kind {kind!r} (expected: {', '.join(KINDS)})", "in")
    return Rule(rule_id, pattern, frozenset(kinds), v.get("score", float, 100.0),
                v.get("decode_base64", bool, False), required, letters,
                letters is not None and len(letters) < UNBOUNDED_SKELETON)


def required_literal(regex: str) -> str | None:
    """The longest run of plain characters that every match of `regex` contains (lower-cased,
    as texts are case-folded before matching), or None when there is none of 3 or more."""
    try:
        parsed = _parser.parse(regex)
    except re.error:
        return None
    best, run = "", ""
    for op, arg in parsed:
        if op is _constants.LITERAL and chr(arg).isascii():
            run += chr(arg).lower()
        else:
            if op is _constants.BRANCH:
                return None
            best, run = max(best, run, key=len), ""
    best = max(best, run, key=len)
    return best if len(best) >= 3 and normalize(best) == best else None
