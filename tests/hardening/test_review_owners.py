"""Review of stop 29's owner kinds through a real gateway: an id named where the API names it in
a body is its user's."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.hardening.conftest import assert_refused, reverse_gateway
from tests.support.upstream import FakeUpstream
from tests.test_assistant_owners_e2e import Objects

POLICY = {"version": 1, "groups": {"staff": {"upstreams": {
    "llm": {"models": ["*"], "operations": ["GET /v1/videos/*", "POST /v1/videos/edits",
                                            "POST /v1/videos/extensions", "GET /v1/videos/*/content",
                                            "GET /v1/skills", "GET /v1/skills/*",
                                            "GET /v1/skills/*/versions"]}}}}}


@pytest.fixture(scope="module")
def upstream():
    llm = FakeUpstream()
    llm.answer = Objects()
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def gw(issuer, upstream, tmp_path_factory):
    with reverse_gateway(issuer, upstream, tmp_path_factory.mktemp("review-owners"), POLICY) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def users(issuer):
    return tuple({"authorization": f"Bearer {issuer.mint(f'{n}@corp', ['staff'])}"}
                 for n in ("alice", "bob"))


@pytest.mark.parametrize("operation", ["edits", "extensions"])
def test_a_video_named_in_an_edit_body_is_its_users(gw, upstream, users, operation):
    """`POST /v1/videos/edits` and `/extensions` name their source video as `{"video": {"id":
    ...}}` (JSON, as the API documents beside multipart): another user's was edited."""
    alice, bob = users
    mine = f"video_{operation}_a"
    assert httpx.get(f"{gw.url}/v1/videos/{mine}", headers=alice).status_code == 200  # adopted
    before = len(upstream.requests)
    resp = httpx.post(f"{gw.url}/v1/videos/{operation}", headers=bob, json={
        "prompt": "again", "seconds": "4", "video": {"id": mine}})
    record = assert_refused(gw, upstream, before, resp, 404)
    assert record["reasons"][0]["rule"] == "owner.video", record
    assert "video.id" in record["reasons"][0]["message"], record
    resp = httpx.post(f"{gw.url}/v1/videos/{operation}", headers=alice, json={
        "prompt": "again", "seconds": "4", "video": {"id": mine}})
    assert resp.status_code == 200, resp.text
    # a reference douane cannot read is refused, not passed
    before = len(upstream.requests)
    resp = httpx.post(f"{gw.url}/v1/videos/{operation}", headers=bob, json={
        "prompt": "again", "seconds": "4", "video": mine})
    record = assert_refused(gw, upstream, before, resp, 400, 403, 404)
    assert "video names no id" in record["reasons"][0]["message"], record


@pytest.mark.parametrize("alias", [";v=1", "%3Bv=1", ",x", "%2Cx", "%3Dx", "%40x", ":x"])
def test_an_id_spelt_with_a_parameter_in_a_path_is_refused(gw, upstream, users, alias):
    """`/v1/videos/video_a;v=1` was bound as written, a new id: a provider that reads `;`
    parameters (or decodes `%3B` then does) would serve another user's `video_a` to whoever
    adopted the new spelling. No id of either API holds a character outside `[A-Za-z0-9_-]`."""
    alice, bob = users
    mine = "video_alias_" + alias.encode().hex()
    assert httpx.get(f"{gw.url}/v1/videos/{mine}", headers=alice).status_code == 200
    before = len(upstream.requests)
    resp = httpx.get(f"{gw.url}/v1/videos/{mine}{alias}", headers=bob)
    record = assert_refused(gw, upstream, before, resp, 404)
    assert record["reasons"][0]["rule"] == "owner.video", record


def test_the_sdks_documented_parameters_on_the_new_kinds_pass(gw, upstream, users):
    """The query parameters the openai SDK sends on these kinds' operations reach the provider
    (they were refused `query_refused`: no entry in `forwarding._OPS`)."""
    alice, _ = users
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=alice["authorization"][7:],
                           max_retries=0)
    assert client.videos.retrieve("video_params").id == "video_params"  # adopted
    assert client.videos.download_content("video_params", variant="thumbnail").content == b"bytes"
    assert client.skills.retrieve("skill_params").id == "skill_params"
    assert [s.id for s in client.skills.list(limit=5, order="asc", after="skill_params")]
    assert client.skills.versions.list("skill_params", limit=5, order="desc").data
    assert "variant=thumbnail" in upstream.requests[-4].path, upstream.requests[-4].path
