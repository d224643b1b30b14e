"""Review, stop 34: the org's key echoed base64-encoded and wrapped in lines (as `base64`,
`openssl base64` and PEM write it: every decoder skips the breaks) inside a JSON string. The
breaks are JSON's `\\n` escapes there, not line breaks: `EchoForms.within` joined only a text's
real lines, so a body, or an event's data holding the whole wrapped run, passed."""

from __future__ import annotations

import base64
import json
import random

import pytest

from douane import routing
from douane.config import Credential
from douane.protocols.streams import EchoForms

KEY = "sk-org-Zq8xP2mL9vR4tY7wK1nB6cD3fG5hJ0aE"


def wrapped(form: str, width: int, brk: str) -> str:
    return brk.join(form[i:i + width] for i in range(0, len(form), width))


@pytest.mark.parametrize("brk", ["\n", "\r\n"])
@pytest.mark.parametrize("width", [4, 19, 40, 50])
def test_a_wrapped_base64_echo_in_a_json_body_is_found(width, brk):
    rng = random.Random(width)
    for offset in range(3):
        prefix = bytes(rng.randrange(256) for _ in range(offset))
        encoded = base64.b64encode(prefix + KEY.encode()).decode()
        body = json.dumps({"choices": [{"message": {"content": "here: " +
                                                    wrapped(encoded, width, brk)}}]})
        assert "\\n" in body and "\n" not in body
        credential = Credential("authorization", f"Bearer {KEY}", "env", secret=KEY)
        assert routing._echoes(credential, body.encode()), body
        assert EchoForms.of(KEY).within(body)  # an event's data, whole


def test_ordinary_answers_with_line_breaks_are_not_refused():
    forms = EchoForms.of(KEY)
    rng = random.Random(3)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    for _ in range(200):
        text = "\n".join("".join(rng.choice(alphabet) for _ in range(76)) for _ in range(8))
        assert not forms.within(json.dumps({"content": text}))
    cut = base64.b64encode(KEY[:-4].encode()).decode()  # the key cut short: not it
    assert not forms.within(json.dumps({"content": wrapped(cut, 16, "\n")}))
