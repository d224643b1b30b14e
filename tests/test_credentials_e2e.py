"""Per-group and per-user upstream credentials through a real mitmdump: each team's requests reach
the upstream with its own key, a user's own secret (`douane credentials set`) reaches only that
user's requests, a user without one is refused before anything is sent, and no secret is written
anywhere (store encrypted, recordings, audit, log)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from douane.usersecrets import UserSecrets
from tests.conftest import UPSTREAM_KEY
from tests.support.gateway import REPO, Gateway, base_config
from tests.support.issuer import TestIssuer
from tests.support.upstream import FakeUpstream
from tests.test_approvals_e2e import api_url

DOUANE = Path(sys.executable).parent / "douane"
TEAM_A_KEY = "sk-team-a-0123456789abcdefghijklmnopqrstuv"
TEAM_B_KEY = "sk-team-b-0123456789abcdefghijklmnopqrstuv"
FRANK_PAT = "ghp_frank0123456789abcdefghijklmnopqrstuvw"
ALICE_PAT = "ghp_alice0123456789abcdefghijklmnopqrstuvwx"
BOB_PAT = "ghp_bob0123456789abcdefghijklmnopqrstuvwxyz"
SECRETS = (UPSTREAM_KEY, TEAM_A_KEY, TEAM_B_KEY, ALICE_PAT, BOB_PAT, FRANK_PAT)
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def gw(issuer: TestIssuer, llm: FakeUpstream, tmp_path_factory) -> Gateway:
    config = base_config(issuer.url, llm.url, recording={},
                         approvals={"listen": "127.0.0.1:0", "approver_groups": ["approvers"]})
    config["upstreams"]["llm"]["credentials"] = {
        "by_group": {"team-a": {"env": "T_TEAM_A_KEY"}, "team-b": {"env": "T_TEAM_B_KEY"}}}
    config["upstreams"]["acting"] = {"url": llm.url + "/acting", "protocol": "openai",
                                     "credentials": {"per_user": True}}
    env = {"DOUANE_TEST_UPSTREAM_KEY": UPSTREAM_KEY, "T_TEAM_A_KEY": TEAM_A_KEY,
           "T_TEAM_B_KEY": TEAM_B_KEY}
    with Gateway(config, mode=f"reverse:{llm.url}", env=env,
                 workdir=tmp_path_factory.mktemp("creds")) as gw:
        for user, secret in (("alice@corp.example", ALICE_PAT), ("bob@corp.example", BOB_PAT)):
            douane(gw, "set", "acting", "--user", user, stdin=secret + "\n")
        yield gw


def douane(gw: Gateway, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([DOUANE, "credentials", "--config", str(gw.config_file), *args],
                          input=stdin, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc


def post(gw: Gateway, token: str, prefix: str = "") -> httpx.Response:
    return httpx.post(f"{gw.url}{prefix}/v1/chat/completions", json=CHAT, timeout=30,
                      headers={"authorization": f"Bearer {token}"})


@pytest.mark.parametrize(("groups", "key", "source"), [
    (["team-a"], TEAM_A_KEY, "env T_TEAM_A_KEY"),
    (["team-b"], TEAM_B_KEY, "env T_TEAM_B_KEY"),
    (["other", "team-b", "team-a"], TEAM_A_KEY, "env T_TEAM_A_KEY"),  # config order decides
    (["engineering"], UPSTREAM_KEY, "env DOUANE_TEST_UPSTREAM_KEY"),  # no group listed
])
def test_each_group_reaches_the_upstream_with_its_own_key(gw, issuer, llm, groups, key, source):
    llm.requests.clear()
    resp = post(gw, issuer.mint("carol@corp.example", groups))
    assert resp.status_code == 200, resp.text
    (received,) = llm.requests
    assert received.headers["authorization"] == f"Bearer {key}"
    record = gw.audit_record(resp.headers["x-douane-decision-id"])
    assert record["credential"] == source  # cost attribution: the source, never the value


@pytest.mark.parametrize(("user", "secret"), [("alice@corp.example", ALICE_PAT),
                                              ("bob@corp.example", BOB_PAT)])
def test_a_users_own_secret_reaches_only_their_requests(gw, issuer, llm, user, secret):
    llm.requests.clear()
    resp = post(gw, issuer.mint(user, ["team-a"]), "/acting")
    assert resp.status_code == 200, resp.text
    (received,) = llm.requests
    assert received.path == "/acting/v1/chat/completions"
    assert received.headers["authorization"] == f"Bearer {secret}"
    assert gw.audit_record(resp.headers["x-douane-decision-id"])["credential"] == \
        "per-user secret"


def test_a_user_without_a_secret_is_refused_and_told_how_to_set_it(gw, issuer, llm):
    llm.requests.clear()
    resp = post(gw, issuer.mint("dave@corp.example", ["team-a"]), "/acting")
    assert resp.status_code == 403
    error = resp.json()["error"]
    assert error["code"] == "user_credential_missing"
    assert "douane credentials set acting --user dave@corp.example" in error["message"]
    assert llm.requests == []
    record = gw.audit_record(resp.headers["x-douane-decision-id"])
    assert record["action"] == "refuse" and record["credential"] is None
    assert record["reasons"][0]["rule"] == "route.no_user_credential"


def test_list_and_delete_name_pairs_never_secrets(gw, issuer, llm):
    douane(gw, "set", "acting", "--user", "erin@corp.example", stdin="ghp_erin_secret_value_01\n")
    listed = douane(gw, "list", "--all").stdout
    assert "acting\terin@corp.example" in listed and "acting\talice@corp.example" in listed
    assert "ghp_" not in listed
    assert douane(gw, "list", "--user", "erin@corp.example").stdout == "acting\terin@corp.example\n"
    douane(gw, "delete", "acting", "--user", "erin@corp.example")
    assert "erin" not in douane(gw, "list", "--all").stdout
    llm.requests.clear()
    assert post(gw, issuer.mint("erin@corp.example"), "/acting").status_code == 403
    assert llm.requests == []


def test_a_store_file_renamed_to_another_user_is_no_credential(gw, issuer, llm):
    store = gw.state_dir / "user-credentials"
    files = sorted(store.glob("*.fernet"))
    assert len(files) >= 2
    # bob's encrypted file put in place of alice's: it names bob, so alice has no secret
    alice = UserSecrets(gw.state_dir)._file("acting", "alice@corp.example")
    bob = UserSecrets(gw.state_dir)._file("acting", "bob@corp.example")
    saved = alice.read_bytes()
    alice.write_bytes(bob.read_bytes())
    try:
        llm.requests.clear()
        assert post(gw, issuer.mint("alice@corp.example"), "/acting").status_code == 403
        assert llm.requests == []
    finally:
        alice.write_bytes(saved)


def test_a_user_sets_their_own_secret_with_their_token(gw, issuer, llm):
    """Self-service through the approvals API: only the caller's own entries, any user."""
    api = api_url(gw)
    frank, george = issuer.mint("frank@corp.example"), issuer.mint("george@corp.example")
    as_frank = ("--url", api, "--token", frank)
    douane(gw, *as_frank, "set", "acting", stdin=FRANK_PAT + "\n")
    assert douane(gw, *as_frank, "list").stdout == "acting\n"
    assert douane(gw, "--url", api, "--token", george, "list").stdout == ""
    llm.requests.clear()
    assert post(gw, frank, "/acting").status_code == 200
    assert post(gw, george, "/acting").status_code == 403
    (received,) = llm.requests
    assert received.headers["authorization"] == f"Bearer {FRANK_PAT}"
    # no token, a forged one, an upstream that takes no per-user secret: refused, nothing stored
    assert httpx.put(f"{api}/credentials/acting", json={"secret": "x"}).status_code == 401
    assert httpx.put(f"{api}/credentials/acting", json={"secret": "x"},
                     headers={"authorization": f"Bearer {frank[:-4]}AAAA"}).status_code == 401
    assert httpx.put(f"{api}/credentials/llm", json={"secret": "x"},
                     headers={"authorization": f"Bearer {frank}"}).status_code == 404
    douane(gw, *as_frank, "delete", "acting")
    assert douane(gw, *as_frank, "list").stdout == ""
    llm.requests.clear()
    assert post(gw, frank, "/acting").status_code == 403
    assert llm.requests == []
    for event in ("credential.set", "credential.deleted"):
        (record,) = gw.audit_where(lambda r, e=event: r.get("event") == e)
        assert (record["user"], record["upstream"]) == ("frank@corp.example", "acting")


def test_a_config_for_a_per_user_upstream_is_checked(gw):
    proc = subprocess.run([DOUANE, "credentials", "--config", str(gw.config_file), "set", "llm",
                           "--user", "x"], input="s\n", capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0 and "credentials.per_user" in proc.stderr


def test_z_no_secret_is_written_anywhere(gw):
    """After the others: the store is encrypted; recordings, audit and log hold no secret."""
    gw.audit_records(wait_for=1)
    written = [p for p in gw.dir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".mitm" for p in written) and any(p.suffix == ".fernet"
                                                             for p in written)
    for path in written:
        data = path.read_bytes()
        for secret in SECRETS:
            assert secret.encode() not in data, f"{secret[:8]}... in {path}"
