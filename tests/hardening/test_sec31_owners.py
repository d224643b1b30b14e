"""Anthropic's own skills a first caller adopted before stop 30 bound built-ins to no user
(`douane.owners`): the store still says they are that user's. Anthropic's pre-built skills are
every user's on read whatever the store says (the binding moved to `anthropic built-in` on that
read); any other skill an answer shows as `source: anthropic` is moved there by the upstream's
word when listed, over the adoption. The org's own skills stay their users'. Through a real
gateway whose store holds the old adoptions."""

from __future__ import annotations

import re
import time

import pytest
import yaml

from douane import owners
from tests.hardening.conftest import POLICY, assert_refused, reverse_gateway
from tests.hardening.test_sec30_owners import OPERATIONS, get, skill, users  # noqa: F401
from tests.support.upstream import FakeUpstream

BUILT_IN = ("pptx", "xlsx", "canvas")  # `canvas`: one Anthropic's docs did not list at stop 30
# adopted by alice before stop 30: two of Anthropic's, one its docs do not name, her own
ADOPTED = ("pptx", "xlsx", "canvas", "skill_x")


def answer(handler, _req) -> None:
    path = handler.path.split("?")[0]
    if path == "/anthropic/v1/skills":
        doc = {"data": [one(i) for i in (*BUILT_IN, "skill_x")], "has_more": False,
               "next_page": None}
    elif m := re.fullmatch(r"/anthropic/v1/skills/([^/]+)/versions", path):
        doc = {"data": [{"id": "v1", "type": "skill_version", "skill_id": m[1]}],
               "has_more": False, "next_page": None}
    elif m := re.fullmatch(r"/anthropic/v1/skills/([^/]+)", path):
        doc = one(m[1])
    else:
        doc = {"id": path.rsplit("/", 1)[-1], "object": "x"}
    handler._json(200, doc)


def one(skill_id: str) -> dict:
    return {**skill(skill_id), "source": "anthropic" if skill_id in BUILT_IN else "custom"}


@pytest.fixture(scope="module")
def upstream():
    llm = FakeUpstream()
    llm.answer = answer
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def gw(issuer, upstream, tmp_path_factory):
    work = tmp_path_factory.mktemp("sec31_owners")
    state = work / "gw" / "state"
    state.mkdir(parents=True)
    db = owners.connect(state / "owners.sqlite3")
    rows = [p for i in ADOPTED for p in (owners.digest("claude", "skills", i), "skills",
                                          "alice@corp", "claude", time.time())]
    db.execute(owners._bind(len(ADOPTED)).replace("%s", "?"), rows)
    db.close()
    policy = yaml.safe_load(POLICY)
    for name, operations in OPERATIONS.items():
        policy["default"]["upstreams"][name]["operations"] = operations
    with reverse_gateway(issuer, upstream, work, policy) as gateway:
        yield gateway


def owner_of(gw, skill_id: str) -> str | None:
    db = owners.connect(gw.state_dir / "owners.sqlite3")
    try:
        row = db.execute("SELECT username FROM owners WHERE key = ?",
                         (owners.digest("claude", "skills", skill_id),)).fetchone()
    finally:
        db.close()
    return row[0] if row else None


@pytest.mark.parametrize("skill_id", ["pptx", "xlsx"])
def test_a_pre_built_skill_adopted_before_is_every_users_on_read(
        gw, upstream, users, skill_id):  # noqa: F811
    alice, bob = users
    for who in (bob, alice):
        resp = get(gw, who, f"/anthropic/v1/skills/{skill_id}")
        assert resp.status_code == 200 and resp.json()["source"] == "anthropic", resp.text[:300]
        assert get(gw, who, f"/anthropic/v1/skills/{skill_id}/versions").status_code == 200
    assert owner_of(gw, skill_id) == owners.BUILT_IN  # no longer hers in the store either


def test_a_built_in_listed_is_moved_off_its_first_caller(gw, upstream, users):  # noqa: F811
    """`canvas`, not among the pre-built skills douane knows by name: refused to bob while the
    store says it is alice's (fail closed), every user's once a listing shows it Anthropic's."""
    alice, bob = users
    before = len(upstream.requests)
    record = assert_refused(gw, upstream, before, get(gw, bob, "/anthropic/v1/skills/canvas"),
                            404)
    assert record["reasons"][0]["rule"] == "owner.skill", record
    listed = get(gw, bob, "/anthropic/v1/skills")
    assert [s["id"] for s in listed.json()["data"]] == list(BUILT_IN), listed.text[:300]
    assert owner_of(gw, "canvas") == owners.BUILT_IN
    for who in (bob, alice):
        assert get(gw, who, "/anthropic/v1/skills/canvas").status_code == 200
        assert get(gw, who, "/anthropic/v1/skills/canvas/versions").status_code == 200


def test_the_orgs_own_skill_stays_its_users(gw, upstream, users):  # noqa: F811
    alice, bob = users
    assert get(gw, alice, "/anthropic/v1/skills/skill_x").status_code == 200
    before = len(upstream.requests)
    assert_refused(gw, upstream, before, get(gw, bob, "/anthropic/v1/skills/skill_x"), 404)
    assert owner_of(gw, "skill_x") == "alice@corp"
