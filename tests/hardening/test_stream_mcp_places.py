"""A remote MCP server's items wherever a Responses stream may carry them (red team, stop 29):
the stream policy read an item event's `item` and the final response's `output` only; the
`response.created`, `response.in_progress` and `response.queued` events carry a response whose
`output` the API fills as it goes, and the label, the tools listed or a call's output there were
sent to the client before any later event could be blocked."""

from __future__ import annotations

import pytest

from tests.hardening.conftest import reverse_gateway, token_of
from tests.test_stream_mcp_items_e2e import (
    DENIED,
    POLICY,
    RESULT,
    ask,
    cut,
    listing,
    mcp_call,
    responses,
)


@pytest.fixture(scope="module")
def gw(issuer, llm, tmp_path_factory):
    with reverse_gateway(issuer, llm, tmp_path_factory.mktemp("stream-mcp-places"), POLICY, "") as gateway:
        yield gateway


@pytest.fixture(scope="module")
def token(issuer, secrets):
    return token_of(issuer, secrets, "eve@corp.example", ["engineering"])


EARLY = ("response.created", "response.in_progress", "response.queued")


@pytest.mark.parametrize("event", EARLY)
@pytest.mark.parametrize("case", ["server_label", "tool name", "call output"])
def test_an_mcp_item_in_an_early_response_event_meets_the_policy(gw, llm, token, event, case):
    item, rule, withheld = {
        "server_label": (mcp_call(DENIED, "sunny"), "deny.codename", DENIED),
        "tool name": (listing("weather", DENIED), "deny.codename", DENIED),
        "call output": (mcp_call("weather", RESULT), "deny.results", "falcon"),
    }[case]
    whole, events = responses([listing("other", "search")])
    name, first = events[0]
    early = {**first, "type": event, "response": {**first["response"], "output": [item]}}
    events = [(name, first), (event, early), *events[1:]] if event != name else \
        [(name, early), *events[1:]]
    status, text, decision_id = ask(gw, llm, token, "responses", whole, events, 0)
    assert status == 200
    cut(gw, text, decision_id, rule, withheld)


def test_an_mcp_item_in_an_unknown_event_meets_the_policy(gw, llm, token):
    """An event type douane does not know carrying an `item` (as the item events do)."""
    whole, events = responses([listing("other", "search")])
    future = ("response.future_item.added", {"type": "response.future_item.added",
                                             "sequence_number": 99, "output_index": 1,
                                             "item": mcp_call(DENIED, "sunny")})
    status, text, decision_id = ask(gw, llm, token, "responses", whole,
                                    [events[0], future, *events[1:]], 0)
    assert status == 200
    cut(gw, text, decision_id, "deny.codename", DENIED)
