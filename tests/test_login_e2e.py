"""`douane login` / `token` / `logout` against a real OpenID Provider (npm oidc-provider): the
device grant and the authorization code + PKCE loopback flow driven as a person would, refresh
after expiry, revocation on logout, the session file's mode, and no token on the terminal."""

from __future__ import annotations

import os
import re
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
import openai
import pytest
import yaml

from douane import config as configmod
from douane.commands.connect import _parse
from douane.login import Session, Store
from tests.support.gateway import base_config
from tests.support.oidc_provider import OidcProvider
from tests.support.upstream import DEFAULT_REPLY

DOUANE = Path(sys.executable).parent / "douane"
RESOURCE = "https://llm.douane.test"
ACCESS_TTL = 30  # seconds: `douane token` renews past half of it (15 s)


@pytest.fixture(scope="module")
def provider():
    p = OidcProvider({"alice": ["engineering"]}, access_ttl=ACCESS_TTL)
    yield p
    p.close()


def login_config(provider: OidcProvider, path: Path, **identity) -> Path:
    config = {"version": 1, "identity": {"issuers": [{
        "issuer": provider.issuer, "audience": [RESOURCE], "client_id": "douane-cli",
        "resource": RESOURCE, **identity}]}}
    path.write_text(yaml.safe_dump(config))
    return path


class Cli:
    """`douane` as a person runs it: its own home ($DOUANE_HOME), no browser that opens."""

    def __init__(self, config: Path, home: Path) -> None:
        self.config, self.home = config, home
        self.env = {**os.environ, "DOUANE_HOME": str(home), "BROWSER": "false"}
        self.terminal: list[str] = []  # everything douane printed

    def start(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen([str(DOUANE), *args, "--config", str(self.config)], env=self.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([str(DOUANE), *args, "--config", str(self.config)], env=self.env,
                              capture_output=True, text=True, timeout=120)
        self.terminal.append(done.stderr)
        return done

    def read_until(self, proc: subprocess.Popen[str], pattern: str) -> re.Match[str]:
        seen = ""
        assert proc.stderr
        while line := proc.stderr.readline():
            seen += line
            if m := re.search(pattern, seen):
                self.terminal.append(seen)
                return m
        raise AssertionError(f"douane ended without {pattern!r}: {seen}")

    def finish(self, proc: subprocess.Popen[str]) -> int:
        out, err = proc.communicate(timeout=120)
        self.terminal.append(out + err)
        return proc.returncode

    def session_files(self) -> list[Path]:
        return sorted((self.home / "sessions").glob("*.json"))

    def token(self) -> str:
        done = self.run("token")
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()


def verified(provider: OidcProvider, token: str) -> dict:
    keys = jwt.PyJWKClient(httpx.get(provider.issuer + "/.well-known/openid-configuration")
                           .json()["jwks_uri"])
    return jwt.decode(token, keys.get_signing_key_from_jwt(token).key, algorithms=["RS256"],
                      audience=RESOURCE, issuer=provider.issuer)


def device_login(cli: Cli, provider: OidcProvider) -> None:
    proc = cli.start("login", "--device")
    where = cli.read_until(proc, r"visit (\S+)\n\s+and enter the code (\S+)")
    assert "user_code=" in where.group(1)
    provider.verify_device(where.group(1), "alice")
    assert cli.finish(proc) == 0


def test_device_login_refresh_and_logout(provider, tmp_path):
    cli = Cli(login_config(provider, tmp_path / "douane.yaml"), tmp_path / "home")
    assert cli.run("token").returncode == 1  # not logged in yet
    device_login(cli, provider)

    [session] = cli.session_files()
    assert stat.S_IMODE(session.stat().st_mode) == 0o600
    assert stat.S_IMODE(session.parent.stat().st_mode) == 0o700
    first = cli.token()
    claims = verified(provider, first)
    assert claims["email"] == "alice@corp.example" and claims["groups"] == ["engineering"]
    assert cli.token() == first  # still fresh: not renewed

    time.sleep(claims["exp"] - ACCESS_TTL / 2 - time.time() + 1)  # past half its life
    # several credential-helper runs at once renew once: the issuer rotates refresh tokens and
    # takes a spent one's reuse for theft (it revokes the grant), so they must not race
    procs = [cli.start("token") for _ in range(3)]
    renewed = {p.communicate(timeout=120)[0].strip() for p in procs}
    assert [p.returncode for p in procs] == [0, 0, 0]
    [second] = renewed
    assert second != first and cli.token() == second
    assert verified(provider, second)["email"] == "alice@corp.example"
    refresh_token = yaml.safe_load(session.read_text())["refresh_token"]

    assert cli.run("logout").returncode == 0
    assert cli.session_files() == []
    assert "not logged in" in cli.run("token").stderr
    # revoked at the issuer too
    token_endpoint = httpx.get(provider.issuer + "/.well-known/openid-configuration"
                               ).json()["token_endpoint"]
    refused = httpx.post(token_endpoint, data={"grant_type": "refresh_token",
                                               "refresh_token": refresh_token,
                                               "client_id": "douane-cli", "resource": RESOURCE})
    assert refused.status_code == 400 and refused.json()["error"] == "invalid_grant"
    assert cli.run("logout").stderr.endswith(f"no session at {provider.issuer}\n")
    for printed in cli.terminal:
        assert first not in printed and second not in printed and refresh_token not in printed


def test_browser_login_with_pkce_and_a_loopback_redirect(provider, tmp_path):
    cli = Cli(login_config(provider, tmp_path / "douane.yaml"), tmp_path / "home")
    proc = cli.start("login")
    url = cli.read_until(proc, r"visit:\n\s+(\S+)\n").group(1)
    query = parse_qs(urlsplit(url).query)
    assert query["code_challenge_method"] == ["S256"] and "code_verifier" not in query
    redirect_uri = query["redirect_uri"][0]
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/callback", redirect_uri)
    answer = provider.log_in(url, redirect_uri, "alice")
    # a page the person's browser opens first with another state is not taken for the answer
    assert httpx.get(redirect_uri, params={**answer, "state": "forged"}).status_code == 200
    assert cli.finish(proc) == 1
    assert "does not match" in cli.terminal[-1]
    # an answer that names another issuer (RFC 9207: a mix-up) is refused too
    proc = cli.start("login")
    url = cli.read_until(proc, r"visit:\n\s+(\S+)\n").group(1)
    redirect_uri = parse_qs(urlsplit(url).query)["redirect_uri"][0]
    answer = provider.log_in(url, redirect_uri, "alice")
    assert answer["iss"] == provider.issuer
    httpx.get(redirect_uri, params={**answer, "iss": "https://evil.example"})
    assert cli.finish(proc) == 1
    assert "another issuer" in cli.terminal[-1] and cli.session_files() == []

    proc = cli.start("login")
    url = cli.read_until(proc, r"visit:\n\s+(\S+)\n").group(1)
    redirect_uri = parse_qs(urlsplit(url).query)["redirect_uri"][0]
    answer = provider.log_in(url, redirect_uri, "alice")
    assert "Logged in" in httpx.get(redirect_uri, params=answer).text
    assert cli.finish(proc) == 0
    token = cli.token()
    assert verified(provider, token)["email"] == "alice@corp.example"
    [session] = cli.session_files()
    assert stat.S_IMODE(session.stat().st_mode) == 0o600
    assert yaml.safe_load(session.read_text())["refresh_token"]  # offline_access was granted
    assert all(token not in printed for printed in cli.terminal)


def test_login_needs_a_client_id(provider, tmp_path):
    config = tmp_path / "douane.yaml"
    config.write_text(yaml.safe_dump({"version": 1, "identity": {"issuers": [{
        "issuer": provider.issuer, "audience": [RESOURCE]}]}}))
    done = Cli(config, tmp_path / "home").run("login", "--device")
    assert done.returncode != 0 and "client_id" in done.stderr


def test_connect_carries_the_openai_sdk_across_token_expiry(provider, make_gateway, upstream,
                                                           tmp_path, monkeypatch):
    config = base_config(provider.issuer, upstream.url, audience=RESOURCE)
    config["identity"]["issuers"][0].update(client_id="douane-cli", resource=RESOURCE)
    config["identity"]["leeway_seconds"] = 0  # an expired token is refused at once
    config["upstreams"]["openai"] = {"url": "https://api.openai.com/v1", "protocol": "openai",
                                     "credential": {"env": "DOUANE_TEST_UPSTREAM_KEY"},
                                     "connect_to": upstream.url}
    gw = make_gateway(config)
    cli = Cli(gw.config_file, tmp_path / "home")
    device_login(cli, provider)
    [session] = cli.session_files()
    first = yaml.safe_load(session.read_text())
    proc = cli.start("connect", "--gateway", gw.url)
    try:
        proxy = cli.read_until(proc, r"HTTPS_PROXY=(http://douane:\S+@127\.0\.0\.1:(\d+))\n")
        proxy, port = proxy.group(1), proxy.group(2)
        key_file = cli.home / "connect-key"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600 and key_file.read_text() in proxy
        # another local user, without the forwarder's key, does not borrow alice's identity
        for stranger in (f"http://127.0.0.1:{port}", f"http://douane:guess@127.0.0.1:{port}"):
            with pytest.raises(httpx.ProxyError, match="407"):
                httpx.get("https://api.openai.com/v1/models", proxy=stranger)
        assert upstream.requests == []
        # as a person sets it up: the SDK's defaults, two environment variables
        monkeypatch.setenv("HTTPS_PROXY", proxy)
        monkeypatch.setenv("SSL_CERT_FILE", str(gw.ca_file))
        client = openai.OpenAI(api_key="unused")
        tokens, calls = set(), 0
        # past the first token's expiry (the gateway allows no leeway): requests go on working
        while time.time() < first["expires_at"] + 2:
            reply = client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
            assert reply.choices[0].message.content == DEFAULT_REPLY
            calls += 1
            tokens.add(yaml.safe_load(session.read_text())["access_token"])
            time.sleep(0.5)
        assert len(tokens) >= 2  # the token was renewed during the run
        assert len(upstream.requests) == calls
        assert all(r.headers["authorization"] != f"Bearer {t}" for r in upstream.requests
                   for t in tokens)
        records = gw.audit_records(wait_for=calls)
        assert {(r["user"], r["action"]) for r in records if r.get("upstream") == "openai"} == {
            ("alice@corp.example", "allow")}
        # plain HTTP through the forwarder: each request its own connection and token
        plain = openai.OpenAI(base_url=upstream.url + "/v1", api_key="unused", max_retries=0,
                              http_client=openai.DefaultHttpxClient(proxy=proxy))
        assert plain.chat.completions.create(model="gpt-4o-mini", messages=[
            {"role": "user", "content": "hi"}]).choices[0].message.content == DEFAULT_REPLY
        # what is not a proxy request is refused by the forwarder itself
        assert raw(port, b"hello\r\n\r\n").startswith(b"HTTP/1.1 400 ")
        assert raw(port, b"GET http://x/ HTTP/1.1\r\nx: " + b"a" * 66_000 + b"\r\n\r\n"
                   ).startswith(b"HTTP/1.1 431 ")
    finally:
        proc.terminate()
        cli.finish(proc)
    last = yaml.safe_load(session.read_text())
    secrets = tokens | {first["refresh_token"], last["refresh_token"]}
    written = [f for f in gw.dir.rglob("*") if f.is_file() and f.suffix != ".pem"]
    assert written and gw.log_file in written
    for f in written:
        data = f.read_bytes()
        assert not any(s.encode() in data for s in secrets), f
    assert not any(s in printed for s in secrets for printed in cli.terminal)


def raw(port: str, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", int(port)), timeout=30) as sock:
        sock.sendall(data)
        return sock.recv(200)


@pytest.mark.parametrize("head", [
    b"GET http://x/ HTTP/1.1\r\nx: a\r\n folded\r\n\r\n",  # obs-fold
    b"GET http://x/ HTTP/1.1\r\nx: a\x00b\r\n\r\n",
    b"GET http://x/ HTTP/1.1\r\nx y: a\r\n\r\n",
    b"GET http://x/ HTTP/2\r\n\r\n",
    b"get http://x/ HTTP/1.1\r\n\r\n",
    b"GET http://x/\x01 HTTP/1.1\r\n\r\n",
    b"GET http://x/ HTTP/1.1\r\n" + b"x: a\r\n" * 101 + b"\r\n",
])
def test_the_forwarder_reads_only_plain_proxy_request_heads(head):
    assert _parse(head) is None


def test_the_forwarder_parses_a_connect():
    assert _parse(b"CONNECT api.openai.com:443 HTTP/1.1\r\nHost: api.openai.com:443\r\n"
                  b"Proxy-Authorization: Basic eA==\r\n\r\n") == (
        "CONNECT api.openai.com:443 HTTP/1.1",
        [("Host", "api.openai.com:443"), ("Proxy-Authorization", "Basic eA==")])


def test_logout_forgets_the_session_when_the_issuer_is_unreachable(tmp_path, monkeypatch):
    config = tmp_path / "douane.yaml"
    config.write_text(yaml.safe_dump({"version": 1, "identity": {"issuers": [{
        "issuer": "http://127.0.0.1:9", "audience": [RESOURCE], "client_id": "douane-cli"}]}}))
    cli = Cli(config, tmp_path / "home")
    monkeypatch.setenv("DOUANE_HOME", str(cli.home))
    issuer = configmod.load(config, gateway=False).identity.issuers[0]
    Store(issuer).save(Session(issuer.issuer, "douane-cli", "at", "rt", time.time() - 1, 60))
    assert len(cli.session_files()) == 1
    assert "cannot reach" in cli.run("token").stderr  # stale, and no issuer to renew it
    done = cli.run("logout")
    assert done.returncode == 0 and "logged out of" in done.stderr
    assert cli.session_files() == []
