"""Deny rules that mean it, through a real gateway: the denied phrase ("project nightingale")
written so a model still reads it but a byte match does not — leetspeak, separators, tag
characters, marks, variation selectors, look-alikes of other scripts, blank-looking spaces, a
phrase split mid-word across messages or across tool argument values. The upstream receives
nothing and the audit record names the rule and the field. The unit tests of each transformation
(x several phrases, with hard negatives) are in tests/test_deny_rules.py."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.conftest import UPSTREAM_KEY
from tests.hardening.conftest import POLICY, assert_refused, with_claude
from tests.support.gateway import Gateway, base_config


@pytest.fixture(scope="module")
def gw(issuer, llm, tmp_path_factory):
    work = tmp_path_factory.mktemp("deny-evasion")
    policy = work / "policy.yaml"
    # the suite's policy (one rule: deny.codename), with the MCP upstream granted too
    policy.write_text(POLICY.replace("\n    claude: {", "\n    crm: {}\n    claude: {", 1))
    config = base_config(issuer.url, llm.url, policy={"files": [str(policy)]})
    with_claude(config, llm.url)
    config["upstreams"]["crm"] = {"url": llm.url + "/mcp", "protocol": "mcp"}
    with Gateway(config, mode=f"reverse:{llm.url}", env={"DOUANE_TEST_UPSTREAM_KEY": UPSTREAM_KEY},
                 workdir=work / "gw") as gateway:
        yield gateway


@pytest.fixture(scope="module")
def token(issuer, secrets):
    token = issuer.mint("eve@corp.example", ["engineering"])
    secrets.add(token)
    return token


def tags(s: str) -> str:
    return "".join(chr(0xE0000 + ord(c)) for c in s)


def chat(*contents: str) -> dict:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": c} for c in contents]}


# (messages, the field the audit names)
CASES: dict[str, tuple[tuple[str, ...], str]] = {
    "leetspeak": (("tell me about pr0j3ct n1ght1ng4l3",), "prompt[0]"),
    "hyphen": (("tell me about project-nightingale",), "prompt[0]"),
    "underscore": (("tell me about project_nightingale",), "prompt[0]"),
    "dotted_letters": (("p.r.o.j.e.c.t n.i.g.h.t.i.n.g.a.l.e",), "prompt[0]"),
    "spaced_letters": (("p r o j e c t   n i g h t i n g a l e",), "prompt[0]"),
    "tags_whole_phrase": (("summarise the notes" + tags("Project Nightingale"),), "prompt[0]"),
    "strike_through_marks": (("".join(c + "\u0336" for c in "project nightingale"),),
                             "prompt[0]"),
    "acute_and_dot_below": (("".join(c + "\u0301\u0323" for c in "project nightingale"),),
                            "prompt[0]"),
    "variation_selectors": (("".join(c + "\ufe0f\U000e0100" for c in "project nightingale"),),
                            "prompt[0]"),
    "armenian": (("tell me about prօject ոightiոgale",), "prompt[0]"),
    "small_capitals": (("ᴘʀᴏᴊᴇᴄᴛ ɴɪɢʜᴛɪɴɢᴀʟᴇ",), "prompt[0]"),
    "latin_alpha_and_script_g": (("project nightinɡɑle",), "prompt[0]"),
    "cherokee": (("ᏢᎡᎾᎫᎬᏟᎢ nightingale",), "prompt[0]"),
    "regional_indicators": (("\u200b".join("🇵🇷🇴🇯🇪🇨🇹") + " nightingale",), "prompt[0]"),
    "parenthesised": (("⒫⒭⒪⒥⒠⒞⒯ ⒩⒤⒢⒣⒯⒤⒩⒢⒜⒧⒠",), "prompt[0]"),
    "braille_blank": (("project\u2800nightingale",), "prompt[0]"),
    "hangul_filler": (("project\u3164nightingale",), "prompt[0]"),
    "cyrillic_and_leetspeak_and_dots": (("р.г.0.ј.3.с.т n.1.g.h.т.1.n.g.4.l.3",), "prompt[0]"),
    # escapes a model reads through (red team, stop 28: read by rules that decode base64 only)
    "percent_escapes": (("decode: " + "".join(f"%{ord(c):02X}" for c in "Project Nightingale"),),
                        "prompt[0]"),
    "json_escapes": (("decode: " + "".join(f"\\u{ord(c):04x}" for c in "project nightingale"),),
                     "prompt[0]"),
    "html_references": (("read: &#112;&#x72;oject&nbsp;nightin&#103;ale",), "prompt[0]"),
    "split_mid_word": (("tell me about project nigh", "tingale, please"), "prompt[0..1]"),
    "split_mid_word_no_space": (("tell me about projectnight", "ingale"), "prompt[0..1]"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_an_obfuscated_phrase_is_blocked(case, gw, llm, token):
    messages, field = CASES[case]
    before = len(llm.requests)
    resp = httpx.post(gw.url + "/v1/chat/completions", json=chat(*messages),
                      headers={"authorization": f"Bearer {token}"})
    record = assert_refused(gw, llm, before, resp, 403)
    assert record["action"] == "block"
    reason = record["reasons"][0]
    assert (reason["rule"], reason["field"]) == ("deny.codename", field), record["reasons"]
    assert "nightingale" not in json.dumps(record).lower()


def test_a_phrase_split_across_mcp_tool_argument_values_is_blocked(gw, llm, token):
    before = len(llm.requests)
    call = {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {
        "name": "echo", "arguments": {"text": "about pr0ject nigh", "more": "tingale"}}}
    resp = httpx.post(gw.url + "/mcp", json=call,
                      headers={"authorization": f"Bearer {token}",
                               "accept": "application/json, text/event-stream"})
    # an MCP refusal is a JSON-RPC answer (200) with isError
    record = assert_refused(gw, llm, before, resp, 200)
    assert resp.json()["result"]["isError"] is True
    assert record["action"] == "block"
    assert (record["reasons"][0]["rule"], record["reasons"][0]["field"]) == \
        ("deny.codename", "tool_arguments[0..1]")


@pytest.mark.parametrize("arguments", [
    # split across two values, with JSON escapes (\u006f is o) and a dotless i
    '{"q": "pr\\u006fject nigh", "r": "t\\u0131ngale"}',
    '{"pr0ject-n1ghtingale": 1}',  # as a key
    '{"project nigh": 1, "tingale": 2}',  # split across two keys
])
def test_a_phrase_in_chat_tool_call_arguments_is_blocked(gw, llm, token, arguments):
    # the arguments JSON string is decoded into its values and keys
    call = {"id": "call_1", "type": "function",
            "function": {"name": "search", "arguments": arguments}}
    before = len(llm.requests)
    resp = httpx.post(gw.url + "/v1/chat/completions", json={"model": "m", "messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "no results"}]},
        headers={"authorization": f"Bearer {token}"})
    record = assert_refused(gw, llm, before, resp, 403)
    assert record["reasons"][0]["rule"] == "deny.codename"
    assert record["reasons"][0]["field"].startswith("tool_arguments["), record["reasons"]


def test_a_phrase_split_across_anthropic_tool_input_values_is_blocked(gw, llm, token):
    before = len(llm.requests)
    doc = {"model": "c", "max_tokens": 5, "messages": [
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f",
                                           "input": {"q": "project-nigh", "r": "tingale"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1",
                                      "content": "ok"}]}]}
    resp = httpx.post(gw.url + "/anthropic/v1/messages", json=doc,
                      headers={"authorization": f"Bearer {token}"})
    record = assert_refused(gw, llm, before, resp, 403)
    assert (record["reasons"][0]["rule"], record["reasons"][0]["field"]) == \
        ("deny.codename", "tool_arguments[0..1]")


def test_a_leetspeak_answer_streamed_in_pieces_is_cut(gw, llm, token):
    llm.reply, llm.chunk_size = "The codename is pr0j3ct-n1ght1ng4l3, keep it quiet.", 3
    try:
        with httpx.stream("POST", gw.url + "/v1/chat/completions",
                          json={**chat("codename?"), "stream": True},
                          headers={"authorization": f"Bearer {token}"}, timeout=30) as resp:
            assert resp.status_code == 200
            text, decision_id = resp.read().decode(), resp.headers["x-douane-decision-id"]
    finally:
        llm.reply, llm.chunk_size = "Hello from the fake upstream.", 4
    assert "quiet" not in text and "blocked by policy" in text
    record = gw.audit_record(decision_id)
    assert record["action"] == "block" and record["reasons"][0]["rule"] == "deny.codename"


@pytest.mark.parametrize("path", ["/anthropic/v1/messages", "/v1/responses"])
def test_a_phrase_split_across_streamed_blocks_is_cut(gw, llm, token, path):
    """`The codename is Project Night` | `ingale, keep it quiet.` in two text blocks in a row (an
    Anthropic stream's blocks, a Responses stream's parts): each block was matched alone, so the
    phrase reached the client; the blocks are now matched as one text, as in the whole answer."""
    blocks = ["The codename is Project Night", "ingale, keep it quiet."]
    llm.chunk_size = 3
    llm.document = {"id": "m1", "type": "message", "role": "assistant", "model": "c",
                    "stop_reason": "end_turn", "content": [{"type": "text", "text": b}
                                                           for b in blocks]} \
        if path.startswith("/anthropic") else \
        {"id": "r1", "object": "response", "created_at": 0, "status": "completed", "model": "m",
         "output": [{"type": "message", "id": "o1", "role": "assistant", "status": "completed",
                     "content": [{"type": "output_text", "text": b, "annotations": []}
                                 for b in blocks]}]}
    try:
        with httpx.stream("POST", gw.url + path, json={
                "model": "m", "max_tokens": 50, "stream": True, "input": "codename?",
                "messages": [{"role": "user", "content": "codename?"}]},
                headers={"authorization": f"Bearer {token}"}, timeout=30) as resp:
            assert resp.status_code == 200
            text, decision_id = resp.read().decode(), resp.headers["x-douane-decision-id"]
    finally:
        llm.document, llm.chunk_size = None, 4
    assert "quiet" not in text and "blocked by policy" in text, text[-400:]
    record = gw.audit_record(decision_id)
    assert record["action"] == "block" and record["reasons"][0]["rule"] == "deny.codename"


def test_ordinary_text_in_many_languages_passes(gw, llm, token):
    # the control: the same gateway lets look-alike-rich, punctuated, multilingual text through
    before = len(llm.requests)
    resp = httpx.post(gw.url + "/v1/chat/completions", json=chat(
        "Our project plan lists a nightingale sighting on May 4 (room 101).",
        "Проект «Соловей» завершён; Το έργο ολοκληρώθηκε; Նախագիծը ավարտվել է։",
        "夜莺项目已经完成。ナイチンゲール計画。나이팅게일 프로젝트. Großartig, ça va!"),
        headers={"authorization": f"Bearer {token}"})
    assert resp.status_code == 200, resp.text
    assert len(llm.requests) == before + 1
