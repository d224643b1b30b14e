"""A real OpenID Provider (npm `oidc-provider`, tests/support/oidc/provider.mjs) in a subprocess,
and a browser stand-in that logs a user in through its development interactions.

`scripts/test` runs `npm ci` in tests/support/oidc; without node or the package, the tests that
need it fail in CI and are skipped elsewhere.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import parse_qs, urljoin, urlsplit

import httpx
import pytest

HERE = Path(__file__).resolve().parent / "oidc"


def require_node() -> str:
    node = shutil.which("node")
    if node and (HERE / "node_modules" / "oidc-provider").is_dir():
        return node
    if os.environ.get("CI"):
        pytest.fail("node or tests/support/oidc/node_modules is missing (scripts/test runs npm ci)",
                    pytrace=False)
    pytest.skip("node and `npm ci` in tests/support/oidc are needed")


class _Form(HTMLParser):
    """The first form of a page: its action and input values."""

    def __init__(self) -> None:
        super().__init__()
        self.action: str | None = None
        self.fields: dict[str, str] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "form" and self.action is None:
            self.action = a.get("action") or ""
        elif tag in ("input", "button") and a.get("name") and a.get("name") != "abort":
            self.fields.setdefault(a["name"], a.get("value") or "")


class OidcProvider:
    def __init__(self, groups: dict[str, list[str]], access_ttl: int = 300) -> None:
        node = require_node()
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.issuer = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([node, str(HERE / "provider.mjs"), str(self.port),
                                      json.dumps(groups), str(access_ttl)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120  # node's start, on a loaded host
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.issuer + "/.well-known/openid-configuration").status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        self.close()
        raise RuntimeError("oidc-provider did not start")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def log_in(self, authorization_url: str, redirect_uri: str, user: str) -> dict[str, str]:
        """Follow the authorization request as a browser would, signing in as `user` and
        consenting, up to the redirect to the client; returns its parameters (code, state,
        iss)."""
        answer = self._browse(authorization_url, redirect_uri, user)
        assert answer is not None
        return answer

    def verify_device(self, verification_uri: str, user: str) -> None:
        """Confirm a device login's code (the `verification_uri_complete`), sign in as `user`
        and consent, up to the provider's success page."""
        self._browse(verification_uri, None, user)

    def _browse(self, url: str, redirect_uri: str | None, user: str) -> dict[str, str] | None:
        with httpx.Client(timeout=30) as browser:
            resp = browser.get(url)
            for _ in range(20):
                if resp.is_redirect:
                    location = urljoin(str(resp.url), resp.headers["location"])
                    if redirect_uri and location.startswith(redirect_uri):
                        query = parse_qs(urlsplit(location).query)
                        if "error" in query:
                            raise RuntimeError(f"authorization failed: {query}")
                        return {k: v[0] for k, v in query.items()}
                    resp = browser.get(location)
                    continue
                form = _Form()
                form.feed(resp.text)
                if redirect_uri is None and resp.status_code == 200 and "Sign-in Success" in resp.text:
                    return None
                if form.action is None:
                    raise RuntimeError(f"no form at {resp.url}: {resp.status_code} "
                                       f"{re.sub(r'<[^>]+>', ' ', resp.text)[:300]}")
                # the login page asks for a login and a password; the consent page for nothing
                fields = {**form.fields, "login": user, "password": "any"} \
                    if "login" in form.fields else form.fields
                resp = browser.post(urljoin(str(resp.url), form.action), data=fields)
        raise RuntimeError("too many steps to log in")
