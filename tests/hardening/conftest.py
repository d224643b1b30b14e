"""Shared by the hardening suite: a registry of every secret the suite uses (for the final leak
scan), a policy denying one phrase, and the assertion every case makes: refused (or caught), never
seen by the upstream, audited under the decision id the response names."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import UPSTREAM_KEY
from tests.support.gateway import REPO, Gateway, base_config
from tests.support.upstream import FakeUpstream

DENIED = "project nightingale"
COOKIE = "douane_session=oatmeal-raisin-secret-7c1f"
POLICY = """\
version: 1
default:
  upstreams:
    llm: {models: ["*"]}
    claude: {models: ["*"]}
groups:
  search:
    upstreams:
      llm: {models: ["*"], hosted_tools: [web_search], mcp_servers: ["https://mcp.example.com/*"]}
  capped:
    upstreams:
      llm: {models: ["*"], max_tokens: 100}
  nomedia:
    upstreams:
      llm: {models: ["*"], media: false}
      claude: {models: ["*"], media: false}
rules:
  - id: deny.codename
    literal: "project nightingale"
    in: [prompt, tool_arguments, tool_result, tool_description, completion]
    score: 90
    decode_base64: true
thresholds: {hold: 50, block: 80}
"""
# fault injection in the gateway process (tests/hardening/faults.py), importable by its workers
FAULT_SCRIPT = REPO / "tests" / "hardening" / "fault_script.py"
FAULT_ENV = {"PYTHONPATH": str(REPO)}


@pytest.fixture(scope="session")
def secrets() -> set[str]:
    """Every token, key and cookie the hardening suite sends; test_z_leaks scans for them."""
    return {UPSTREAM_KEY, COOKIE.split("=", 1)[1]}


@pytest.fixture(scope="module")
def tls_llm() -> Iterator[FakeUpstream]:
    """A model API served over TLS (HTTP/2 through the proxy's tunnel)."""
    upstream = FakeUpstream(tls=True)
    yield upstream
    upstream.close()


@pytest.fixture(scope="module")
def token(issuer, secrets: set[str]) -> str:
    """An ordinary caller's token (mallory, in engineering: the default grant)."""
    return token_of(issuer, secrets, "mallory@corp.example", ["engineering"])


def token_of(issuer, secrets: set[str], user: str, groups: list[str]) -> str:
    """A token for `user`, added to what test_z_leaks scans for."""
    token = issuer.mint(user, groups)
    secrets.add(token)
    return token


def write_policy(folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "policy.yaml"
    path.write_text(POLICY)
    return str(path)


def with_claude(config: dict, base_url: str) -> dict:
    """Declares the `claude` upstream POLICY grants: Anthropic under `base_url`/anthropic, with the
    tests' upstream key (the gateway's env must carry DOUANE_TEST_UPSTREAM_KEY)."""
    config["upstreams"]["claude"] = {"url": base_url + "/anthropic", "protocol": "anthropic",
                                     "credential": {"env": "DOUANE_TEST_UPSTREAM_KEY"}}
    return config


@contextlib.contextmanager
def reverse_gateway(issuer, upstream: FakeUpstream, work: Path, policy: str | dict,
                    openai_path: str = "/v1", upstreams: dict | None = None) -> Iterator[Gateway]:
    """A reverse gateway onto `upstream` (OpenAI under `openai_path`, Anthropic under /anthropic,
    with the tests' upstream key, and any more `upstreams` declared) under `policy` (YAML text,
    or a document)."""
    text = policy if isinstance(policy, str) else yaml.safe_dump(policy)
    (work / "policy.yaml").write_text(text)
    config = base_config(issuer.url, upstream.url + openai_path,
                         policy={"files": [str(work / "policy.yaml")]})
    with_claude(config, upstream.url)
    config["upstreams"].update(upstreams or {})
    with Gateway(config, mode=f"reverse:{upstream.url}", workdir=work / "gw",
                 env={"DOUANE_TEST_UPSTREAM_KEY": UPSTREAM_KEY}) as gateway:
        yield gateway


@contextlib.contextmanager
def recording_gateway(issuer, upstream: FakeUpstream, work: Path) -> Iterator[Gateway]:
    """A reverse gateway onto `upstream` (OpenAI, Anthropic under /anthropic) under POLICY, with
    recording on (the files under `gateway.state_dir / "recordings"`)."""
    config = base_config(issuer.url, upstream.url, policy={"files": [write_policy(work)]},
                         recording={})
    with_claude(config, upstream.url)
    with Gateway(config, mode=f"reverse:{upstream.url}", workdir=work / "gw",
                 env={"DOUANE_TEST_UPSTREAM_KEY": UPSTREAM_KEY}) as gateway:
        yield gateway


def assert_refused(gw: Gateway, upstream: FakeUpstream, before: int, resp: httpx.Response,
                   *statuses: int) -> dict:
    """The response is a refusal with one of `statuses`, the upstream saw nothing new, and the
    decision id in the response finds its audit record (returned)."""
    assert resp.status_code in statuses, (resp.status_code, resp.text[:300])
    assert len(upstream.requests) == before, "the upstream received a refused request"
    decision_id = resp.headers["x-douane-decision-id"]
    assert decision_id in resp.text
    record = gw.audit_record(decision_id)
    assert record["action"] in ("refuse", "block", "error", "hold"), record
    return record
