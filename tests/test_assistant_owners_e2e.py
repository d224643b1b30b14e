"""Assistants and their threads (with a thread's messages, runs and run steps), evals (and their
runs), videos and skills are their users': with the one org key, another user naming one by id
used it as the org. None of their operations is one douane parses, so each is refused unless a
grant names it; under a grant, what a `POST` makes is bound to its maker (a thread made by
`POST /v1/threads/runs` too), an id douane did not see issued is adopted by the first user the
upstream answers it for, another user is refused 404 before the upstream (the audit record
saying which and where), and listings are the caller's own. Official SDKs."""

from __future__ import annotations

import itertools
import re

import anthropic
import httpx
import openai
import pytest

from douane.cli import main
from tests.conftest import UPSTREAM_KEY
from tests.hardening.conftest import assert_refused, reverse_gateway
from tests.support.gateway import Gateway
from tests.support.upstream import FakeUpstream

ENV = {"DOUANE_TEST_UPSTREAM_KEY": UPSTREAM_KEY}
OPERATIONS = ["POST /v1/assistants", "GET /v1/assistants", "GET /v1/assistants/*",
              "POST /v1/threads", "GET /v1/threads/*", "POST /v1/threads/runs",
              "POST /v1/threads/*/runs", "GET /v1/threads/*/messages",
              "POST /v1/threads/*/messages", "GET /v1/threads/*/runs/*/steps",
              "POST /v1/evals", "GET /v1/evals", "GET /v1/evals/*", "POST /v1/evals/*/runs",
              "GET /v1/videos", "GET /v1/videos/*", "POST /v1/videos/*/remix",
              "GET /v1/videos/*/content", "GET /v1/skills", "GET /v1/skills/*",
              "GET /v1/skills/*/versions", "GET /v1/files/*"]
POLICY = {"version": 1, "groups": {
    "staff": {"upstreams": {
        "llm": {"models": ["*"], "operations": OPERATIONS},
        "claude": {"models": ["*"], "operations": ["GET /anthropic/v1/skills",
                                                   "GET /anthropic/v1/skills/*"]}}},
    "others": {"upstreams": {"llm": {"models": ["*"]}, "claude": {"models": ["*"]}}}}}
OBJECTS = {"assistants": ("asst", "assistant"), "threads": ("thread", "thread"),
           "evals": ("eval", "eval"), "videos": ("video", "video"), "skills": ("skill", "skill")}


class Objects:
    """An upstream keeping the org's assistants, threads, evals, videos and skills (as the org
    key, it answers any id), issuing new ids in turn; its listings list every id it issued or
    was asked about."""

    def __init__(self) -> None:
        self.n = itertools.count(1)
        self.known: dict[str, list[str]] = {k: [f"{p}_old"] for k, (p, _) in OBJECTS.items()}

    def __call__(self, handler, req) -> None:
        path, method = handler.path.split("?")[0].removeprefix("/anthropic"), handler.command
        n = next(self.n)
        if m := re.fullmatch(r"/v1/(\w+)", path):
            prefix, kind = OBJECTS[m[1]]
            if method == "GET":
                doc = {"object": "list", "has_more": False, "data": [
                    {"id": i, "object": kind} for i in self.known[m[1]]]}
            else:
                self.known[m[1]].append(f"{prefix}_{n}")
                doc = {"id": self.known[m[1]][-1], "object": kind, "created_at": 0}
                if "vector_stores" in str(req.get("tool_resources")):  # made for it
                    doc["tool_resources"] = {"file_search": {"vector_store_ids": [f"vs_{n}"]}}
        elif path.endswith("/runs") and method == "POST":  # a thread's run, or an eval's
            thread = path.split("/")[3] if "/threads/" in path and path != "/v1/threads/runs" \
                else f"thread_{n}"
            doc = {"id": f"run_{n}", "object": "thread.run" if "/threads" in path else
                   "eval.run", "thread_id": thread, "assistant_id": req.get("assistant_id"),
                   "status": "queued", "created_at": 0}
        elif path.endswith("/remix"):
            self.known["videos"].append(f"video_{n}")
            doc = {"id": f"video_{n}", "object": "video", "status": "queued", "created_at": 0}
        elif path.endswith("/content"):
            handler.send_response(200)
            handler.send_header("content-type", "video/mp4")
            handler.send_header("content-length", "5")
            handler.end_headers()
            handler.wfile.write(b"bytes")
            return
        elif re.search(r"/(messages|steps|versions)$", path) and method == "GET":
            doc = {"object": "list", "has_more": False, "data": [{"id": f"x_{n}"}]}
        else:
            doc = {"id": path.rsplit("/", 1)[-1], "object": "x", "created_at": 0}
            if (m := re.fullmatch(r"/v1/(\w+)/([^/]+)", path)) and m[1] in OBJECTS and \
                    m[2] not in self.known[m[1]]:
                self.known[m[1]].append(m[2])
        handler._json(200, doc)


@pytest.fixture(scope="module")
def upstream():
    llm = FakeUpstream()
    llm.answer = Objects()
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def gw(issuer, upstream, tmp_path_factory):
    with reverse_gateway(issuer, upstream, tmp_path_factory.mktemp("assistant-owners"), POLICY) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def users(issuer):
    return tuple(issuer.mint(f"{name}@corp", ["staff"]) for name in ("alice", "bob"))


def client(gw: Gateway, token: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=token, max_retries=0)


def refused(gw: Gateway, llm: FakeUpstream, call, rule: str, why: str,
            error: type[Exception] = openai.NotFoundError, status: int = 404) -> dict:
    before = len(llm.requests)
    with pytest.raises(error) as err:
        call()
    record = assert_refused(gw, llm, before, err.value.response, status)  # type: ignore[attr-defined]
    assert record["reasons"][0]["rule"] == rule, record
    assert why in record["reasons"][0]["message"], record
    return record


def test_no_operation_of_theirs_passes_ungranted(gw, upstream, issuer):
    """douane parses none of these operations: without a grant naming it, each is refused
    before the credential is injected."""
    carol = issuer.mint("carol@corp", ["others"])
    for method, path in [("POST", "/v1/assistants"), ("GET", "/v1/assistants/asst_old"),
                         ("POST", "/v1/threads"), ("POST", "/v1/threads/runs"),
                         ("GET", "/v1/threads/thread_old/messages"), ("POST", "/v1/evals"),
                         ("GET", "/v1/evals/eval_old/runs"), ("GET", "/v1/videos/video_old"),
                         ("POST", "/v1/videos"), ("GET", "/v1/skills"),
                         ("GET", "/anthropic/v1/skills/skill_old")]:
        before = len(upstream.requests)
        resp = httpx.request(method, gw.url + path, headers={"authorization": f"Bearer {carol}"},
                             json={} if method == "POST" else None)
        record = assert_refused(gw, upstream, before, resp, 403)
        assert "no grant names it" in resp.text, resp.text
        assert record["reasons"][0]["rule"] == "route.operation", record


def test_assistants_and_threads_are_their_users(gw, upstream, users):
    alice, bob = (client(gw, t) for t in users)
    assistant = alice.beta.assistants.create(model="m").id  # issued: hers
    searching = alice.beta.assistants.create(model="m", tool_resources={"file_search": {
        "vector_stores": [{"file_ids": []}]}})  # a vector store made for it: hers
    made_store = searching.tool_resources.file_search.vector_store_ids[0]
    thread = alice.beta.threads.create().id
    made = alice.beta.threads.create_and_run(assistant_id=assistant).thread_id  # made: hers
    assert alice.beta.threads.runs.create(thread, assistant_id=assistant).thread_id == thread
    assert alice.beta.threads.messages.list(made).data
    uses = [(lambda: bob.beta.assistants.retrieve(assistant), "owner.assistant", "the path"),
            (lambda: bob.beta.threads.create_and_run(assistant_id=assistant), "owner.assistant",
             "assistant_id"),
            (lambda: bob.beta.threads.retrieve(thread), "owner.thread", "the path"),
            (lambda: bob.beta.threads.messages.list(made), "owner.thread", "the path"),
            (lambda: bob.beta.threads.messages.create(thread, role="user", content="hi"),
             "owner.thread", "the path"),
            (lambda: bob.beta.threads.runs.create(made, assistant_id="asst_bobs"),
             "owner.thread", "the path"),
            (lambda: bob.beta.threads.runs.steps.list("run_1", thread_id=thread),
             "owner.thread", "the path"),
            (lambda: bob.beta.threads.create(tool_resources={"file_search": {
                "vector_store_ids": [made_store]}}), "owner.vector_store",
             "tool_resources.file_search.vector_store_ids[0]")]
    for use, rule, where in uses:
        record = refused(gw, upstream, use, rule, "issued to another user")
        assert where in record["reasons"][0]["message"], record
    # hers pass; listings are the caller's own (an assistant nobody named yet is nobody's)
    assert alice.beta.threads.runs.steps.list("run_1", thread_id=thread).data
    assert {a.id for a in alice.beta.assistants.list().data} == {assistant, searching.id}
    assert bob.beta.assistants.list().data == []
    # one from before douane: the first user the upstream answers it for adopts it
    assert bob.beta.assistants.retrieve("asst_old").id == "asst_old"
    assert [a.id for a in bob.beta.assistants.list().data] == ["asst_old"]
    refused(gw, upstream, lambda: alice.beta.assistants.retrieve("asst_old"), "owner.assistant",
            "another user")


def test_evals_are_their_users_and_read_no_stored_answers(gw, upstream, users):
    alice, bob = (client(gw, t) for t in users)
    custom = {"type": "custom", "item_schema": {"type": "object"}}
    evaluation = alice.evals.create(data_source_config=custom, testing_criteria=[]).id
    alice.files.retrieve("file-rows")  # adopted
    rows = {"type": "jsonl", "source": {"type": "file_id", "id": "file-rows"}}
    assert alice.evals.runs.create(evaluation, data_source=rows).id
    refused(gw, upstream, lambda: bob.evals.retrieve(evaluation), "owner.eval", "another user")
    inline = {"type": "jsonl", "source": {"type": "file_content", "content": []}}
    refused(gw, upstream, lambda: bob.evals.runs.create(evaluation, data_source=inline),
            "owner.eval", "another user")
    bobs = bob.evals.create(data_source_config=custom, testing_criteria=[]).id
    record = refused(gw, upstream, lambda: bob.evals.runs.create(bobs, data_source=rows),
                     "owner.file", "another user")
    assert "data_source.source.id" in record["reasons"][0]["message"]
    # a data source reading the org's stored answers or completions lists every user's
    stored = [{"type": "responses", "source": {"type": "responses", "model": "m"}},
              {"type": "completions", "source": {"type": "stored_completions"}}]
    for source in stored:
        record = refused(gw, upstream, lambda s=source: alice.evals.runs.create(
            evaluation, data_source=s), "owner.listing", "org's stored answers",
            openai.PermissionDeniedError, 403)
    record = refused(gw, upstream, lambda: alice.evals.create(
        data_source_config={"type": "stored_completions"}, testing_criteria=[]),
        "owner.listing", "data_source_config (stored_completions)",
        openai.PermissionDeniedError, 403)
    assert [e.id for e in alice.evals.list().data] == [evaluation]
    assert [e.id for e in bob.evals.list().data] == [bobs]


def test_videos_and_skills_are_their_users(gw, upstream, users):
    alice, bob = (client(gw, t) for t in users)
    # made as multipart bodies (which douane refuses): adopted by their first user
    assert alice.videos.retrieve("video_a").id == "video_a"
    remixed = alice.videos.remix("video_a", prompt="again").id  # issued: hers
    assert alice.videos.download_content(remixed).content == b"bytes"
    for use in [lambda: bob.videos.retrieve("video_a"),
                lambda: bob.videos.remix("video_a", prompt="mine"),
                lambda: bob.videos.download_content(remixed)]:
        record = refused(gw, upstream, use, "owner.video", "another user")
        assert "the path" in record["reasons"][0]["message"], record
    assert [v.id for v in alice.videos.list().data] == ["video_a", remixed]
    assert bob.videos.list().data == []
    assert alice.skills.retrieve("skill_a").id == "skill_a"
    refused(gw, upstream, lambda: bob.skills.retrieve("skill_a"), "owner.skill", "another user")
    refused(gw, upstream, lambda: bob.skills.versions.list("skill_a"), "owner.skill",
            "another user")
    assert [s.id for s in alice.skills.list().data] == ["skill_a"]
    # Anthropic's skills alike (a skill id of one upstream is not another's)
    claude = [anthropic.Anthropic(base_url=gw.url + "/anthropic", api_key=t, max_retries=0)
              for t in users]
    assert claude[1].beta.skills.retrieve("skill_a").id == "skill_a"
    before = len(upstream.requests)
    with pytest.raises(anthropic.NotFoundError) as err:
        claude[0].beta.skills.retrieve("skill_a")
    record = assert_refused(gw, upstream, before, err.value.response, 404)
    assert record["reasons"][0]["rule"] == "owner.skill", record
    assert [s.id for s in claude[1].beta.skills.list().data] == ["skill_a"]
    assert claude[0].beta.skills.list().data == []


def test_an_operator_sees_and_moves_them(gw, users, capsys):
    """`douane owners` names the new kinds (and an MCP requestState's)."""
    args = ["--config", str(gw.config_file)]
    assert main(["owners", "list", "alice@corp", "--kind", "threads", *args]) == 0
    assert "threads" in capsys.readouterr().out
    assert main(["owners", "transfer", "llm", "videos", "video_a", "--to", "bob@corp", *args]) == 0
    assert main(["owners", "list", "bob@corp", "--kind", "videos", *args]) == 0
    assert "videos" in capsys.readouterr().out
    assert main(["owners", "list", "alice@corp", "--kind", "mcp_state", *args]) == 0
