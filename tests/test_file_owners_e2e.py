"""Uploaded files, vector stores, batches, containers and a conversation's items are their users':
with the one org key, another user naming one by id (in a path, or anywhere in a body: an
`input_file` part, a `file_search` tool's `vector_store_ids`, a batch's `input_file_id`, an
Anthropic `document` source) read or used it. Each is bound to the user it was issued to (a
`POST` douane granted), or adopted by the first user the upstream answers it for (files are
uploaded as multipart bodies, which douane refuses: it never sees one issued); another user is
refused 404 before the upstream, the audit record saying why; listings are the caller's own.
Official SDKs where they apply."""

from __future__ import annotations

import itertools
import json
import re

import anthropic
import httpx
import openai
import pytest
import yaml

from douane import owners
from douane.cli import main
from tests.conftest import UPSTREAM_KEY
from tests.hardening.conftest import assert_refused, reverse_gateway, with_claude
from tests.support.gateway import Gateway, base_config
from tests.support.postgres import PASSWORD
from tests.support.upstream import FakeUpstream, anthropic_stream
from tests.test_shared_store_e2e import wait_for_log

ENV = {"DOUANE_TEST_UPSTREAM_KEY": UPSTREAM_KEY}
OPERATIONS = ["GET /v1/files", "GET /v1/files/*", "GET /v1/files/*/content", "DELETE /v1/files/*",
              "POST /v1/vector_stores", "GET /v1/vector_stores", "GET /v1/vector_stores/*",
              "POST /v1/vector_stores/*/search", "GET /v1/vector_stores/*/files",
              "POST /v1/vector_stores/*/files", "POST /v1/vector_stores/*/file_batches",
              "POST /v1/batches", "GET /v1/batches/*", "GET /v1/batches",
              "POST /v1/containers", "GET /v1/containers/*", "GET /v1/containers/*/files",
              "GET /v1/containers/*/files/*/content", "POST /v1/conversations",
              "POST /v1/conversations/*/items", "GET /v1/conversations/*/items",
              "GET /v1/conversations/*/items/*", "POST /v1/uploads", "POST /v1/uploads/*/complete",
              "POST /v1/fine_tuning/jobs", "GET /v1/fine_tuning/jobs/*"]
POLICY = {"version": 1, "default": {"upstreams": {
    "llm": {"models": ["*"], "hosted_tools": ["file_search", "code_interpreter"],
            "operations": OPERATIONS},
    "claude": {"models": ["*"], "operations": ["GET /anthropic/v1/files/*",
                                               "GET /anthropic/v1/files"],
               "betas": ["files-api-*"]}}}}  # the SDK's files calls ask for the Files API beta


class Objects:
    """An upstream keeping files, vector stores, batches, containers and conversation items for
    the org (every id exists for it: as the org key, it answers any), issuing new ids in turn."""

    def __init__(self) -> None:
        self.n = itertools.count(1)
        self.issued = ["file-a", "file-b", "file-c", "file_anth1"]  # and the ids it issued

    def __call__(self, handler, req) -> None:
        path, method = handler.path.split("?")[0], handler.command
        n = next(self.n)
        if path.endswith("/messages"):  # Anthropic; asked to `run`, code makes a file
            doc = {"id": "msg_a", "type": "message", "role": "assistant", "model": "m",
                   "content": [{"type": "text", "text": "read"}], "stop_reason": "end_turn",
                   "stop_sequence": None, "usage": {"input_tokens": 1, "output_tokens": 1}}
            stream = req.get("stream") is True
            if '"run"' in json.dumps(req.get("messages")):
                made = "file_made_streamed" if stream else "file_made"
                doc["content"].insert(0, {
                    "type": "bash_code_execution_tool_result", "tool_use_id": "srvtoolu_1",
                    "content": {"type": "bash_code_execution_result", "stdout": "", "stderr": "",
                                "return_code": 0, "content": [
                                    {"type": "bash_code_execution_output", "file_id": made}]}})
            handler._answer(stream, doc, lambda: anthropic_stream(doc, lambda text: [text]))
            return
        elif path.endswith("/responses"):
            doc = {"id": f"resp_{n}", "object": "response", "created_at": 0, "model": "m",
                   "status": "completed", "usage": {"input_tokens": 1, "output_tokens": 1},
                   "output": [{"id": f"msg_{n}", "type": "message", "role": "assistant",
                               "status": "completed", "content": [
                                   {"type": "output_text", "text": "ok", "annotations": []}]}]}
        elif path.endswith("/chat/completions"):
            doc = {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "m",
                   "choices": [{"index": 0, "finish_reason": "stop",
                                "message": {"role": "assistant", "content": "ok"}}]}
        elif path.endswith("/content"):
            handler.send_response(200)
            handler.send_header("content-type", "application/octet-stream")
            handler.send_header("content-length", "5")
            handler.end_headers()
            handler.wfile.write(b"bytes")
            return
        elif method == "GET" and re.search(r"/(files|vector_stores|batches)$", path):
            doc = {"object": "list", "has_more": False, "first_id": self.issued[0],
                   "last_id": self.issued[-1], "data": [{"id": i, "object": "x"}
                                                        for i in self.issued]}
        elif m := re.search(r"/(vector_stores|containers|batches|uploads|conversations|"
                            r"fine_tuning/jobs)$", path):
            prefix, kind = {"vector_stores": ("vs", "vector_store"),
                            "fine_tuning/jobs": ("ftjob", "fine_tuning.job"),
                            "containers": ("cntr", "container"), "batches": ("batch", "batch"),
                            "uploads": ("upload", "upload"),
                            "conversations": ("conv", "conversation")}[m[1]]
            self.issued.append(f"{prefix}_{n}")
            doc = {"id": self.issued[-1], "object": kind, "status": "completed",
                   "input_file_id": req.get("input_file_id")}
        elif m := re.search(r"/batches/([^/]+)$", path):
            doc = {"id": m[1], "object": "batch", "status": "completed",
                   "output_file_id": f"file-out{n}", "error_file_id": None}
        elif m := re.search(r"/fine_tuning/jobs/([^/]+)$", path):
            doc = {"id": m[1], "object": "fine_tuning.job", "status": "succeeded",
                   "result_files": [f"file-result{n}"]}
        elif m := re.search(r"/uploads/([^/]+)/complete$", path):
            doc = {"id": m[1], "object": "upload", "status": "completed",
                   "file": {"id": f"file-up{n}", "object": "file"}}
        elif path.endswith("/items") and method == "POST":
            doc = {"object": "list", "has_more": False,
                   "data": [{"id": f"msg_ci{n}", "type": "message", "role": "user",
                             "content": []}]}
        elif path.endswith("/files") or path.endswith("/items"):  # inside a bound object
            doc = {"object": "list", "data": [{"id": f"cfile_{n}"}], "has_more": False}
        else:
            doc = {"id": path.rsplit("/", 1)[-1], "object": "x"}
        handler._json(200, doc)


@pytest.fixture(scope="module")
def upstream():
    llm = FakeUpstream()
    llm.answer = Objects()
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def gw(issuer, upstream, tmp_path_factory):
    with reverse_gateway(issuer, upstream, tmp_path_factory.mktemp("file-owners"), POLICY) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def users(issuer):
    return tuple(issuer.mint(f"{name}@corp", ["staff"]) for name in ("alice", "bob"))


def client(gw: Gateway, token: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=token, max_retries=0)


def refused(gw: Gateway, llm: FakeUpstream, call, rule: str, why: str) -> dict:
    before = len(llm.requests)
    with pytest.raises(openai.NotFoundError) as err:
        call()
    record = assert_refused(gw, llm, before, err.value.response, 404)
    assert record["reasons"][0]["rule"] == rule, record
    assert why in record["reasons"][0]["message"], record
    return record


def test_files_and_vector_stores_are_their_users(gw, upstream, users):
    alice, bob = (client(gw, t) for t in users)
    # a file douane never saw issued: the first user the upstream answers it for adopts it
    assert alice.files.retrieve("file-a").id == "file-a"
    record = gw.audit_record(alice.files.with_raw_response.retrieve("file-b").headers[
        "x-douane-decision-id"])
    assert any(r["rule"] == "owner.adopted" for r in record["reasons"]), record
    assert alice.files.content("file-a").content == b"bytes"
    vs = alice.vector_stores.create(name="notes", file_ids=["file-a"]).id  # issued: hers
    ask = {"model": "m", "input": [{"role": "user", "content": [
        {"type": "input_text", "text": "read"}, {"type": "input_file", "file_id": "file-a"}]}]}
    assert alice.responses.create(**ask, tools=[{"type": "file_search",
                                                "vector_store_ids": [vs]}]).status == "completed"
    # every way Bob names them is refused before the upstream, the record saying where
    uses = [(lambda: bob.files.retrieve("file-a"), "owner.file", "the path"),
            (lambda: bob.files.content("file-b"), "owner.file", "the path"),
            (lambda: bob.files.delete("file-a"), "owner.file", "the path"),
            (lambda: bob.responses.create(**ask), "owner.file", "input[0].content[1].file_id"),
            (lambda: bob.chat.completions.create(model="m", messages=[{"role": "user", "content": [
                {"type": "file", "file": {"file_id": "file-b"}}]}]), "owner.file",
             "messages[0].content[0].file.file_id"),
            (lambda: bob.responses.create(model="m", input="hi", tools=[
                {"type": "file_search", "vector_store_ids": ["vs_new", vs]}]),
             "owner.vector_store", "tools[0].vector_store_ids[1]"),
            (lambda: bob.vector_stores.retrieve(vs), "owner.vector_store", "the path"),
            (lambda: bob.vector_stores.search(vs, query="q"), "owner.vector_store", "the path"),
            (lambda: bob.vector_stores.files.list(vs), "owner.vector_store", "the path"),
            (lambda: bob.vector_stores.create(name="x", file_ids=["file-a"]), "owner.file",
             "file_ids[0]"),
            (lambda: bob.vector_stores.file_batches.create("vs_bobs", file_ids=["file-b"]),
             "owner.file", "file_ids[0]"),
            (lambda: bob.batches.create(input_file_id="file-a", endpoint="/v1/responses",
                                        completion_window="24h"), "owner.file", "input_file_id")]
    for use, rule, where in uses:
        record = refused(gw, upstream, use, rule, "issued to another user")
        assert where in record["reasons"][0]["message"], record
    # hers still pass; a listing is hers only (its cursors too)
    assert alice.vector_stores.search(vs, query="q") is not None
    assert alice.vector_stores.retrieve(vs).id == vs
    listed = alice.files.list()
    assert [f.id for f in listed.data] == ["file-a", "file-b"]
    assert [v.id for v in alice.vector_stores.list().data] == [vs]
    assert bob.files.list().data == []
    # a listing inside her vector store is hers whole (file-c: a file nobody named yet)
    assert "file-c" in [f.id for f in alice.vector_stores.files.list(vs).data]
    # a file's id in a tool's schema or `metadata` names no file
    assert bob.responses.create(model="m", input="hi", metadata={"file_id": "file-a"}
                                ).status == "completed"
    # spelt with escapes, the key is the same key upstream
    before = len(upstream.requests)
    resp = httpx.post(gw.url + "/v1/responses", headers={
        "authorization": f"Bearer {users[1]}", "content-type": "application/json"},
        content=b'{"model": "m", "input": [{"role": "user", "content": [{"type": '
                b'"input_\\u0066ile", "\\u0066ile_id": "\\u0066ile-a"}]}]}')
    assert assert_refused(gw, upstream, before, resp, 404)["reasons"][0]["rule"] == "owner.file"
    # and in UTF-16 (JSON is read so too)
    before = len(upstream.requests)
    resp = httpx.post(gw.url + "/v1/responses", headers={
        "authorization": f"Bearer {users[1]}", "content-type": "application/json"},
        content=json.dumps({**ask, "model": "m"}).encode("utf-16-le"))
    assert assert_refused(gw, upstream, before, resp, 404)["reasons"][0]["rule"] == "owner.file"


def test_batches_uploads_containers_and_items_bind_what_they_make(gw, upstream, users):
    alice, bob = (client(gw, t) for t in users)
    alice.files.retrieve("file-in")  # adopted
    batch = alice.batches.create(input_file_id="file-in", endpoint="/v1/responses",
                                 completion_window="24h").id
    out = alice.batches.retrieve(batch).output_file_id  # made for her batch: hers
    refused(gw, upstream, lambda: bob.batches.retrieve(batch), "owner.batch", "another user")
    refused(gw, upstream, lambda: bob.files.content(out), "owner.file", "another user")
    assert alice.files.content(out).content == b"bytes"
    upload = alice.uploads.create(bytes=5, filename="a.txt", mime_type="text/plain",
                                  purpose="assistants").id
    refused(gw, upstream, lambda: bob.uploads.complete(upload, part_ids=[]), "owner.upload",
            "another user")
    made = alice.uploads.complete(upload, part_ids=[]).file.id
    refused(gw, upstream, lambda: bob.files.retrieve(made), "owner.file", "another user")
    refused(gw, upstream, lambda: bob.fine_tuning.jobs.create(model="m", training_file=made),
            "owner.file", "training_file")
    job = alice.fine_tuning.jobs.create(model="m", training_file=made).id
    refused(gw, upstream, lambda: bob.fine_tuning.jobs.retrieve(job), "owner.fine_tuning_job",
            "another user")
    result = alice.fine_tuning.jobs.retrieve(job).result_files[0]
    refused(gw, upstream, lambda: bob.files.content(result), "owner.file", "another user")
    # a container made by `POST /v1/containers` is hers, its files with it
    container = alice.containers.create(name="c").id
    assert alice.containers.files.list(container).data
    refused(gw, upstream, lambda: bob.containers.retrieve(container), "owner.container",
            "another user")
    refused(gw, upstream, lambda: bob.containers.files.content.retrieve(
        "cfile_1", container_id=container), "owner.container", "another user")
    refused(gw, upstream, lambda: bob.containers.retrieve("cntr_never"), "owner.container",
            "did not see issued")
    assert alice.responses.create(model="m", input="hi", tools=[
        {"type": "code_interpreter", "container": container}]).status == "completed"
    # a conversation's items added by the Conversations API are hers, named again in `input`
    conversation = alice.conversations.create().id
    item = alice.conversations.items.create(conversation, items=[
        {"type": "message", "role": "user", "content": "hi"}]).data[0].id
    assert alice.responses.create(model="m", input=[{"type": "item_reference", "id": item}]
                                  ).status == "completed"
    refused(gw, upstream, lambda: bob.responses.create(model="m", input=[
        {"type": "item_reference", "id": item}]), "owner.item", "another user")
    bobs = bob.conversations.create().id
    refused(gw, upstream, lambda: bob.conversations.items.retrieve(item, conversation_id=bobs),
            "owner.item", "another user")
    # an item douane did not see, below her own conversation's path: listed by it, adopted
    assert alice.conversations.items.retrieve("msg_older", conversation_id=conversation)
    assert alice.responses.create(model="m", input=[
        {"type": "item_reference", "id": "msg_older"}]).status == "completed"


def test_anthropic_files_are_their_users(gw, upstream, users):
    alice, bob = (anthropic.Anthropic(base_url=gw.url + "/anthropic", api_key=t, max_retries=0)
                  for t in users)

    def read(c: anthropic.Anthropic, file_id: str):
        return c.beta.messages.create(model="m", max_tokens=10, betas=["files-api-2025-04-14"],
                                      messages=[{"role": "user", "content": [
                                          {"type": "document",
                                           "source": {"type": "file", "file_id": file_id}},
                                          {"type": "text", "text": "summarise"}]}])

    assert read(alice, "file_anth1").content[0].text == "read"  # adopted
    assert alice.beta.files.retrieve_metadata("file_anth1").id == "file_anth1"
    for use in (lambda: read(bob, "file_anth1"),
                lambda: bob.beta.files.retrieve_metadata("file_anth1")):
        before = len(upstream.requests)
        with pytest.raises(anthropic.NotFoundError) as err:
            use()
        record = assert_refused(gw, upstream, before, err.value.response, 404)
        assert record["reasons"][0]["rule"] == "owner.file", record
    assert [f.id for f in alice.beta.files.list().data] == ["file_anth1"]
    # the files her code execution made (answered whole, or streamed) are hers
    run = {"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "run"}]}
    assert alice.messages.create(**run).content[-1].text == "read"
    with alice.messages.stream(**run) as events:
        assert events.get_final_message().content[-1].text == "read"
    for made in ("file_made", "file_made_streamed"):
        before = len(upstream.requests)
        with pytest.raises(anthropic.NotFoundError) as err:
            bob.beta.files.retrieve_metadata(made)
        record = assert_refused(gw, upstream, before, err.value.response, 404)
        assert record["reasons"][0]["rule"] == "owner.file", record
        assert "issued to another user" in record["reasons"][0]["message"], record
        assert alice.beta.files.retrieve_metadata(made).id == made
    assert bob.beta.files.list().data == []


def test_an_operator_lists_transfers_and_releases_bindings(issuer, upstream, users, tmp_path,
                                                          capsys):
    """`douane owners`: a user's bindings (digests, never ids), a transfer and a release, each
    audited in operator-audit.jsonl; the gateway then serves them so (restarted here: a running
    one reads a binding again within a minute)."""
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(POLICY))
    config = base_config(issuer.url, upstream.url + "/v1",
                         policy={"files": [str(tmp_path / "policy.yaml")]},
                         gateway={"state_dir": str(tmp_path / "state")})
    with_claude(config, upstream.url)
    with Gateway(config, mode=f"reverse:{upstream.url}", env=ENV, workdir=tmp_path / "one") as gw:
        alice = client(gw, users[0])
        vs = alice.vector_stores.create(name="notes").id
        alice.files.retrieve("file-kept")
        alice.files.retrieve("file-freed")
    args = ["--config", str(gw.config_file)]
    assert main(["owners", "list", "alice@corp", *args]) == 0
    out = capsys.readouterr().out
    keys = {k: owners.digest("llm", kind, k) for k, kind in
            [(vs, "vector_stores"), ("file-kept", "files"), ("file-freed", "files")]}
    assert all(key in out for key in keys.values()) and "file-" not in out and vs not in out
    assert main(["owners", "transfer", "llm", "vector_stores", vs, "--to", "bob@corp",
                 "--reason", "alice moved teams", *args]) == 0
    assert main(["owners", "release", "llm", "files", keys["file-freed"], "--key", *args]) == 0
    with pytest.raises(SystemExit, match="no binding"):
        main(["owners", "release", "llm", "files", "file-freed", *args])
    operator = [json.loads(line) for line in
                (tmp_path / "state" / "audit" / "operator-audit.jsonl").read_text().splitlines()]
    assert [(r["event"], r["user"], r["to"], r["key"]) for r in operator[-2:]] == [
        ("owners.transferred", "alice@corp", "bob@corp", keys[vs]),
        ("owners.released", "alice@corp", None, keys["file-freed"])]
    assert vs not in json.dumps(operator)
    with Gateway(config, mode=f"reverse:{upstream.url}", env=ENV, workdir=tmp_path / "two") as gw:
        alice, bob = (client(gw, t) for t in users)
        assert bob.vector_stores.retrieve(vs).id == vs
        refused(gw, upstream, lambda: alice.vector_stores.retrieve(vs), "owner.vector_store",
                "another user")
        assert alice.files.retrieve("file-kept").id == "file-kept"
        assert bob.files.retrieve("file-freed").id == "file-freed"  # released: adopted again
        refused(gw, upstream, lambda: alice.files.retrieve("file-freed"), "owner.file",
                "another user")


def test_on_the_shared_store_every_replica_holds_them_and_an_outage_refuses(
        issuer, postgres, upstream, users, tmp_path, monkeypatch, capsys):
    """Two replicas on one PostgreSQL: files adopted (several in one statement) through one are
    refused to another user through the other; the operator's transfer is read by a replica
    with no memory of them; with the database stopped, a file no replica holds is refused 503
    before the upstream (fail closed)."""
    url = postgres.new_database().replace(f":{PASSWORD}@", "@")
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(POLICY))
    config = base_config(issuer.url, upstream.url + "/v1",
                         policy={"files": [str(tmp_path / "policy.yaml")]},
                         database={"url": url, "password": {"env": "DOUANE_TEST_DB_PASSWORD"},
                                   "timeout": 2})
    with_claude(config, upstream.url)
    env = {**ENV, "DOUANE_TEST_DB_PASSWORD": PASSWORD}
    with Gateway(config, mode=f"reverse:{upstream.url}", env=env, workdir=tmp_path / "a") as a, \
            Gateway(config, mode=f"reverse:{upstream.url}", env=env,
                    workdir=tmp_path / "b") as b:
        for gw in (a, b):
            wait_for_log(gw, "store .* ready")
        vs = client(a, users[0]).vector_stores.create(name="n", file_ids=["file-p1", "file-p2"]).id
        bob = client(b, users[1])
        for use, rule in ((lambda: bob.files.retrieve("file-p2"), "owner.file"),
                          (lambda: bob.vector_stores.retrieve(vs), "owner.vector_store")):
            refused(b, upstream, use, rule, "issued to another user")
        monkeypatch.setenv("DOUANE_TEST_DB_PASSWORD", PASSWORD)
        assert main(["owners", "transfer", "llm", "files", "file-p1", "--to", "bob@corp",
                     "--config", str(a.config_file)]) == 0
        assert main(["owners", "list", "bob@corp", "--config", str(a.config_file)]) == 0
        assert owners.digest("llm", "files", "file-p1") in capsys.readouterr().out
        with Gateway(config, mode=f"reverse:{upstream.url}", env=env,
                     workdir=tmp_path / "c") as c:
            wait_for_log(c, "store .* ready")
            assert client(c, users[1]).files.retrieve("file-p1").id == "file-p1"
            refused(c, upstream, lambda: client(c, users[0]).files.retrieve("file-p1"),
                    "owner.file", "another user")
        with postgres.outage():
            before = len(upstream.requests)
            with pytest.raises(openai.InternalServerError) as err:
                bob.files.retrieve("file-unknown-yet")
            record = assert_refused(b, upstream, before, err.value.response, 503)
            assert err.value.response.json()["error"]["code"] == "store_unavailable"
            assert record["reasons"][0]["rule"] == "store.unavailable"
