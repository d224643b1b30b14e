"""Ids a user's answers issued inside them stay that user's: a Responses answer's output items
(named again in `input` by `item_reference` or by an item's `id`) and an Anthropic code-execution
container (`container`). Another user naming one, or one douane never saw issued, is refused
before the upstream with the audit record saying why; the user's own reuse passes, streamed or
not, and after a restart (the embedded store). A container's `skills` (stored upstream, unseen)
is refused."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import UPSTREAM_KEY
from tests.hardening.conftest import assert_refused
from tests.support.gateway import Gateway, base_config
from tests.support.upstream import FakeUpstream

ENV = {"DOUANE_TEST_UPSTREAM_KEY": UPSTREAM_KEY}


def answer(n: int) -> dict:
    """A Responses answer issuing a reasoning item, a function call, a code interpreter call (in a
    container) and a message."""
    return {"id": f"resp_{n}", "object": "response", "created_at": 0, "model": "m",
            "status": "completed", "usage": {"input_tokens": 1, "output_tokens": 1},
            "output": [{"id": f"rs_{n}", "type": "reasoning", "summary": []},
                       {"id": f"fc_{n}", "type": "function_call", "call_id": f"call_{n}",
                        "name": "lookup", "arguments": "{}", "status": "completed"},
                       {"id": f"ci_{n}", "type": "code_interpreter_call", "code": "1+1",
                        "container_id": f"cntr_{n}", "outputs": [], "status": "completed"},
                       {"id": f"msg_{n}", "type": "message", "role": "assistant",
                        "status": "completed", "content": [
                            {"type": "output_text", "text": "ok", "annotations": []}]}]}


def message(container: str) -> dict:
    """An Anthropic answer that ran code in `container`."""
    return {"id": "msg_a", "type": "message", "role": "assistant", "model": "m",
            "content": [{"type": "text", "text": "ran"}], "stop_reason": "end_turn",
            "stop_sequence": None, "usage": {"input_tokens": 1, "output_tokens": 1},
            "container": {"id": container, "expires_at": "2030-01-01T00:00:00Z"}}


@pytest.fixture(scope="module")
def config(issuer, llm, tmp_path_factory):
    config = base_config(issuer.url, llm.url + "/v1",
                         gateway={"state_dir": str(tmp_path_factory.mktemp("items-state"))})
    config["upstreams"]["claude"] = {"url": llm.url + "/anthropic", "protocol": "anthropic",
                                     "credential": {"env": "DOUANE_TEST_UPSTREAM_KEY"}}
    return config


@pytest.fixture(scope="module")
def users(issuer):
    return tuple(issuer.mint(f"{name}@corp", ["staff"]) for name in ("alice", "bob"))


def post(gw: Gateway, token: str, url: str, doc: dict) -> httpx.Response:
    with httpx.Client(proxy=gw.proxy_url("u", token), timeout=120) as c:
        return c.post(url, json=doc)


def refused(gw: Gateway, llm: FakeUpstream, resp: httpx.Response, before: int, rule: str,
            why: str) -> None:
    record = assert_refused(gw, llm, before, resp, 403 if rule.startswith("protocol.") else 404)
    assert record["reasons"][0]["rule"] == rule, record
    assert why in record["reasons"][0]["message"], record


def test_items_are_their_users(config, llm, users, tmp_path):
    alice, bob = users
    responses = llm.url + "/v1/responses"

    def ask(token: str, *items: dict, **doc) -> httpx.Response:
        return post(gw, token, responses, {"model": "m", "input": [
            *items, {"role": "user", "content": "go on"}], **doc})

    with Gateway(config, env=ENV, workdir=tmp_path / "first") as gw:
        llm.document = answer(1)
        assert ask(alice).status_code == 200
        llm.document = answer(2)  # streamed, and not stored: its items are bound alike
        resp = post(gw, alice, responses, {"model": "m", "input": "hi", "stream": True,
                                           "store": False})
        assert resp.status_code == 200 and "response.completed" in resp.text
        llm.document = answer(9)
        for item, why in [({"type": "item_reference", "id": "msg_1"}, "another user"),
                          ({"type": "reasoning", "id": "rs_2", "summary": []}, "another user"),
                          ({"type": "function_call", "id": "fc_1", "call_id": "call_1",
                            "name": "lookup", "arguments": "{}"}, "another user"),
                          ({"type": "item_reference", "id": "msg_never"}, "did not see issued"),
                          ({"type": "item_reference", "id": 7}, "names no id"),
                          ({"type": "mcp_approval_response", "approval_request_id": "mcpr_1",
                            "approve": True}, "did not see issued")]:
            before = len(llm.requests)
            refused(gw, llm, ask(bob, item), before, "owner.item", why)
        # an OpenAI code interpreter's container, named in a tool
        for container, why in [("cntr_1", "another user"), ("cntr_never", "did not see issued"),
                               (None, "names no id")]:
            before = len(llm.requests)
            refused(gw, llm, ask(bob, tools=[{"type": "code_interpreter", "container": container}]),
                    before, "owner.container", why)
        assert ask(alice, tools=[{"type": "code_interpreter", "container": "cntr_1"}]
                   ).status_code == 200
        assert ask(bob, tools=[{"type": "code_interpreter", "container": {"type": "auto"}}]
                   ).status_code == 200  # a new container
        # Alice's own, among many: passes, and the upstream reads them
        before = len(llm.requests)
        mine = [{"type": "item_reference", "id": "msg_1"},
                {"type": "reasoning", "id": "rs_2", "summary": []},
                {"type": "function_call", "id": "fc_2", "call_id": "call_2", "name": "lookup",
                 "arguments": "{}"},
                {"type": "function_call_output", "call_id": "call_2", "output": "42"}]
        assert ask(alice, *mine).status_code == 200
        assert len(llm.requests) == before + 1 and b'"rs_2"' in llm.requests[-1].body
        # her answer's items are hers, not whoever names them first (no adoption)
        assert ask(bob, {"type": "item_reference", "id": "msg_9"}).status_code == 404
    with Gateway(config, env=ENV, workdir=tmp_path / "second") as gw:  # the store kept them
        before = len(llm.requests)
        refused(gw, llm, ask(bob, {"type": "item_reference", "id": "fc_1"}), before,
                "owner.item", "another user")
        assert ask(alice, {"type": "item_reference", "id": "fc_1"}).status_code == 200
    llm.document = None


def test_containers_are_their_users_and_skills_are_refused(config, llm, users, tmp_path):
    alice, bob = users
    messages = llm.url + "/anthropic/v1/messages"

    def ask(token: str, **doc) -> httpx.Response:
        return post(gw, token, messages, {"model": "m", "max_tokens": 10, "messages": [
            {"role": "user", "content": "run it"}], **doc})

    with Gateway(config, env=ENV, workdir=tmp_path / "gw") as gw:
        llm.document = message("container_alice")
        assert ask(alice).status_code == 200
        llm.document = message("container_streamed")  # named in the stream's message_start
        resp = ask(alice, stream=True)
        assert resp.status_code == 200 and "container_streamed" in resp.text
        llm.document = message("container_new")
        for container, why in [("container_alice", "another user"),
                               ({"id": "container_streamed"}, "another user"),
                               ("container_unknown", "did not see issued"),
                               ({"id": ["container_alice"]}, "names no id")]:
            before = len(llm.requests)
            refused(gw, llm, ask(bob, container=container), before, "owner.container", why)
        before = len(llm.requests)
        refused(gw, llm, ask(alice, container={"id": "container_alice", "skills": [
            {"type": "custom", "skill_id": "skill_01", "version": "latest"}]}), before,
            "protocol.stored_skill", "skills")
        for container in ("container_alice", {"id": "container_streamed"}):
            assert ask(alice, container=container).status_code == 200
        before = len(llm.requests)
        assert ask(bob, container={}).status_code == 200  # a new container: his
        assert len(llm.requests) == before + 1
    llm.document = None


def test_a_conversations_new_items_are_checked_too(issuer, llm, users, tmp_path):
    """`POST /v1/conversations/{id}/items` (a granted operation) adds items to a conversation:
    Alice's item by reference into Bob's own conversation is refused as in `input`."""
    alice, bob = users
    (tmp_path / "grants.yaml").write_text(
        "version: 1\ngroups:\n  staff:\n    upstreams:\n      llm: {operations: "
        '["POST /v1/conversations", "POST /v1/conversations/*/items"]}\n')
    config = base_config(issuer.url, llm.url + "/v1",
                         policy={"files": [str(tmp_path / "grants.yaml")]})
    with Gateway(config, env=ENV, workdir=tmp_path / "gw") as gw:
        llm.document = answer(5)
        assert post(gw, alice, llm.url + "/v1/responses", {"model": "m", "input": "hi"}
                    ).status_code == 200
        llm.document = None
        assert post(gw, bob, llm.url + "/v1/conversations", {}).json()["id"] == "conv_fake"
        for url in ("/v1/conversations/conv_fake/items", "/v1/conversations"):
            before = len(llm.requests)
            refused(gw, llm, post(gw, bob, llm.url + url, {"items": [
                {"type": "item_reference", "id": "msg_5"}]}), before, "owner.item",
                "items[0].id names one issued to another user")
        assert post(gw, bob, llm.url + "/v1/conversations/conv_fake/items", {"items": [
            {"type": "message", "role": "user", "content": "mine"}]}).status_code == 200
