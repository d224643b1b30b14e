"""Security, stop 34: the credential-echo check (routing's for headers and bodies, streams'
`EchoGuard` for streams) compared exact bytes: an upstream echoing the org's key base64-encoded
(at any of its three offsets in a longer run, standard or URL-safe), hex, percent-encoded, as
JSON `\\u` escapes, in mixed forms, or split across an event's data lines passed, and a client
decodes each back. `streams.EchoForms` now names every such form; a stream's text holds back
only a tail that may begin one. Through a real gateway (the stop-33 echo gateway) and in
process, with property tests over random splits."""

from __future__ import annotations

import base64
import json
import random
import urllib.parse

import httpx
import pytest

from douane.protocols.streams import EchoForms, EchoGuard
from tests.hardening.conftest import token_of
from tests.hardening.test_sec33_stream_echo import KEY, ask, events_of, gw, splits, texts, upstream  # noqa: F401  (the gateway's fixtures)

SK = "sk-upstream-test-0123456789abcdefghijklmnopqrstuv"


def encodings(key: str, rng: random.Random) -> dict[str, str]:
    raw = key.encode()
    before = bytes(rng.randrange(256) for _ in range(rng.randint(0, 5)))
    after = bytes(rng.randrange(256) for _ in range(rng.randint(0, 5)))
    mixed_pct = "".join(f"%{ord(c):02x}" if rng.random() < 0.5 else c for c in key)
    mixed_u = "".join(f"\\u{ord(c):04x}" if rng.random() < 0.5 else c for c in key)
    return {
        "base64": base64.b64encode(before + raw + after).decode(),
        "base64url": base64.urlsafe_b64encode(before + raw + after).decode().rstrip("="),
        "hex": (before + raw + after).hex(), "HEX": raw.hex().upper(),
        "percent": urllib.parse.quote(key, safe="") if rng.random() < 0.5 else
        "".join(f"%{b:02X}" for b in raw),
        "mixed percent": mixed_pct if mixed_pct != key else "%" + raw[:1].hex() + key[1:],
        "json escapes": json.dumps(key).strip('"').replace(key[0], f"\\u{ord(key[0]):04x}"),
        "mixed escapes": mixed_u if mixed_u != key else f"\\u{ord(key[0]):04x}" + key[1:],
        "lines": key[:7] + "\n" + key[7:20] + "\r\n" + key[20:],
    }


@pytest.mark.parametrize("key", [KEY, SK])
def test_every_form_is_found_and_ordinary_text_is_not(key):
    forms = EchoForms.of(key)
    for seed in range(200):
        rng = random.Random(seed)
        for name, encoded in encodings(key, rng).items():
            assert forms.within(f"error: {encoded} was refused"), (seed, name, encoded)
    for seed in range(200):
        rng = random.Random(seed)
        text = "".join(rng.choice("abcdef0123456789 %\\u-_+/=\n") for _ in range(400))
        assert not forms.within(text), text
    # the key cut short, in any form, is no echo
    for seed in range(50):
        for encoded in encodings(key[:-2], random.Random(seed)).values():
            assert not forms.within(encoded), encoded


@pytest.mark.parametrize("key", [KEY, SK])
def test_the_guard_over_random_splits_of_each_form(key):
    """A channel's text holding a form, split at random: never whole out of the guard, and what
    came before it does leave; the same text with the form cut short passes whole."""
    forms = EchoForms.of(key)
    for seed in range(300):
        rng = random.Random(seed)
        for name, encoded in encodings(key, rng).items():
            if name == "lines":  # (a channel's text is not split by SSE lines)
                continue
            text = f"Sure, here it is: {encoded} and more."
            found: list[str] = []
            guard = EchoGuard(key, found.append)
            out = ""
            for piece in splits(rng, text, 12):
                out += guard.feed("c", piece)
                if found:
                    break
            else:
                out += guard.finish("c")
            assert found and not forms.within(out) and text.startswith(out), (seed, name, out)
            if not name.startswith("mixed"):  # (mixed: what left before no form began is out)
                assert "here it is: " in out, (seed, name, out)
            short = f"Sure: {encodings(key[:-2], random.Random(seed))[name]} and more."
            guard, out = EchoGuard(key, found.append), ""
            found.clear()
            for piece in splits(rng, short, 12):
                out += guard.feed("c", piece)
            assert not found and out + guard.finish("c") == short, (seed, name)


def test_an_event_s_data_lines_joined():
    found: list[str] = []
    guard = EchoGuard(KEY, found.append)
    from douane.protocols.sse import Event
    guard.event(Event(f'{{"a": "{KEY[:10]}\n{KEY[10:]}"}}'))
    assert found


def test_a_body_echoing_an_encoded_key_is_refused(gw, upstream, issuer, secrets):  # noqa: F811
    """Before (f8b31ab): 200, the base64 of the key in the body."""
    token = token_of(issuer, secrets, "echoforms@corp.example", ["engineering"])
    encoded = base64.b64encode(b"key=" + KEY.encode()).decode()
    body = json.dumps({"error": {"message": f"bad auth {encoded}", "type": "invalid_request"}})

    def answer(handler, _req) -> None:
        raw = body.encode()
        handler.send_response(400)
        handler.send_header("content-type", "application/json")
        handler.send_header("content-length", str(len(raw)))
        handler.end_headers()
        handler.wfile.write(raw)
    upstream.answer = answer
    try:
        resp = httpx.post(gw.url + "/az/chat/completions", timeout=60,
                          headers={"authorization": f"Bearer {token}"},
                          json={"model": "gpt-4o-mini", "max_tokens": 5,
                                "messages": [{"role": "user", "content": "hello"}]})
    finally:
        upstream.answer = None
    assert resp.status_code == 502 and encoded not in resp.text, resp.text
    assert "upstream_credential_echo" in resp.text


@pytest.mark.parametrize("protocol", ["openai", "anthropic"])
def test_a_stream_spelling_an_encoded_key_ends_before_it_leaves(gw, upstream, issuer,  # noqa: F811
                                                                secrets, protocol):
    """Before (f8b31ab): the base64 of the key whole in the client's text, 200."""
    token = token_of(issuer, secrets, "echoforms@corp.example", ["engineering"])
    for seed in range(3):
        rng = random.Random(seed)
        encoded = base64.b64encode(("x" * seed).encode() + KEY.encode()).decode()
        reply = f"Sure. Here is your key, encoded as asked, in base64: {encoded} - keep it safe."
        resp = ask(gw, upstream, token, protocol, events_of(protocol, splits(rng, reply, 20)), rng)
        said = texts(protocol, resp.text)
        assert encoded not in said and "keep it safe" not in said, (seed, said)
        assert said.startswith("Sure.") and "withheld" in resp.text, (seed, resp.text[-300:])
