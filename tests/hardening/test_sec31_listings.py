"""A filtered listing's page (`douane.owners`: the caller's own objects only) says `has_more`
of the caller's own, never the upstream's count of everyone's: `after=<my last>&limit=1` reads
the same whether other users made one object since or many, and a page listing none ends the
listing (`has_more: false`, no cursor). Through a real gateway onto an upstream paging the
org's objects by `after` / `after_id` and `limit`."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.hardening import test_sec30_owners
from tests.hardening.conftest import POLICY, reverse_gateway
from tests.hardening.test_sec30_owners import get, shown
from tests.support.upstream import FakeUpstream

OPERATIONS = {"llm": ["GET /v1/assistants", "GET /v1/assistants/*"],
              "claude": ["GET /anthropic/v1/files", "GET /anthropic/v1/files/*"]}
users = test_sec30_owners.users  # (alice's and bob's tokens)
# the org's objects, oldest first, as the upstream lists them (the tests add alice's)
ORG: dict[str, list[str]] = {"/v1/assistants": [], "/anthropic/v1/files": []}


def answer(handler, _req) -> None:
    path, _, query = handler.path.partition("?")
    params = dict(p.split("=", 1) for p in query.split("&") if "=" in p)
    if path in ORG:
        ids = ORG[path]
        after = params.get("after") or params.get("after_id")
        start = ids.index(after) + 1 if after in ids else 0
        limit = int(params.get("limit", "20"))
        page = ids[start:start + limit]
        doc = {"data": [{"id": i, "object": "x"} for i in page],
               "has_more": start + limit < len(ids),
               "first_id": page[0] if page else None, "last_id": page[-1] if page else None}
        if path == "/v1/assistants":
            doc["object"] = "list"
    else:
        doc = {"id": path.rsplit("/", 1)[-1], "object": "x"}
    handler._json(200, doc)


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
    with reverse_gateway(issuer, upstream, tmp_path_factory.mktemp("sec31_listings"),
                         policy) as gateway:
        yield gateway


def own(gw, token: str, listing: str, object_id: str) -> None:
    """`object_id` made and read by `token`'s user (adopted: theirs)."""
    ORG[listing].append(object_id)
    assert get(gw, token, f"{listing}/{object_id}").status_code == 200


@pytest.mark.parametrize("listing, cursor, prefix", [
    ("/v1/assistants", "after", "asst_"), ("/anthropic/v1/files", "after_id", "file_")])
def test_has_more_tells_nothing_of_other_users_objects(gw, upstream, users, listing, cursor,
                                                       prefix):
    alice, bob = users
    own(gw, bob, listing, prefix + "b1")
    own(gw, alice, listing, prefix + "a1")  # one of hers after his last
    probe = f"{listing}?{cursor}={prefix}b1&limit=1"
    one = get(gw, bob, probe)
    for n in range(2, 5):  # she makes more
        own(gw, alice, listing, f"{prefix}a{n}")
    many = get(gw, bob, probe)
    assert shown(one) == shown(many), (one.text, many.text)
    assert one.json()["data"] == [] and one.json()["has_more"] is False, one.text
    assert one.json().get("last_id") is None


@pytest.mark.parametrize("listing, cursor, prefix", [
    ("/v1/assistants", "after", "asst_"), ("/anthropic/v1/files", "after_id", "file_")])
def test_following_the_cursor_lists_the_callers_own_and_ends(gw, upstream, users, listing,
                                                             cursor, prefix):
    """His objects after all of hers: pages of his own, each naming its last as the cursor,
    saying more while they list any; the listing ends on a page listing none."""
    alice, bob = users
    mine = [f"{prefix}c{n}" for n in range(3)]
    for object_id in mine:
        own(gw, bob, listing, object_id)
    seen, path = [], f"{listing}?{cursor}={prefix}b1&limit=10"
    for _ in range(5):
        page = get(gw, bob, path).json()
        seen += [i["id"] for i in page["data"]]
        assert page["has_more"] is bool(page["data"]), page
        if not page["has_more"]:
            break
        assert page["last_id"] == page["data"][-1]["id"], page
        path = f"{listing}?{cursor}={page['last_id']}&limit=10"
    assert seen == mine, json.dumps(seen)
