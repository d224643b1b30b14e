"""Security, stop 34: a value under a credential's name was a secret only when it was a string.
The recording writer left a number, an array or an object under `password`, `api_key`,
`client_secret` as sent (`{"password": 12345678}`, `{"api_key": ["..."]}`), and the catalogue
(policy, masking, recording alike) read a value only right after the name's `:`, so
`{"password": ["Hunter22!"]}` passed the policy where `{"password": "Hunter22!"}` is refused.
Now the writer replaces a credential-named key's value of any type but true/false/null, and the
catalogue's `password` and `credential` kinds read through a JSON array's or object's openings
(a few deep) to the value, with the same checks of the value."""

from __future__ import annotations

import json

import pytest

from douane import secrets
from douane.interaction import TextPiece
from douane.masking import operators
from douane.policy import engine as policy_engine
from douane.policy import model
from douane.recording import writer
from tests import test_secrets

# test_secrets' masking settings and its analyser and policy fixtures (module-scoped here too)
SETTINGS = test_secrets.SETTINGS
analyzer, policy = test_secrets.analyzer, test_secrets.policy

PASSWORD = "<SECRET:detector.secret.password>"
CREDENTIAL = "<SECRET:detector.secret.credential>"


@pytest.mark.parametrize(("text", "want"), [
    ('{"password": 12345678}', f'{{"password": "{PASSWORD}"}}'),
    ('{"password": -1.5e3, "user": "bob"}', f'{{"password": "{PASSWORD}", "user": "bob"}}'),
    ('{"api_key": ["ak-plover-harbour"]}', f'{{"api_key": "{CREDENTIAL}"}}'),
    ('{"access_token": {"value": "at-x"}, "user": "bob"}',
     f'{{"access_token": "{CREDENTIAL}", "user": "bob"}}'),
    ('{"a": [{"client_secret": [1, "x", {"b": "c"}]}]}', f'{{"a": [{{"client_secret": "{CREDENTIAL}"}}]}}'),
    # cut short (an event's text cut by the stream): to the line's end, failing closed
    ('{"password": [1, 2\n"next": 1', f'{{"password": "{PASSWORD}"\n"next": 1'),
    # no value: kept
    ('{"password": null, "api_key": true, "secret": false}', None),
    ('{"token": " Hello", "logprob": -0.1, "top": [{"token": "a"}]}', None),
])
def test_the_recording_redacts_a_credential_name_s_value_of_any_type(text, want):
    assert writer._keyed(text) == (text if want is None else want)


def test_inside_a_json_text_inside_a_string():
    arguments = json.dumps({"password": 12345678, "oauth": {"client_secret": ["cs-1", "cs-2"]}})
    body = json.dumps({"arguments": arguments})
    clean = writer._keyed(body)
    assert "12345678" not in clean and "cs-1" not in clean and "cs-2" not in clean
    assert json.loads(json.loads(clean)["arguments"]) == {
        "password": PASSWORD, "oauth": {"client_secret": CREDENTIAL}}


def flagged(policy: model.Policy, arguments: str) -> set[str]:
    """The policy's secret reasons for a tool call's arguments carrying `arguments`."""
    pieces = [TextPiece("tool_arguments", "assistant", arguments,
                        ("messages", 1, "tool_calls", 0, "function", "arguments"))]
    return {r.rule for r in policy_engine.risk(policy, pieces)}


# each as a string is flagged; wrapped in an array or an object it must be too
WRAPPED = [
    ("password", "Hunter22!", "password"),
    ("api_key", "abcd1234efgh5678ijkl", "credential"),
    ("client_secret", "Zq8wPlover4Harbour7x", "credential"),
]


@pytest.mark.parametrize(("name", "value", "rule"), WRAPPED)
@pytest.mark.parametrize("wrap", [
    lambda v: v, lambda v: [v], lambda v: [[v]], lambda v: {"value": v},
    lambda v: [{"value": v}],
], ids=["string", "array", "nested", "object", "array-object"])
def test_policy_masking_and_recording_read_inside_arrays_and_objects(analyzer, policy, name,
                                                                       value, rule, wrap):
    text = json.dumps({"user": "bob", name: wrap(value)})
    found = secrets.find(text)
    assert [(text[f.start:f.end], f.kind.rule) for f in found] == \
        [(value, f"detector.secret.{rule}")]
    assert f"detector.secret.{rule}" in flagged(policy, text)
    masked = operators.apply(SETTINGS, text, analyzer.analyze(text), {})
    assert value not in masked
    assert value not in writer._redacted(text, "application/json")


@pytest.mark.parametrize("text", [
    "password: [redacted]", '{"password": ["${DB_PASSWORD}"]}', '{"api_key": ["<your key>"]}',
    '{"token": [" Hello", " world"]}', '{"secret": {"name": "db-password"}}',
])
def test_placeholders_inside_arrays_stay_placeholders(policy, text):
    assert secrets.find(text) == []
    assert not flagged(policy, text)
