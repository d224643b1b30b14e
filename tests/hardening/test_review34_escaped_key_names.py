"""Review, stop 34: a credential-named key whose name is written with JSON escapes of ASCII
letters (`"pass\\u0077ord"`, `"refresh_toke\\u006e"`: the same key to every JSON reader) kept its
value in the recording. `_credential` decodes the name, but the cheap gate before it
(`_KEY_END`, the raw text read backwards) saw no name ending as a credential's and skipped the
text: a number, an array, or a value of no catalogue shape (a refresh token, a short password)
was recorded as sent, in a body, in a tool call's arguments, or split across a stream's
deltas."""

from __future__ import annotations

import json
import random

import pytest
from mitmproxy import http

from douane.recording import writer
from tests.hardening.test_sec34_streamed_arguments import FORMATS, _cuts, _flow

PASSWORD = "<SECRET:detector.secret.password>"
CREDENTIAL = "<SECRET:detector.secret.credential>"


@pytest.mark.parametrize(("text", "secret"), [
    ('{"pass\\u0077ord": 87654321}', "87654321"),
    ('{"passwor\\u0064": "Hunter22!x"}', "Hunter22!x"),
    ('{"API_KE\\u0059": ["ak-plover-harbour"]}', "ak-plover-harbour"),
    ('{"refresh_toke\\u006e": "rt-plover-92"}', "rt-plover-92"),
    ('{"\\u0070\\u0061\\u0073\\u0073\\u0077\\u006f\\u0072\\u0064": "Hunter22!x"}', "Hunter22!x"),
    # a tool call's arguments: JSON in a string, its escapes escaped again
    (json.dumps({"arguments": '{"client_secre\\u0074": {"v": "cs-plover-7"}}'}), "cs-plover-7"),
])
def test_an_escaped_credential_name_s_value_is_not_recorded(text, secret):
    clean = writer._keyed(text)
    assert secret not in clean and (PASSWORD in clean or CREDENTIAL in clean), clean
    assert json.loads(clean)  # still JSON


def test_names_that_are_no_credential_are_kept():
    text = '{"caf\\u00e9": 1, "\\u0074oken": " Hello", "pass\\u0077ord_hint": 5}'
    assert writer._keyed(text) == text


ARGUMENTS = '{"user": "bob", "refresh_toke\\u006e": "rt-plover-92", "pass\\u0077ord": 4417}'


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_escaped_name_s_value_split_across_deltas_is_not_recorded(fmt):
    rng = random.Random(f"review34-{fmt}")
    for _ in range(30):
        f = _flow(fmt, _cuts(ARGUMENTS, rng))
        written = writer.recording_of(f.get_state(), frozenset(), (ARGUMENTS,))
        recorded = http.HTTPFlow.from_state(written).response.text
        assert "rt-plover-92" not in recorded and "4417" not in recorded, recorded
        assert "bob" in recorded
