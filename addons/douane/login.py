"""A person's session at the configured OpenID Provider: `douane login` once, then fresh access
tokens for `douane token` and `douane connect` without pasting anything.

The flows are authlib's OAuth 2.0 client (PKCE, token refresh, revocation); the loopback redirect
(RFC 8252) and the device authorization request (RFC 8628), which authlib has no client for, are
small code here. The refresh token is kept in one file per issuer and client under the user's
config dir (`$DOUANE_HOME`, else `$XDG_CONFIG_HOME/douane`, else `~/.config/douane`), mode 0600;
refreshing takes a file lock, so concurrent `douane token` runs never spend a rotated refresh token
twice (which an issuer may punish by revoking the whole grant).
"""

from __future__ import annotations

import fcntl
import hashlib
import http.server
import json
import os
import secrets
import sys
import tempfile
import time
import webbrowser
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
from authlib.integrations.base_client.errors import OAuthError
from authlib.integrations.httpx_client import OAuth2Client

from douane.config import Config, Issuer
from douane.untrusted import escape, loggable

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
TIMEOUT = 30  # seconds, every request to the issuer
LOGIN_SECONDS = 600  # the person has this long to finish logging in
MAX_METADATA = 256 * 1024  # bytes of an issuer's discovery document
FRESH_MARGIN = 60  # seconds: a token closer than this to expiry (or past half its life) is renewed


class LoginError(Exception):
    """What went wrong, fit for the terminal (never a token)."""


@dataclass
class Session:
    issuer: str
    client_id: str
    access_token: str
    refresh_token: str | None
    expires_at: float
    lifetime: float  # seconds the access token was issued for

    def fresh(self, now: float) -> bool:
        return now < self.expires_at - min(FRESH_MARGIN, self.lifetime / 2)


def home() -> Path:
    if os.environ.get("DOUANE_HOME"):
        return Path(os.environ["DOUANE_HOME"])
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "douane"


def pick_issuer(config: Config, wanted: str | None) -> Issuer:
    """The issuer to log in at: `wanted`, else the first one with a client_id."""
    usable = [i for i in config.identity.issuers if i.client_id]
    if wanted:
        usable = [i for i in usable if i.issuer == wanted]
    if not usable:
        which = f"issuer {wanted}" if wanted else "identity.issuers entry"
        raise LoginError(f"no {which} has a client_id: `douane login` needs the public client "
                         "registered for it at your identity provider")
    return usable[0]


class Store:
    """The session of one issuer+client for this user, in a 0600 file."""

    def __init__(self, issuer: Issuer) -> None:
        assert issuer.client_id
        self.issuer = issuer
        name = hashlib.sha256(f"{issuer.issuer}\n{issuer.client_id}".encode()).hexdigest()[:24]
        self.path = home() / "sessions" / f"{name}.json"

    def load(self) -> Session | None:
        try:
            data = json.loads(self.path.read_text())
            return Session(**data)
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as e:
            raise LoginError(f"{self.path} is damaged ({type(e).__name__}): run `douane logout`, "
                             "then `douane login`") from None

    def save(self, session: Session) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".session.")  # mode 0600
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(asdict(session), f)
            os.replace(tmp, self.path)
        except BaseException:
            os.unlink(tmp)
            raise

    def forget(self) -> None:
        self.path.unlink(missing_ok=True)

    @contextmanager
    def locked(self) -> Iterator[None]:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.path.with_suffix(".lock"), os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


class Login:
    """The OAuth client of one configured issuer."""

    def __init__(self, issuer: Issuer) -> None:
        self.issuer = issuer
        self.store = Store(issuer)
        self._metadata: dict[str, Any] | None = None

    @property
    def scope(self) -> str:
        return " ".join(dict.fromkeys(("openid", "offline_access", *self.issuer.scopes)))

    def extra(self) -> dict[str, str]:
        return {"resource": self.issuer.resource} if self.issuer.resource else {}

    def metadata(self) -> dict[str, Any]:
        if self._metadata is None:
            url = self.issuer.issuer.rstrip("/") + "/.well-known/openid-configuration"
            try:
                resp = httpx.get(url, timeout=TIMEOUT)
            except httpx.HTTPError as e:
                raise LoginError(f"cannot reach {url}: {type(e).__name__}") from None
            if resp.status_code != 200 or len(resp.content) > MAX_METADATA:
                raise LoginError(f"{url}: HTTP {resp.status_code}")
            try:
                meta = resp.json()
            except ValueError:
                meta = None
            if not isinstance(meta, dict) or meta.get("issuer") != self.issuer.issuer:
                raise LoginError(f"{url} is not this issuer's discovery document")
            self._metadata = meta
        return self._metadata

    def endpoint(self, name: str) -> str:
        url = self.metadata().get(name)
        if not isinstance(url, str):
            raise LoginError(f"{self.issuer.issuer} has no {name}")
        return url

    def client(self, **kwargs: Any) -> OAuth2Client:
        return OAuth2Client(client_id=self.issuer.client_id, token_endpoint_auth_method="none",
                            scope=self.scope, timeout=TIMEOUT, **kwargs)

    def _keep(self, token: dict[str, Any], refresh_token: str | None = None) -> Session:
        try:
            lifetime = min(max(float(token.get("expires_in") or 300), 1.0), 86400.0)
        except (TypeError, ValueError):
            lifetime = 300.0
        session = Session(self.issuer.issuer, str(self.issuer.client_id), token["access_token"],
                          token.get("refresh_token") or refresh_token,
                          time.time() + lifetime, lifetime)
        self.store.save(session)
        return session

    # --- logging in ----------------------------------------------------------------------------

    def with_browser(self, out: Any = sys.stderr) -> Session:
        """Authorization code + PKCE with a one-shot loopback redirect (RFC 8252)."""
        with _Loopback() as loopback:
            verifier = secrets.token_urlsafe(64)
            with self.client(redirect_uri=loopback.redirect_uri,
                             code_challenge_method="S256") as client:
                # prompt=consent: OpenID Providers issue a refresh token only with consent
                url, state = client.create_authorization_url(
                    self.endpoint("authorization_endpoint"), code_verifier=verifier,
                    prompt="consent", **self.extra())
                print(f"douane: log in at {self.issuer.issuer} in your browser; if it does not "
                      f"open, visit:\n  {escape(url)}", file=out, flush=True)
                with suppress(webbrowser.Error):
                    webbrowser.open(url)
                answer = loopback.wait(time.monotonic() + LOGIN_SECONDS)
                if answer.get("state") != state:
                    raise LoginError("the answer to the login does not match its request (state)")
                if "iss" in answer and answer["iss"] != self.issuer.issuer:
                    raise LoginError("the answer to the login comes from another issuer (iss)")
                if "error" in answer or "code" not in answer:
                    raise LoginError(f"login refused: {loggable(answer.get('error'), 64)}")
                token = self._token(client.fetch_token, self.endpoint("token_endpoint"),
                                    code=answer["code"], code_verifier=verifier, **self.extra())
        return self._keep(token)

    def with_device(self, out: Any = sys.stderr) -> Session:
        """The device authorization grant (RFC 8628): a code to enter on any other device."""
        try:
            resp = httpx.post(self.endpoint("device_authorization_endpoint"), timeout=TIMEOUT,
                              data={"client_id": self.issuer.client_id, "scope": self.scope,
                                    **self.extra()})
            grant = resp.json() if resp.status_code == 200 else {}
        except (httpx.HTTPError, ValueError):
            grant = {}
        if not isinstance(grant.get("device_code"), str):
            raise LoginError(f"{self.issuer.issuer} refused the device authorization request")
        where = grant.get("verification_uri_complete") or grant.get("verification_uri")
        print(f"douane: to log in, visit {loggable(where, 512)}\n  and enter the code "
              f"{loggable(grant.get('user_code'), 64)}", file=out, flush=True)
        interval = _seconds(grant.get("interval"), 5, 60)
        deadline = time.monotonic() + _seconds(grant.get("expires_in"), 600, LOGIN_SECONDS)
        with self.client() as client:
            while time.monotonic() < deadline:
                time.sleep(interval)
                try:
                    token = client.fetch_token(self.endpoint("token_endpoint"),
                                               grant_type=DEVICE_GRANT,
                                               device_code=grant["device_code"], **self.extra())
                except OAuthError as e:
                    if e.error == "authorization_pending":
                        continue
                    if e.error == "slow_down":
                        interval += 5
                        continue
                    raise LoginError(f"login refused: {loggable(e.error, 64)}") from None
                except httpx.HTTPError as e:
                    raise LoginError(f"cannot reach the issuer: {type(e).__name__}") from None
                return self._keep(token)
        raise LoginError("the login was not completed in time")

    # --- using the session ---------------------------------------------------------------------

    def session(self) -> Session:
        session = self.store.load()
        if session is None:
            raise LoginError(f"not logged in at {self.issuer.issuer}: run `douane login`")
        return session

    def access_token(self) -> Session:
        """A session whose access token is fresh, refreshed (under the lock) when it is not."""
        session = self.session()
        if session.fresh(time.time()):
            return session
        with self.store.locked():
            session = self.session()  # another process may have refreshed it meanwhile
            if session.fresh(time.time()):
                return session
            if not session.refresh_token:
                raise LoginError("the session has expired and the issuer gave no refresh token: "
                                 "run `douane login` again")
            with self.client() as client:
                token = self._token(client.refresh_token, self.endpoint("token_endpoint"),
                                    refresh_token=session.refresh_token, **self.extra())
            return self._keep(token, session.refresh_token)

    def logout(self) -> bool:
        """Forget the session, revoking its refresh token where the issuer can; True if there
        was one."""
        with self.store.locked():
            session = self.store.load()
            if session is None:
                return False
            try:
                revocation = self.metadata().get("revocation_endpoint")
            except LoginError:
                revocation = None  # unreachable: forgotten here all the same
            if session.refresh_token and isinstance(revocation, str):
                # forgotten here even if the issuer cannot be reached: it expires there
                with self.client() as client, suppress(httpx.HTTPError):
                    client.revoke_token(revocation, token=session.refresh_token,
                                        token_type_hint="refresh_token")
            self.store.forget()
            return True

    @staticmethod
    def _token(call: Any, url: str, **kwargs: Any) -> dict[str, Any]:
        try:
            token = call(url, **kwargs)
        except OAuthError as e:
            if e.error == "invalid_grant":
                raise LoginError("the issuer no longer accepts this session: run `douane login` "
                                 "again") from None
            raise LoginError(f"the issuer refused: {loggable(e.error, 64)}") from None
        except httpx.HTTPError as e:
            raise LoginError(f"cannot reach the issuer: {type(e).__name__}") from None
        if not isinstance(token.get("access_token"), str):
            raise LoginError("the issuer answered without an access token")
        return dict(token)


def _seconds(value: object, default: int, most: int) -> int:
    """A duration the issuer gave (interval, expires_in), within 1..most seconds."""
    try:
        return max(1, min(int(value or default), most))  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return default


class _Loopback(http.server.HTTPServer):
    """A one-shot HTTP server on 127.0.0.1 (a random port) receiving the login's redirect."""

    def __init__(self) -> None:
        self.answer: dict[str, str] | None = None
        super().__init__(("127.0.0.1", 0), _Callback)
        self.timeout = 1

    @property
    def redirect_uri(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/callback"

    def wait(self, deadline: float) -> dict[str, str]:
        while self.answer is None:
            if time.monotonic() > deadline:
                raise LoginError("the login was not completed in time")
            self.handle_request()
        return self.answer


class _Callback(http.server.BaseHTTPRequestHandler):
    server: _Loopback
    timeout = 10  # a local client that connects and says nothing does not hold the login

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        url = urlsplit(self.path)
        if url.path != "/callback" or self.server.answer is not None:
            self.send_error(404)
            return
        self.server.answer = {k: v[0] for k, v in parse_qs(url.query[:8192]).items()}
        body = b"<!doctype html><title>douane</title><p>Logged in: you can close this window."
        self.send_response(200)
        self.send_header("content-type", "text/html; charset=utf-8")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # the query holds the authorization code: never logged
