"""Ownership leftovers of stop 29 (`douane.owners`), through a real gateway: a filtered listing's
cursor naming another user's object is answered exactly as one naming no object (nothing
upstream); Anthropic's own skills (`source: anthropic`) are every user's, never the first
caller's, while the org's skills stay their users'."""

from __future__ import annotations

import json
import re

import httpx
import pytest
import yaml

from tests.hardening.conftest import POLICY, assert_refused, reverse_gateway
from tests.support.upstream import FakeUpstream

OPERATIONS = {"llm": ["GET /v1/assistants", "GET /v1/assistants/*"],
              "claude": ["GET /anthropic/v1/files", "GET /anthropic/v1/files/*",
                         "GET /anthropic/v1/skills", "GET /anthropic/v1/skills/*",
                         "GET /anthropic/v1/skills/*/versions"]}
BUILT_IN = ("pptx", "xlsx")


def answer(handler, _req) -> None:
    """The org's objects as its key sees them: any id exists; listings list every one."""
    path = handler.path.split("?")[0]
    if path == "/v1/assistants":
        doc = {"object": "list", "has_more": False, "first_id": "asst_a", "last_id": "asst_b",
               "data": [{"id": "asst_a", "object": "assistant"},
                        {"id": "asst_b", "object": "assistant"}]}
    elif path == "/anthropic/v1/files":
        doc = {"data": [{"id": "file_a", "type": "file"}, {"id": "file_b", "type": "file"}],
               "has_more": False, "first_id": "file_a", "last_id": "file_b"}
    elif path == "/anthropic/v1/skills":
        doc = {"data": [skill(i) for i in (*BUILT_IN, "skill_x")], "has_more": False,
               "next_page": None}
    elif m := re.fullmatch(r"/anthropic/v1/skills/([^/]+)/versions", path):
        doc = {"data": [{"id": "v1", "type": "skill_version", "skill_id": m[1]}],
               "has_more": False, "next_page": None}
    elif m := re.fullmatch(r"/anthropic/v1/skills/([^/]+)", path):
        doc = skill(m[1])
    else:
        doc = {"id": path.rsplit("/", 1)[-1], "object": "x"}
    handler._json(200, doc)


def skill(skill_id: str) -> dict:
    return {"id": skill_id, "type": "skill", "display_title": skill_id,
            "source": "anthropic" if skill_id in BUILT_IN else "custom"}


@pytest.fixture(scope="module")
def upstream():
    llm = FakeUpstream()
    llm.answer = answer
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def gw(issuer, upstream, tmp_path_factory):
    policy = yaml.safe_load(POLICY)
    for name, operations in OPERATIONS.items():
        policy["default"]["upstreams"][name]["operations"] = operations
    with reverse_gateway(issuer, upstream, tmp_path_factory.mktemp("sec30_owners"),
                         policy) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def users(issuer, secrets):
    tokens = tuple(issuer.mint(f"{name}@corp", ["staff"]) for name in ("alice", "bob"))
    secrets.update(tokens)
    return tokens


def get(gw, token: str, path: str) -> httpx.Response:
    return httpx.get(gw.url + path, headers={"authorization": f"Bearer {token}"}, timeout=30)


def shown(resp: httpx.Response) -> tuple[int, str, dict]:
    """What a client reads of a refusal, its decision id aside."""
    decision_id = resp.headers["x-douane-decision-id"]
    headers = {k: v for k, v in resp.headers.items()
               if k not in ("x-douane-decision-id", "date", "content-length")}
    return resp.status_code, resp.text.replace(decision_id, "ID"), headers


@pytest.mark.parametrize("listing, cursor, mine, hers", [
    ("/v1/assistants", "after", "asst_b", "asst_a"),
    ("/v1/assistants", "before", "asst_b", "asst_a"),
    ("/anthropic/v1/files", "after_id", "file_b", "file_a"),
    ("/anthropic/v1/files", "before_id", "file_b", "file_a"),
])
def test_a_cursor_naming_another_users_object_reads_as_one_naming_none(
        gw, upstream, users, listing, cursor, mine, hers):
    alice, bob = users
    assert get(gw, alice, f"{listing}/{hers}").status_code == 200  # adopted: hers
    assert get(gw, bob, f"{listing}/{mine}").status_code == 200  # his
    ok = get(gw, bob, f"{listing}?{cursor}={mine}")
    assert ok.status_code == 200 and [i["id"] for i in ok.json()["data"]] == [mine], ok.text
    answers = []
    for named in (hers, "nobody_s_9f2c"):
        before = len(upstream.requests)
        resp = get(gw, bob, f"{listing}?{cursor}={named}&limit=1")
        record = assert_refused(gw, upstream, before, resp, 404)
        assert record["reasons"][0]["rule"].startswith("owner."), record
        assert f"the {cursor} cursor" in record["reasons"][0]["message"], record
        answers.append(shown(resp))
    assert answers[0] == answers[1], answers  # nothing tells hers from none


def test_anthropics_own_skills_are_every_users(gw, upstream, users):
    alice, bob = users
    for who in (alice, bob):  # the first caller does not make it theirs
        resp = get(gw, who, "/anthropic/v1/skills/pptx")
        assert resp.status_code == 200 and resp.json()["source"] == "anthropic", resp.text
        assert get(gw, who, "/anthropic/v1/skills/pptx/versions").status_code == 200
    # the org's own skill is still its first user's
    assert get(gw, alice, "/anthropic/v1/skills/skill_x").status_code == 200
    before = len(upstream.requests)
    record = assert_refused(gw, upstream, before, get(gw, bob, "/anthropic/v1/skills/skill_x"),
                            404)
    assert record["reasons"][0]["rule"] == "owner.skill", record
    # a listing keeps Anthropic's own for everyone, the org's for their users
    assert [s["id"] for s in get(gw, bob, "/anthropic/v1/skills").json()["data"]] == \
        list(BUILT_IN)
    assert [s["id"] for s in get(gw, alice, "/anthropic/v1/skills").json()["data"]] == \
        [*BUILT_IN, "skill_x"]
    # `xlsx` was only listed: its versions are read by anyone
    for who in (bob, alice):
        assert get(gw, who, "/anthropic/v1/skills/xlsx/versions").status_code == 200


def test_an_unread_skills_versions_are_not_adopted(gw, upstream, users):
    """Only a skill's own answer says whose it is: below an unread one, refused (fail closed)."""
    alice, bob = users
    before = len(upstream.requests)
    resp = get(gw, alice, "/anthropic/v1/skills/skill_new/versions")
    record = assert_refused(gw, upstream, before, resp, 404)
    assert record["reasons"][0]["rule"] == "owner.skill", record
    assert "GET /v1/skills/{id} first" in json.dumps(record), record
    assert get(gw, alice, "/anthropic/v1/skills/skill_new").status_code == 200
    assert get(gw, alice, "/anthropic/v1/skills/skill_new/versions").status_code == 200
    before = len(upstream.requests)
    assert_refused(gw, upstream, before, get(gw, bob, "/anthropic/v1/skills/skill_new/versions"),
                   404)
