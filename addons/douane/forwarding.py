"""What of a client's request head goes on to a model's provider, beside the org's key.

Headers, per protocol (the official `openai` and `anthropic` SDKs' and httpx's, read from them):
- framing, the WebSocket handshake, `user-agent`, `idempotency-key`, the SDKs' `x-stainless-*`
  telemetry and the API version (`anthropic-version`, date-shaped) carry no authority: forwarded;
- what chooses the account the org's key bills or turns on a feature is governed:
  `OpenAI-Organization` / `OpenAI-Project` are douane's to choose (a client's is refused),
  each `anthropic-beta` and `OpenAI-Beta` value passes only as a grant lists it (`betas:`,
  checked by the policy; none without one), but the API versions the openai SDK sends;
- any other header in a provider's own namespace (`openai-*`, `anthropic-*`) may be a switch
  douane does not know of: refused;
- any other header (tracing, a cookie, a framework's own) is read by no rule and meant for no
  provider: dropped, as on an MCP upstream (`routing.MCP_HEADERS`).
A query passes only with the parameters its operation documents (`QUERIES`), each once.
A generic upstream's API is the operator's to describe: framing goes on, and only the headers and
query parameters its `forward:` lists (`generic_screen`, `generic_query_problem`).
"""

from __future__ import annotations

import hashlib
import re
import urllib.parse
from collections.abc import Collection

from mitmproxy import http
from mitmproxy.http import Headers

from douane import headerfields, secrets
from douane.untrusted import loggable

FRAMING = frozenset({b"host", b"content-length", b"transfer-encoding", b"content-encoding",
                     b"content-type", b"accept", b"accept-encoding", b"connection", b"upgrade",
                     b"sec-websocket-key", b"sec-websocket-version", b"sec-websocket-protocol"})
CLIENT = frozenset({b"user-agent", b"idempotency-key"})
SDK_PREFIX = b"x-stainless-"
FORWARDED = {"openai": FRAMING | CLIENT | {b"openai-beta"},
             "anthropic": FRAMING | CLIENT | {b"anthropic-version", b"anthropic-beta"}}
NAMESPACE = {"openai": b"openai-", "anthropic": b"anthropic-"}
# known, and meant for browsers' CORS checks only: dropped
HARMLESS = frozenset({b"anthropic-dangerous-direct-browser-access"})
# the headers choosing whose account and project the org's key acts on: douane's to set
ACCOUNT = frozenset({b"openai-organization", b"openai-project"})
GOVERNED = frozenset({b"openai-beta", b"anthropic-version", b"anthropic-beta",
                      b"sec-websocket-protocol"})  # by value
# A Realtime WebSocket's subprotocols: a browser client names its key, organization and project
# there (`openai-insecure-api-key.`, `openai-organization.`, `openai-project.`): refused as the
# headers are.
SUBPROTOCOLS = {"openai": frozenset({"realtime", "openai-beta.realtime-v1"}),
                "anthropic": frozenset()}
# what the openai SDK sends for the Assistants and Realtime betas: API versions, no features
# (any other `OpenAI-Beta` value, `responses=experimental`, is a beta a grant lists)
OPENAI_BETAS = frozenset({"assistants=v2", "realtime=v1"})
BETA_HEADER = {"openai": b"openai-beta", "anthropic": b"anthropic-beta"}
VERSION = re.compile(r"\d{4}-\d{2}-\d{2}")
BETA = re.compile(r"[a-z0-9][a-z0-9._=-]{0,63}")
MOST_BETAS = 16
# A generic (operator-described) upstream: no header of its API is known to douane, so only the
# framing goes on, the handshake on a WebSocket upgrade, and what its `forward.headers` lists
# (config.py refuses hop-by-hop and credential names there)
GENERIC_FRAMING = frozenset({b"host", b"content-length", b"transfer-encoding",
                             b"content-encoding", b"content-type", b"accept", b"accept-encoding"})
WEBSOCKET_HANDSHAKE = frozenset({b"connection", b"upgrade", b"sec-websocket-key",
                                 b"sec-websocket-version", b"sec-websocket-protocol"})

_OPS = [  # (method, path below the API's version, parameters), `*` one path segment
    ("GET", "/models", ()),
    ("GET", "/files", ("after", "limit", "order", "purpose")),
    ("GET", "/batches", ("after", "limit")),
    ("GET", "/uploads", ()),
    ("GET", "/vector_stores", ("after", "before", "limit", "order")),
    ("GET", "/vector_stores/*/files", ("after", "before", "filter", "limit", "order")),
    ("GET", "/vector_stores/*/file_batches/*/files",
     ("after", "before", "filter", "limit", "order")),
    ("GET", "/assistants", ("after", "before", "limit", "order")),
    ("GET", "/threads/*/messages", ("after", "before", "limit", "order", "run_id")),
    ("GET", "/threads/*/runs", ("after", "before", "limit", "order")),
    ("POST", "/threads/*/runs", ("include",)),
    ("GET", "/threads/*/runs/*/steps", ("after", "before", "include", "limit", "order")),
    ("GET", "/threads/*/runs/*/steps/*", ("include",)),
    ("GET", "/chat/completions", ("after", "limit", "metadata", "model", "order")),
    ("GET", "/chat/completions/*/messages", ("after", "limit", "order")),
    ("GET", "/responses/*", ("include", "include_obfuscation", "starting_after", "stream")),
    ("GET", "/responses/*/input_items", ("after", "before", "include", "limit", "order")),
    ("GET", "/conversations/*/items", ("after", "include", "limit", "order")),
    ("POST", "/conversations/*/items", ("include",)),
    ("GET", "/conversations/*/items/*", ("include",)),
    ("GET", "/containers", ("after", "limit", "order")),
    ("GET", "/containers/*/files", ("after", "limit", "order")),
    ("GET", "/fine_tuning/jobs", ("after", "limit", "metadata")),
    ("GET", "/fine_tuning/jobs/*/events", ("after", "limit")),
    ("GET", "/fine_tuning/jobs/*/checkpoints", ("after", "limit")),
    ("GET", "/evals", ("after", "limit", "order", "order_by")),
    ("GET", "/evals/*/runs", ("after", "limit", "order", "status")),
    ("GET", "/evals/*/runs/*/output_items", ("after", "limit", "order", "status")),
    ("GET", "/videos", ("after", "limit", "order")),
    ("GET", "/videos/*/content", ("variant",)),
    ("GET", "/skills", ("after", "limit", "order")),
    ("GET", "/skills/*/versions", ("after", "limit", "order")),
    ("GET", "/realtime", ("model", "intent", "deployment")),  # a WebSocket's model
]
_ANTHROPIC_LIST = ("after_id", "before_id", "limit")
_ANTHROPIC_OPS = [
    ("GET", "/models", _ANTHROPIC_LIST),
    ("GET", "/files", _ANTHROPIC_LIST),
    ("GET", "/messages/batches", _ANTHROPIC_LIST),
    ("GET", "/skills", ("limit", "page", "source")),
    ("GET", "/skills/*/versions", ("limit", "page")),
]
# on every operation: Azure OpenAI's API version; the anthropic SDK's mark of a beta call
EVERYWHERE = {"openai": ("api-version",), "anthropic": ("beta",)}
# the only parameters spelt with brackets: a list (`include[]=a&include[]=b`, the SDKs' way)
# and a map (`metadata[key]=v`); any other (`limit[]=1&limit[]=2`, `after[x]=`) is a scalar
# given twice or in a shape a server may read either way
BRACKETED = {"include": False, "metadata": True}  # named: keyed (a map)


def _compile(ops: list[tuple[str, str, tuple[str, ...]]]
             ) -> list[tuple[str, re.Pattern[str], frozenset[str]]]:
    # below any prefix: `/v1`, an Azure `/openai/deployments/{name}`, an upstream's own path
    return [(method, re.compile("(?:/.*)?" + re.escape(path).replace(r"\*", "[^/]+")),
             frozenset(params)) for method, path, params in ops]


QUERIES = {"openai": _compile(_OPS), "anthropic": _compile(_ANTHROPIC_OPS)}


def parameters(protocol: str, method: str, path: str) -> frozenset[str]:
    """The query parameters `method path` documents (besides `EVERYWHERE`'s)."""
    return next((params for m, pattern, params in QUERIES[protocol]
                 if m == method and pattern.fullmatch(path)), frozenset())


def query_problem(protocol: str, method: str, path: str, query: str) -> str | None:
    """Why a model API's query is refused, or None. A name is read decoded, as servers read it,
    `include[]` / `metadata[key]` as `include` / `metadata`; no `;` (some servers split on it)."""
    if not query:  # (most requests: no parameter to look up)
        return None
    allowed = parameters(protocol, method, path) | set(EVERYWHERE[protocol])
    return _query_problem(query, allowed, BRACKETED, f"{method} {path[:100]} documents",
                          {"beta": "true"})


def generic_query_problem(query: str, allowed: frozenset[str]) -> str | None:
    """Why a generic upstream's query is refused, or None: each parameter its `forward.query`
    lists, once, spelt without brackets."""
    return _query_problem(query, allowed, {}, "this upstream's forward.query lists", {})


def query_secret(query: str) -> str | None:
    """The first query parameter whose value (decoded) holds a secret of the catalogue (tested
    first for what `find` could find, as header values are: a base64 key has no hint)."""
    for name, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
        if secrets.maybe(value) and (found := secrets.find(value, high_entropy=False)):
            return f"the query parameter {name[:40]!r} holds a secret ({found[0].kind.rule})"
    return None


def _query_problem(query: str, allowed: Collection[str], bracketed: dict[str, bool],
                   lister: str, fixed: dict[str, str]) -> str | None:
    if not query:
        return None
    if ";" in query:
        return "a ';' in the query string"
    seen: set[str] = set()
    for name, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
        base, bracket, rest = name.partition("[")
        shown = repr(base[:40])
        if base not in allowed:
            return f"the query parameter {shown} is not one {lister}"
        key = rest[:-1] if rest.endswith("]") else "["
        if bracket and (base not in bracketed or "[" in key or "]" in key
                        or bracketed[base] != bool(key)):
            return f"the query parameter {shown} is not a list or a map to spell {name[:60]!r}"
        if name in seen and not name.endswith("[]"):
            return f"the query parameter {shown} is given twice"
        if base in fixed and value != fixed[base]:
            return f"the query parameter {shown} is only ever {fixed[base]!r}"
        seen.add(name)
    return None


def screen(protocol: str, headers: Headers) -> tuple[tuple[str, str] | None, set[bytes]]:
    """(header, why) for the first header a client may not send a model's provider (None when
    none), and the headers no rule and no provider reads, to drop. One pass over the fields."""
    forwarded, namespace = FORWARDED[protocol], NAMESPACE[protocol]
    dropped: set[bytes] = set()
    values: list[tuple[bytes, bytes]] = []  # what goes on, as sent
    for raw, value in headers.fields:
        name = raw.lower()
        if (b"\n" in value or b"\r" in value) and (name in forwarded or
                                                   name.startswith(SDK_PREFIX)):
            # folded onto a continuation line (obs-fold): mitmproxy sends it on folded, and a
            # server may read the next line as a header of its own (RFC 9112: reject it)
            return (_shown(name), "its value is folded over several lines"), dropped
        if name in forwarded:
            if name in GOVERNED and (why := _governed(name, headers, protocol)):
                return (name.decode(), why), dropped
            values.append((name, value))
        elif name.startswith(SDK_PREFIX):
            values.append((name, value))
        elif name in ACCOUNT:
            return (name.decode(), "douane chooses the organization and project the org's key "
                    "acts on"), dropped
        elif name.startswith(namespace) and name not in HARMLESS:
            return (_shown(name), "douane does not know what this header would switch on"), \
                dropped
        elif (name, value.lower()) != (b"expect", b"100-continue"):  # mitmproxy's to answer
            dropped.add(name)
    return _secret(values), dropped


def generic_screen(headers: Headers, forward: frozenset[bytes], websocket: bool
                   ) -> tuple[tuple[str, str] | None, set[bytes]]:
    """`screen` for a generic upstream: framing, the WebSocket handshake on an upgrade, and what
    its `forward.headers` lists go on (none of them folded, none holding a secret as the policy
    finds one in a prompt, the entropy bar too: no rule of its API says what a value is); every
    other header is dropped."""
    kept = GENERIC_FRAMING | forward | (WEBSOCKET_HANDSHAKE if websocket else frozenset())
    dropped: set[bytes] = set()
    values: list[tuple[bytes, bytes]] = []
    for raw, value in headers.fields:
        name = raw.lower()
        if name not in kept:
            if (name, value.lower()) != (b"expect", b"100-continue"):  # mitmproxy's to answer
                dropped.add(name)
        elif b"\n" in value or b"\r" in value:
            return (_shown(name), "its value is folded over several lines"), dropped
        else:
            values.append((name, value))
    return _secret(values, high_entropy=True), dropped


DROPPED_MOST, DROPPED_CHARS = 32, 60


def dropped_names(dropped: set[bytes]) -> dict[str, object]:
    """What the audit record says of the headers dropped: their names (sorted, at most
    `DROPPED_MOST`, each cut, scrubbed and escaped: the client chose them) and how many."""
    names = sorted(dropped)
    return {"names": [loggable(n.decode("utf-8", "backslashreplace"), DROPPED_CHARS)
                      for n in names[:DROPPED_MOST]], "count": len(names)}


def folded(headers: Headers) -> str | None:
    """The first header whose value is folded over several lines (obs-fold), if any: mitmproxy
    sends it on folded, and a server may read the next line as a header of its own (RFC 9112:
    a gateway rejects it)."""
    return next((_shown(k) for k, v in headers.fields if b"\n" in v or b"\r" in v), None)


def _shown(name: bytes) -> str:
    """A header's name for a refusal (`x-stainless-*` and unknown names are the client's)."""
    return name.decode("ascii", "replace")[:60]


# Forwarded values found to hold no secret: a client's SDK sends the same few (`user-agent`,
# `x-stainless-*`, `content-type`) with every request; bounded, short values only.
_CLEAN: set[str] = set()
CLEAN_MOST, CLEAN_CHARS = 4096, 256


def _secret(values: list[tuple[bytes, bytes]], high_entropy: bool = False
            ) -> tuple[str, str] | None:
    """The first forwarded header whose value holds a secret of the catalogue (and, with
    `high_entropy`, a token over the entropy bar): a key the body's detectors refuse would reach
    the provider in a `user-agent` or an `x-stainless-*` value. Values not known clean are tested
    together first for what `find` could find (`secrets.maybe`: a hint as a model reads the
    values, a zero-width character cut aside, or a run it would decode or weigh: a base64 key
    has no hint). `_CLEAN` holds values clean of the catalogue: the entropy bar reads them all."""
    texts = [(name, text) for name, value in values if name != b"idempotency-key"  # (a digest
             and ((text := value.decode("utf-8", "surrogateescape")) not in _CLEAN  # goes on)
                  or high_entropy)]
    if texts and secrets.maybe("\n".join(text for _, text in texts)):
        for name, text in texts:
            if secrets.maybe(text) and (found := secrets.find(text, high_entropy)):
                return _shown(name), f"its value holds a secret ({found[0].kind.rule})"
    if len(_CLEAN) > CLEAN_MOST:
        _CLEAN.clear()
    _CLEAN.update(text for _, text in texts if len(text) <= CLEAN_CHARS)
    return None


def _governed(name: bytes, headers: Headers, protocol: str) -> str | None:
    value = headerfields.get(headers, name, "") or ""
    if name == b"sec-websocket-protocol":
        offered = {v.strip() for v in value.split(",")}
        if not offered <= SUBPROTOCOLS[protocol]:
            allowed = ", ".join(sorted(SUBPROTOCOLS[protocol])) or "none"
            return f"a WebSocket subprotocol is one of: {allowed} (douane sends the credential)"
    if name == b"anthropic-version" and not VERSION.fullmatch(value.strip()):
        return "anthropic-version is a date (YYYY-MM-DD)"
    if name in (b"openai-beta", b"anthropic-beta") and betas(headers, name) is None:
        return f"{name.decode()} is at most {MOST_BETAS} names of letters, digits and -._="
    return None


def betas(headers: Headers, header: bytes) -> tuple[str, ...] | None:
    """The beta features `header` (`BETA_HEADER`'s) asks for, lower case, for a grant to allow
    (the openai SDK's own API versions aside); None when malformed."""
    value = headerfields.get(headers, header)
    if value is None:
        return ()
    names = tuple(n.strip().lower() for n in value.split(",") if n.strip())
    if len(names) > MOST_BETAS or not all(BETA.fullmatch(n) for n in names):
        return None
    return tuple(n for n in names if n not in OPENAI_BETAS) if header == b"openai-beta" \
        else names


def keep(headers: Headers, names: frozenset[bytes], prefix: bytes) -> None:
    """Drop every header but `names` and those starting with `prefix` (all lower case)."""
    # `Expect: 100-continue` is mitmproxy's to answer (it takes it out after this hook)
    dropped = {k.lower() for k, v in headers.fields
               if k.lower() not in names and not k.lower().startswith(prefix)
               and (k.lower(), v.lower()) != (b"expect", b"100-continue")}
    if dropped:
        headerfields.pop(headers, dropped)


def frame_body(request: http.Request) -> None:
    """An HTTP/2 or HTTP/3 request's body needs no length header on its own connection, but
    mitmproxy hands the head on as is to an HTTP/1 upstream: a body under neither Content-Length
    nor Transfer-Encoding is read there as the next request (the upstream sees the real one
    without its body, then the body as a request of its own, its answers shifted onto the next
    request of the connection). douane holds the whole body: its length goes with it. So does
    a chunked HTTP/1 body's: mitmproxy would send it chunked under the client's spelling of
    `Transfer-Encoding` (`Chunked`), which an upstream reading only `chunked` takes for no body,
    then reads the chunks as the next request."""
    if request.raw_content is None:
        return
    if headerfields.present(request.headers, (b"transfer-encoding",)):
        headerfields.pop(request.headers, (b"transfer-encoding", b"content-length"))
        headerfields.put(request.headers, "content-length", str(len(request.raw_content)))
    elif (request.is_http2 or request.is_http3) and request.raw_content and not \
            headerfields.present(request.headers, (b"content-length",)):
        headerfields.put(request.headers, "content-length", str(len(request.raw_content)))


def own_idempotency_key(headers: Headers, user: str | None) -> None:
    """A client's `Idempotency-Key`, made its user's: a provider keys the answers it replays by
    the credential, the org's one for every user, so another user sending the same key (seen
    in a log, a screen) would be served this user's answer. Sent as a digest of the user and
    the key (bounded, still one per request); dropped where no user is known."""
    value = headerfields.get(headers, b"idempotency-key")
    if value is None:
        return
    if user is None:
        headerfields.pop(headers, (b"idempotency-key",))
        return
    own = hashlib.sha256(f"{user}\0{value}".encode("utf-8", "surrogateescape")).hexdigest()
    headerfields.put(headers, "idempotency-key", own[:40])
