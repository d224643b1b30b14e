"""The gateway's YAML configuration: loaded once, validated completely, errors with file and line.

    policies/default.yaml:14 upstreams.openai.credential.env: unknown env var OPENAI_KEY

Core sections (gateway, identity, upstreams, passthrough, audit) are parsed here. Sections owned by
other concerns are parsed by the function `SECTIONS` names, so `douane check` and start-up validate
the whole file in one pass. Relative paths are resolved against the config file's directory.
"""

from __future__ import annotations

import fnmatch
import hashlib
import importlib
import ipaddress
import os
import re
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from douane import operations

# section name -> "module:function" taking a View and returning the parsed section
SECTIONS: dict[str, str] = {
    "policy": "douane.policy.store:parse_section",
    "masking": "douane.masking.config:parse",
    "recording": "douane.recording.config:parse",
    "approvals": "douane.approvals.config:parse",
}

PROTOCOLS = ("openai", "anthropic", "mcp", "generic")
ASYMMETRIC_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
                         "ES256", "ES384", "ES512")
# Where each protocol's SDK sends its key, and so where douane injects the upstream credential.
DEFAULT_CREDENTIAL_HEADER = {"openai": ("authorization", "Bearer {secret}"),
                             "anthropic": ("x-api-key", "{secret}"),
                             "mcp": ("authorization", "Bearer {secret}")}


class ConfigError(Exception):
    def __init__(self, file: str, line: int | None, path: str, message: str):
        self.file, self.line, self.path, self.message = file, line, path, message
        where = f"{file}:{line}" if line else file
        super().__init__(f"{where} {path}: {message}" if path else f"{where}: {message}")


_REQUIRED: Any = object()


class View:
    """A mapping of the config file with its location: typed reads, errors that point at the line."""

    def __init__(self, data: dict[str, Any], path: tuple[str, ...], doc: Document):
        self.data, self.path, self.doc = data, path, doc

    def error(self, message: str, key: str | None = None) -> ConfigError:
        path = self.path + ((key,) if key is not None else ())
        return ConfigError(self.doc.file, self.doc.line_of(path), ".".join(path), message)

    def only(self, *keys: str) -> None:
        for key in self.data:
            if key not in keys:
                raise self.error(f"unknown key (expected one of: {', '.join(keys)})", str(key))

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = _REQUIRED) -> Any:
        if key not in self.data or self.data[key] is None:
            if default is _REQUIRED:
                raise self.error("required key is missing", key)
            return default
        value = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            names = " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)
            raise self.error(f"expected {names}, got {_TYPE_NAMES.get(type(value), type(value).__name__)}", key)
        return value

    def strings(self, key: str, default: Any = _REQUIRED) -> tuple[str, ...]:
        """A string or a list of strings."""
        value = self.get(key, (str, list), default)
        if value is None or isinstance(value, tuple):  # a default
            return value
        if isinstance(value, str):
            return (value,)
        if any(not isinstance(v, str) for v in value):
            raise self.error("expected a list of strings", key)
        return tuple(value)

    def size(self, key: str, default: Any = _REQUIRED) -> int:
        """A byte size: an integer, or a string such as 10m, 512k, 1g."""
        value = self.get(key, (int, str), default)
        if isinstance(value, int):
            return value
        m = re.fullmatch(r"\s*(\d+)\s*([kmg]?)b?\s*", value.lower())
        if not m:
            raise self.error(f"expected a size such as 10m or 512k, got {value!r}", key)
        return int(m.group(1)) * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[m.group(2)]

    def path_value(self, key: str, default: Any = _REQUIRED) -> Path:
        value = self.get(key, str, default)
        return self.doc.resolve(value) if isinstance(value, str) else value

    def sub(self, key: str, required: bool = False) -> View:
        value = self.get(key, dict, _REQUIRED if required else {})
        return View(value, self.path + (key,), self.doc)

    def views(self, key: str) -> Iterator[View]:
        """Each mapping of a list under `key`."""
        items = self.get(key, list, [])
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise View({}, self.path + (key, str(i)), self.doc).error("expected a mapping")
            yield View(item, self.path + (key, str(i)), self.doc)

    def named(self, key: str) -> Iterator[tuple[str, View]]:
        """Each entry of a mapping of name -> mapping under `key`."""
        for name, item in self.get(key, dict, {}).items():
            if not isinstance(item, dict):
                raise self.error("expected a mapping", f"{key}.{name}")
            yield str(name), View(item, self.path + (key, str(name)), self.doc)

    def secret(self, key: str, resolve: bool = True, beside: tuple[str, ...] = ()) -> str | None:
        """A secret given as {env: NAME} or {file: PATH}; never inline in the file. With
        resolve=False only its form is checked. `beside`: other keys its mapping may hold."""
        if key not in self.data:
            return None
        src = self.sub(key)
        src.only("env", "file", "optional", "header", "format", *beside)
        optional = src.get("optional", bool, False)
        if "env" not in src.data and "file" not in src.data:
            raise src.error("give the secret as env: NAME or file: PATH")
        if not resolve:
            return None
        try:
            if "env" in src.data:
                name = src.get("env", str)
                value = os.environ.get(name)
                if value is None and not optional:
                    raise src.error(f"unknown env var {name}", "env")
                return value
            path = src.path_value("file")
            try:
                return path.read_text().strip()
            except OSError as e:
                if optional:
                    return None
                raise src.error(f"cannot read {path}: {e.strerror}", "file") from None
        except ConfigError as e:
            if self.doc.strict_secrets:
                raise
            # An operator command: a secret it does not use must not stop it; one it uses
            # (the audit HMAC key) is looked up in `unresolved` and reported there.
            self.doc.unresolved[".".join(self.path + (key,))] = e.message
            return None


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true/false",
               list: "a list", dict: "a mapping", type(None): "nothing"}


class Document:
    """A YAML file parsed with the line of every key, so errors can point at it."""

    def __init__(self, file: str, text: str, gateway: bool = True):
        self.file, self.text = file, text
        # The gateway needs every secret; operator commands need no upstream credential, and a
        # secret they cannot resolve is noted in `unresolved` instead of failing the load.
        self.strict_secrets = self.credentials = gateway
        self.unresolved: dict[str, str] = {}
        self.base = Path(file).resolve().parent
        self._lines: dict[tuple[str, ...], int] = {}
        try:
            loader = yaml.SafeLoader(text)
            try:
                node = loader.get_single_node()
                self.data = self._build(loader, node, ()) if node is not None else {}
            finally:
                loader.dispose()
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            raise ConfigError(file, mark.line + 1 if mark else None, "",
                              f"invalid YAML: {e.problem or e.context}") from None
        if not isinstance(self.data, dict):
            raise ConfigError(file, 1, "", "the file must hold a mapping at the top level")

    def _build(self, loader: yaml.SafeLoader, node: yaml.Node, path: tuple[str, ...]) -> Any:
        self._lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            out: dict[str, Any] = {}
            for key_node, value_node in node.value:
                key = str(loader.construct_object(key_node))
                if key in out:
                    raise ConfigError(self.file, key_node.start_mark.line + 1,
                                      ".".join(path + (key,)), "duplicate key")
                self._lines[path + (key,)] = key_node.start_mark.line + 1
                out[key] = self._build(loader, value_node, path + (key,))
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self._build(loader, n, path + (str(i),)) for i, n in enumerate(node.value)]
        return loader.construct_object(node)

    def line_of(self, path: tuple[str, ...]) -> int | None:
        while path and path not in self._lines:
            path = path[:-1]
        return self._lines.get(path)

    def resolve(self, value: str) -> Path:
        p = Path(os.path.expanduser(value))
        return p if p.is_absolute() else (self.base / p).resolve()

    def root(self) -> View:
        return View(self.data, (), self)


# --- the core sections ------------------------------------------------------------------------


@dataclass(frozen=True)
class Issuer:
    issuer: str
    audiences: tuple[str, ...]
    jwks_uri: str | None  # None: discover from {issuer}/.well-known/openid-configuration
    algorithms: tuple[str, ...]
    user_claim: str
    groups_claim: str  # dotted path, e.g. realm_access.roles
    client_id: str | None = None  # the public client `douane login` uses at this issuer
    resource: str | None = None  # the resource (RFC 8707) `douane login` asks tokens for
    scopes: tuple[str, ...] = ()  # what `douane login` asks for besides openid offline_access


@dataclass(frozen=True)
class DevIssuer:
    """A local issuer for development: douane mints and accepts its own tokens."""

    enabled: bool
    issuer: str
    audience: str
    key_file: Path


@dataclass(frozen=True)
class TrustedHeaders:
    sources: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    user: str
    groups: str
    email: str

    def names(self) -> tuple[str, ...]:
        return (self.user, self.groups, self.email)


@dataclass(frozen=True)
class IdentityConfig:
    issuers: tuple[Issuer, ...]
    dev_issuer: DevIssuer | None
    trusted_headers: TrustedHeaders
    leeway_seconds: int
    jwks_refresh_seconds: int  # minimum interval between JWKS fetches for unknown kids
    jwks_timeout_seconds: int


@dataclass(frozen=True)
class Credential:
    header: str
    value: str | None = field(repr=False)  # the header value, with the secret; None: not set
    source: str = ""  # "env OPENAI_API_KEY" — for messages and the audit record, never the secret
    # sent beside it: OpenAI's `OpenAI-Organization` / `OpenAI-Project`, the account and project
    # the key bills (a client's own are refused: `douane.forwarding`)
    headers: tuple[tuple[str, str], ...] = ()
    # the secret alone (the value is the format around it): an answer echoing it is refused
    # (`routing.Broker.response`); "" when unset
    secret: str = field(default="", repr=False)


@dataclass(frozen=True)
class ResourceServer:
    """An MCP upstream's OAuth protected-resource settings (RFC 9728, RFC 8707)."""

    uri: str | None  # the resource identifier; None: the URL the client called
    scopes: tuple[str, ...]  # advertised, and required of every token
    audience: bool  # the token's aud must name this resource


@dataclass(frozen=True)
class Upstream:
    name: str
    scheme: str
    host: str  # may be a glob such as *.openai.azure.com
    port: int
    path_prefix: str
    protocol: str
    credential: Credential | None
    allow_websocket: bool = False
    # generic protocol: JSON paths (dotted, [*] for lists) of prompt and response text
    request_text_paths: tuple[str, ...] = ()
    response_text_paths: tuple[str, ...] = ()
    # (scheme, host, port) of a stand-in that serves this upstream's API (a staging provider, a
    # local model server): flows are routed and decided as this upstream, then sent there
    connect_to: tuple[str, str, int] | None = None
    resource: ResourceServer | None = None  # MCP: douane as the OAuth resource server
    # credentials.by_group: (group, credential) in config order; the first of the caller's groups
    # listed wins over `credential` (cost attribution: each team its own provider key)
    group_credentials: tuple[tuple[str, Credential], ...] = ()
    # credentials.per_user: (header, format) of a secret each user sets (`douane credentials
    # set`); a user without one is refused
    per_user: tuple[str, str] | None = None
    tool_changes: str = "hide"  # MCP: a changed or poisoned tool is hidden, or its listing refused
    origins: tuple[str, ...] = ()  # MCP: browser origins allowed besides the one called
    # generic: the client headers (lower case) and query parameters passed on besides framing
    # (`forward:`; anything else a client sends is dropped, or refused for the query)
    forward_headers: frozenset[bytes] = frozenset()
    forward_query: frozenset[str] = frozenset()

    def matches(self, host: str, port: int, path: str) -> bool:
        """`path` is normalised (douane.operations): a prefix match on it cannot be escaped."""
        return port == self.port and fnmatch.fnmatchcase(host.lower(), self.host) \
            and self.relative(path) is not None

    def relative(self, path: str) -> str | None:
        """The path below the prefix ("/" for the prefix itself); None outside of it."""
        if self.path_prefix == "/":
            return path
        if path == self.path_prefix:
            return "/"
        return path[len(self.path_prefix):] if path.startswith(self.path_prefix + "/") else None


@dataclass(frozen=True)
class Unauthenticated:
    """`audit.unauthenticated`: refusals of a client nobody authenticated (a 401, a head douane
    cannot read) are recorded one by one up to these counts per window, then counted into one
    summary record per peer address at the window's end (`douane.preauth`)."""

    per_peer: int = 20  # records per peer address per window
    total: int = 200  # records across all peers per window
    window_seconds: int = 60
    peers: int = 1000  # addresses tracked per window; past that they share one summary


@dataclass(frozen=True)
class AuditConfig:
    path: Path
    max_bytes: int
    backups: int
    hmac_key: str | None = field(repr=False, default=None)
    retention_days: int = 30  # rotation never deletes a file holding a younger record
    unauthenticated: Unauthenticated = Unauthenticated()


@dataclass(frozen=True)
class Limits:
    """Bounds on what one client can make the gateway hold or do (sizes are decoded bytes)."""

    answer_size_limit: int = 10 * 1024**2  # a whole (non-streamed) answer
    stream_size_limit: int = 64 * 1024**2  # one streamed answer, in total
    max_text_pieces: int = 10_000  # texts in one request (messages, tool results, ...)
    idle_timeout: int = 60  # seconds a connection may wait, silent, between requests
    header_timeout: int = 30  # seconds from a request's first byte to its complete headers
    body_timeout: int = 60  # seconds from a request's headers to its complete body
    answer_head_timeout: int = 600  # seconds from a request leaving to its answer's head
    answer_silence_timeout: int = 300  # seconds an answer may send nothing, once its head came
    mcp_silence_timeout: int = 900  # the same for an MCP upstream (its streams may idle)
    websocket_idle_timeout: int = 600  # seconds a WebSocket session may pass with no message
    websocket_session_timeout: int = 7200  # seconds a WebSocket session may last, however busy
    websocket_messages: int = 1_000_000  # messages (both ways) one WebSocket session may carry


@dataclass(frozen=True)
class Database:
    """The shared store (`database:`): PostgreSQL, which every replica of a fleet shares.
    Without it, each process keeps SQLite files under state_dir (the embedded default)."""

    url: str  # postgresql://USER@HOST[:PORT]/DBNAME, never with its password
    password: str | None = field(repr=False, default=None)
    pool_size: int = 10  # connections per process
    timeout: float = 5.0  # seconds a store call may take before what needs it is refused


ON_HOST_ENTRIES = 1024


@dataclass(frozen=True)
class Config:
    file: str
    version: str  # hash of the config file, written into every audit record
    state_dir: Path
    body_size_limit: int  # a request body, decoded
    identity: IdentityConfig
    upstreams: tuple[Upstream, ...]
    passthrough_hosts: tuple[str, ...]
    audit: AuditConfig
    sections: dict[str, Any] = field(default_factory=dict)
    # secrets an operator command could not resolve: config path -> why (never the value)
    unresolved: dict[str, str] = field(default_factory=dict)
    limits: Limits = Limits()
    metrics_listen: str | None = None  # HOST:PORT of /healthz and /metrics; off when None
    # the Fernet key of the per-user credential store (gateway.credentials_key); None: a key
    # generated once into state_dir
    credentials_key: str | None = field(default=None, repr=False)
    database: Database | None = None  # None: SQLite files under state_dir
    # this gateway among a fleet's (gateway.replica, default the host name) and, with
    # `scripts/run --workers`, which worker of that host: the rows it writes in a shared store
    # name it
    host: str = "local"
    worker: str = ""

    @property
    def replica(self) -> str:
        return f"{self.host}/{self.worker}" if self.worker else self.host

    # (host, port) -> the upstreams declared there, longest path prefix first: the host globs
    # are matched once per host, not on every request (bounded: hosts are the clients' choice)
    _on_host: dict[tuple[str, int], tuple[Upstream, ...]] = field(
        default_factory=dict, init=False, repr=False, compare=False)

    def upstream_for(self, host: str, port: int, path: str) -> Upstream | None:
        """The most specific declared upstream for a request (longest path prefix wins; of
        equal ones, the first declared)."""
        key = (host.lower(), port)
        on_host = self._on_host.get(key)
        if on_host is None:
            if len(self._on_host) >= ON_HOST_ENTRIES:
                self._on_host.clear()
            on_host = self._on_host[key] = tuple(sorted(
                (u for u in self.upstreams if u.matches(key[0], port, u.path_prefix)),
                key=lambda u: -len(u.path_prefix)))
        return next((u for u in on_host if u.relative(path) is not None), None)

    def passthrough(self, host: str) -> bool:
        return any(fnmatch.fnmatchcase(host.lower(), pattern) for pattern in self.passthrough_hosts)


def load(file: str | os.PathLike[str], gateway: bool = True) -> Config:
    """Load and validate. Operator commands pass gateway=False: upstream credentials are not read
    (they send no traffic), and other secrets that cannot be resolved are listed in
    `Config.unresolved` for the command that needs one to report."""
    file = str(file)
    try:
        text = Path(file).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(file, None, "", f"cannot read the config: {e.strerror}") from None
    doc = Document(file, text, gateway)
    root = doc.root()
    root.only("version", "gateway", "identity", "upstreams", "passthrough", "audit", "database",
              *SECTIONS)
    if root.get("version", int, 1) != 1:
        raise root.error("only version 1 is supported", "version")
    gateway = root.sub("gateway")
    gateway.only("state_dir", "body_size_limit", "answer_size_limit", "stream_size_limit",
                 "max_text_pieces", "websocket_messages", "timeouts", "metrics_listen",
                 "credentials_key", "replica")
    state_dir = gateway.path_value("state_dir", doc.resolve(".douane"))
    config = Config(
        file=file,
        version=hashlib.sha256(text.encode()).hexdigest()[:12],
        state_dir=state_dir,
        body_size_limit=gateway.size("body_size_limit", 10 * 1024**2),
        identity=_identity(root.sub("identity"), state_dir),
        upstreams=tuple(_upstream(name, v) for name, v in root.named("upstreams")),
        passthrough_hosts=tuple(h.lower() for h in root.sub("passthrough").strings("hosts", ())),
        audit=_audit(root.sub("audit"), state_dir),
        unresolved=doc.unresolved,
        limits=_limits(gateway),
        metrics_listen=_listen(gateway, "metrics_listen"),
        credentials_key=gateway.secret("credentials_key"),
        database=_database(root),
        host=_replica(gateway),
    )
    root.sub("passthrough").only("hosts")
    trusted = config.identity.trusted_headers
    for upstream in config.upstreams:
        named = upstream.forward_headers & {n.encode() for n in (trusted.user, trusted.groups,
                                                                 trusted.email)}
        if named:
            raise root.sub("upstreams").sub(upstream.name).sub("forward").error(
                f"{min(named).decode()} names the caller to douane (identity.trusted_headers): "
                "never passed on from a client", "headers")
    for name, target in SECTIONS.items():
        if name not in root.data:
            continue  # a section that is absent is off; `name: {}` turns it on with defaults
        module, func = target.split(":")
        parse: Callable[[View], Any] = getattr(importlib.import_module(module), func)
        config.sections[name] = parse(root.sub(name))
    return config


DATABASE_FORM = "postgresql://USER@HOST[:PORT]/DBNAME"


def _database(root: View) -> Database | None:
    """`database: postgresql://douane@db.internal/douane`, or a mapping with `url`, `password`
    ({env:}/{file:}, never in the file), `pool_size` and `timeout` (seconds)."""
    if root.data.get("database") is None:
        return None
    if isinstance(root.data["database"], str):
        v, url = View({}, ("database",), root.doc), root.data["database"]
    else:
        v = root.sub("database")
        v.only("url", "password", "pool_size", "timeout")
        url = v.get("url", str)
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if parts.scheme not in ("postgresql", "postgres") or port == -1 or \
            not parts.path.strip("/") or "/" in parts.path.strip("/"):
        # never echo a password
        shown = url if parts.password is None and "password" not in parts.query.lower() \
            else "the URL given"
        raise v.error(f"expected {DATABASE_FORM} (the shared PostgreSQL store; leave database "
                      f"out for the local SQLite default), got {shown}",
                      "url" if v.data else None)
    if parts.password is not None or "password" in parts.query.lower():
        raise v.error("the password does not belong in the URL (the file is not a secret "
                      "store): give it as database.password: {env: NAME} or {file: PATH}",
                      "url" if v.data else None)
    if not (parts.hostname or "host=" in parts.query):
        raise v.error(f"the URL names no host: expected {DATABASE_FORM}",
                      "url" if v.data else None)
    pool_size = v.get("pool_size", int, 10)
    timeout = v.get("timeout", (int, float), 5.0)
    if not 1 <= pool_size <= 100:
        raise v.error("expected 1 to 100 connections", "pool_size")
    if not 0 < timeout <= 60:
        raise v.error("expected seconds, more than 0 and at most 60", "timeout")
    return Database(url, v.secret("password") if v.data else None, pool_size, float(timeout))


REPLICA = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def _replica(gateway: View) -> str:
    """The name this gateway's rows carry in a shared store: unique in the fleet."""
    if "replica" in gateway.data:
        name = gateway.get("replica", str)
        if not REPLICA.fullmatch(name):
            raise gateway.error("expected 1-63 letters, digits, dots, dashes or underscores, "
                                "starting with a letter or digit", "replica")
        return name
    return re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()).strip("-._")[:63] or "local"


def _listen(v: View, key: str) -> str | None:
    listen = v.get(key, str, "")
    if not listen:
        return None
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise v.error(f"expected HOST:PORT such as 127.0.0.1:9464, got {listen!r}", key)
    return listen


def _limits(gateway: View) -> Limits:
    default = Limits()
    timeouts = gateway.sub("timeouts")
    timeouts.only("idle", "headers", "body", "answer_head", "answer_silence", "mcp_silence",
                  "websocket_idle", "websocket_session")
    limits = Limits(
        answer_size_limit=gateway.size("answer_size_limit", default.answer_size_limit),
        stream_size_limit=gateway.size("stream_size_limit", default.stream_size_limit),
        max_text_pieces=gateway.get("max_text_pieces", int, default.max_text_pieces),
        idle_timeout=timeouts.get("idle", int, default.idle_timeout),
        header_timeout=timeouts.get("headers", int, default.header_timeout),
        body_timeout=timeouts.get("body", int, default.body_timeout),
        answer_head_timeout=timeouts.get("answer_head", int, default.answer_head_timeout),
        answer_silence_timeout=timeouts.get("answer_silence", int,
                                            default.answer_silence_timeout),
        mcp_silence_timeout=timeouts.get("mcp_silence", int, default.mcp_silence_timeout),
        websocket_idle_timeout=timeouts.get("websocket_idle", int,
                                            default.websocket_idle_timeout),
        websocket_session_timeout=timeouts.get("websocket_session", int,
                                               default.websocket_session_timeout),
        websocket_messages=gateway.get("websocket_messages", int, default.websocket_messages))
    for key, value in (("answer_size_limit", limits.answer_size_limit),
                       ("stream_size_limit", limits.stream_size_limit),
                       ("max_text_pieces", limits.max_text_pieces),
                       ("websocket_messages", limits.websocket_messages)):
        if value < 1:
            raise gateway.error("must be positive", key)
    for key in ("idle", "headers", "body", "answer_head", "answer_silence", "mcp_silence",
                "websocket_idle", "websocket_session"):
        if timeouts.get(key, int, 1) < 1:
            raise timeouts.error("must be at least 1 second", key)
    return limits


def _identity(v: View, state_dir: Path) -> IdentityConfig:
    v.only("issuers", "dev_issuer", "trusted_headers", "leeway_seconds", "jwks_refresh_seconds",
           "jwks_timeout_seconds")
    issuers = []
    for iv in v.views("issuers"):
        iv.only("issuer", "audience", "jwks_uri", "algorithms", "user_claim", "groups_claim",
                "client_id", "resource", "scopes")
        algorithms = iv.strings("algorithms", ("RS256", "ES256"))
        for alg in algorithms:
            if alg not in ASYMMETRIC_ALGORITHMS:
                raise iv.error(f"{alg} is not allowed: only asymmetric algorithms "
                               f"({', '.join(ASYMMETRIC_ALGORITHMS)})", "algorithms")
        issuers.append(Issuer(
            issuer=iv.get("issuer", str),
            audiences=iv.strings("audience"),
            jwks_uri=iv.get("jwks_uri", str, None),
            algorithms=algorithms,
            user_claim=iv.get("user_claim", str, "email"),
            groups_claim=iv.get("groups_claim", str, "groups"),
            client_id=iv.get("client_id", str, None),
            resource=iv.get("resource", str, None),
            scopes=iv.strings("scopes", ()),
        ))
        if issuers[-1].resource is not None and issuers[-1].resource not in issuers[-1].audiences:
            # a token asked for another resource would be refused by this very issuer entry
            raise iv.error("must be one of this issuer's audience", "resource")
    dev = None
    dv = v.sub("dev_issuer")
    dv.only("enabled", "issuer", "audience", "key_file")
    if dv.get("enabled", bool, False):
        dev = DevIssuer(True, dv.get("issuer", str, "https://douane.local/dev"),
                        dv.get("audience", str, "douane"),
                        dv.path_value("key_file", state_dir / "dev-issuer-key.pem"))
    tv = v.sub("trusted_headers")
    tv.only("sources", "user", "groups", "email")
    sources = []
    for cidr in tv.strings("sources", ()):
        try:
            sources.append(ipaddress.ip_network(cidr, strict=False))
        except ValueError:
            raise tv.error(f"not an address or CIDR: {cidr!r}", "sources") from None
    trusted = TrustedHeaders(tuple(sources), tv.get("user", str, "x-auth-request-user").lower(),
                             tv.get("groups", str, "x-auth-request-groups").lower(),
                             tv.get("email", str, "x-forwarded-email").lower())
    if not issuers and dev is None and not sources:
        raise v.error("no way to authenticate: declare identity.issuers, enable "
                      "identity.dev_issuer, or trust an auth proxy in identity.trusted_headers")
    return IdentityConfig(tuple(issuers), dev, trusted, v.get("leeway_seconds", int, 30),
                          v.get("jwks_refresh_seconds", int, 30),
                          v.get("jwks_timeout_seconds", int, 5))


def _upstream(name: str, v: View) -> Upstream:
    v.only("url", "protocol", "credential", "credentials", "allow_websocket", "request_text_paths",
           "response_text_paths", "connect_to", "resource", "origins", "tool_changes", "forward")
    url = v.get("url", str)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise v.error(f"expected an http(s) URL such as https://api.openai.com, got {url!r}", "url")
    try:
        prefix_ok = operations.normalize_target(parts.path or "/") == (parts.path or "/")
    except operations.PathError:
        prefix_ok = False
    if not prefix_ok or parts.query or parts.fragment:
        raise v.error(f"the URL's path must be plain (no dot segments, //, escapes or query), "
                      f"got {url!r}", "url")
    protocol = v.get("protocol", str)
    if protocol not in PROTOCOLS:
        raise v.error(f"unknown protocol {protocol!r} (expected one of: {', '.join(PROTOCOLS)})",
                      "protocol")
    cv = v.sub("credential")
    default_header, default_format = DEFAULT_CREDENTIAL_HEADER.get(protocol, (None, "{secret}"))
    header = cv.get("header", str, default_header)
    fmt = cv.get("format", str, default_format)
    if "{secret}" not in fmt:
        raise cv.error("the format must contain {secret}", "format")
    credential = _credential(v, "credential", header, fmt, protocol) \
        if "credential" in v.data else None
    sv = v.sub("credentials")
    sv.only("by_group", "per_user")
    gv = sv.sub("by_group")
    groups = tuple((str(group), _credential(gv, str(group), header, fmt, protocol))
                   for group in gv.data)
    per_user = (header, fmt) if sv.get("per_user", bool, False) else None
    if (credential or groups or per_user) and header is None:
        raise cv.error("a generic upstream needs credential.header", "header")
    if per_user and (credential or groups):
        raise sv.error("a per-user credential is the only one of its upstream: drop credential "
                       "and credentials.by_group", "per_user")
    request_paths = v.strings("request_text_paths", ())
    response_paths = v.strings("response_text_paths", ())
    if protocol == "generic" and not (request_paths or response_paths):
        raise v.error("a generic upstream needs request_text_paths or response_text_paths")
    forward_headers, forward_query = _forward(v, protocol, header)
    return Upstream(
        name=name, scheme=parts.scheme, host=parts.hostname.lower(),
        port=parts.port or (443 if parts.scheme == "https" else 80),
        path_prefix=parts.path.rstrip("/") or "/", protocol=protocol, credential=credential,
        allow_websocket=v.get("allow_websocket", bool, False),
        request_text_paths=request_paths, response_text_paths=response_paths,
        connect_to=_connect_to(v),
        resource=_resource(v, protocol),
        origins=_origins(v, protocol),
        group_credentials=groups,
        per_user=per_user,
        tool_changes=_tool_changes(v, protocol),
        forward_headers=forward_headers,
        forward_query=forward_query,
    )


# what an OpenAI key acts on, set beside it (per credential: each team its own project)
ACCOUNT_HEADERS = {"organization": "OpenAI-Organization", "project": "OpenAI-Project"}
ACCOUNT_ID = re.compile(r"[A-Za-z0-9_-]{1,100}")


def _credential(v: View, key: str, header: str | None, fmt: str, protocol: str) -> Credential:
    """The credential given as {env:/file:} under `key`, named by its source (never its value)."""
    beside = tuple(ACCOUNT_HEADERS) if protocol == "openai" else ()
    secret = v.secret(key, resolve=v.doc.credentials, beside=beside)
    data = v.data[key]
    if key != "credential" and ("header" in data or "format" in data):
        raise v.sub(key).error("header and format are the upstream's (set them in credential)")
    account = []
    for name in beside:
        value = v.sub(key).get(name, str, None)
        if value is not None and not ACCOUNT_ID.fullmatch(value):
            raise v.sub(key).error(f"an OpenAI {name} id is letters, digits, _ and -", name)
        if value is not None:
            account.append((ACCOUNT_HEADERS[name], value))
    source = f"env {data['env']}" if "env" in data else f"file {data.get('file')}"
    return Credential((header or "").lower(), fmt.replace("{secret}", secret) if secret else None,
                      source, tuple(account), secret or "")


# never passed on from a client, so never listed in `forward.headers`: hop-by-hop headers (RFC
# 9110 7.6.1; framing and the WebSocket handshake are douane's and mitmproxy's to send) and
# credentials (douane injects the upstream's own)
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer",
                        "transfer-encoding", "upgrade"})
CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "x-api-key",
                                "api-key"})
# names that carry a credential by their word (`x-auth-token`, `x-goog-api-key`,
# `ocp-apim-subscription-key`, `x-client-secret`); an idempotency key is a request's own
CREDENTIAL_WORDS = re.compile(r"auth|token|secret|passw|cookie|api-?key|(?<!idempotency)-key$")
HEADER_NAME = re.compile(r"[a-z0-9!#$%&'*+.^_`|~-]{1,64}")
QUERY_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MOST_FORWARDED = 64


def _forward(v: View, protocol: str, credential_header: str | None
             ) -> tuple[frozenset[bytes], frozenset[str]]:
    """`forward: {headers: [...], query: [...]}` of a generic upstream: what of a client's request
    head goes on besides framing (default: nothing)."""
    if "forward" not in v.data:
        return frozenset(), frozenset()
    if protocol != "generic":
        raise v.error("forward applies to generic upstreams (douane's own lists govern what "
                      f"goes to an {protocol} upstream)", "forward")
    fv = v.sub("forward")
    fv.only("headers", "query")
    headers = [h.lower() for h in fv.strings("headers", ())]
    query = fv.strings("query", ())
    for key, names in (("headers", headers), ("query", query)):
        if len(names) > MOST_FORWARDED:
            raise fv.error(f"at most {MOST_FORWARDED} names", key)
    for name in headers:
        if not HEADER_NAME.fullmatch(name):
            raise fv.error(f"not a header name: {name[:70]!r}", "headers")
        if name in HOP_BY_HOP or name.startswith("proxy-"):
            raise fv.error(f"{name} is a hop-by-hop header: never passed on from a client",
                           "headers")
        if name in CREDENTIAL_HEADERS or name == (credential_header or "").lower() or \
                name.startswith("x-douane-") or CREDENTIAL_WORDS.search(name):
            raise fv.error(f"{name} carries a credential: never passed on from a client "
                           "(douane injects the upstream's own)", "headers")
    for name in query:
        if not QUERY_NAME.fullmatch(name):
            raise fv.error(f"not a query parameter name (letters, digits, _ . -): "
                           f"{name[:70]!r}", "query")
    return frozenset(h.encode() for h in headers), frozenset(query)


TOOL_CHANGES = ("hide", "refuse")  # what a changed or poisoned MCP tool does to listings


def _tool_changes(v: View, protocol: str) -> str:
    mode = v.get("tool_changes", str, "hide")
    if mode not in TOOL_CHANGES or ("tool_changes" in v.data and protocol != "mcp"):
        raise v.error(f"tool_changes is one of {', '.join(TOOL_CHANGES)}, on an mcp upstream",
                      "tool_changes")
    return mode


def _resource(v: View, protocol: str) -> ResourceServer | None:
    if "resource" not in v.data:
        return None
    if protocol != "mcp":
        raise v.error("only an mcp upstream is an OAuth protected resource", "resource")
    rv = v.sub("resource")
    rv.only("uri", "scopes", "audience")
    uri = rv.get("uri", str, None)
    if uri is not None:
        parts = urlsplit(uri)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query \
                or parts.fragment:
            raise rv.error(f"expected an absolute URL without query or fragment, got {uri!r}",
                           "uri")
    return ResourceServer(uri.rstrip("/") if uri else None, rv.strings("scopes", ()),
                          rv.get("audience", bool, True))


def _origins(v: View, protocol: str) -> tuple[str, ...]:
    origins = v.strings("origins", ())
    if origins and protocol != "mcp":
        raise v.error("origins apply to mcp upstreams", "origins")
    for origin in origins:
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path:
            raise v.error(f"expected an origin such as https://app.example.com, got {origin!r}",
                          "origins")
    return tuple(o.lower() for o in origins)


def _connect_to(v: View) -> tuple[str, str, int] | None:
    url = v.get("connect_to", str, None)
    if url is None:
        return None
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        raise v.error(f"expected scheme://host[:port] such as http://127.0.0.1:8000, got {url!r}",
                      "connect_to")
    return parts.scheme, parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)


def _audit(v: View, state_dir: Path) -> AuditConfig:
    v.only("path", "max_bytes", "backups", "hmac_key", "retention_days", "unauthenticated")
    retention = v.get("retention_days", int, 30)
    if retention < 0:
        raise v.error("expected a number of days (0 or more)", "retention_days")
    return AuditConfig(path=v.path_value("path", state_dir / "audit" / "audit.jsonl"),
                       max_bytes=v.size("max_bytes", 50 * 1024**2),
                       backups=v.get("backups", int, 20),
                       hmac_key=v.secret("hmac_key"), retention_days=retention,
                       unauthenticated=_unauthenticated(v.sub("unauthenticated")))


def _unauthenticated(v: View) -> Unauthenticated:
    v.only("per_peer", "total", "window_seconds", "peers")
    default = Unauthenticated()
    bounds = {"per_peer": (0, 1_000_000), "total": (0, 10_000_000), "window_seconds": (1, 86_400),
              "peers": (1, 100_000)}  # a summary each per window, and ~1 KB of memory each
    values = {}
    for key, (low, high) in bounds.items():
        values[key] = v.get(key, int, getattr(default, key))
        if not low <= values[key] <= high:
            raise v.error(f"expected an integer from {low} to {high}", key)
    if values["total"] < values["per_peer"]:
        raise v.error("expected at least per_peer", "total")
    return Unauthenticated(**values)
