"""State an upstream keeps for one user, named by an id it issued: an MCP session, a stored
Responses answer (`previous_response_id` continues it, the whole conversation with it), a
conversation (`conversation` in a Responses request, the Conversations API), a stored chat
completion.

douane sends every user's requests to an upstream with one credential, so such an id is all the
upstream tells users apart by: another user holding it (from a screen, a log, a recording) would
continue that conversation or act in that session. Each id is remembered with the user it was
issued to (per replica, per kind the latest `SIZE` issued or used), and another user naming it is
refused as the upstream refuses an id it does not know. An id this replica did not see issued
passes, whatever its kind: another replica (without sticky routing, a user's next connection may
reach any worker) or this one before a restart issued it, and conversations live for weeks;
refusing those would refuse every user their own conversations after each restart.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass

from mitmproxy import http

from douane import protocols
from douane.flowstate import Reason, state
from douane.refusals import refuse

SIZE = 100_000
ISSUED_BYTES = 64 * 1024  # where an answer names its id (a stream: its first event)


@dataclass(frozen=True)
class Kind:
    prefix: str  # of the ids the upstream issues
    noun: str
    code: str  # the refusal's, as the API answers an id it does not know
    rule: str


# Stored objects by the path segment naming them.
KINDS = {"responses": Kind("resp_", "stored response", "response_not_found", "owner.response"),
         "conversations": Kind("conv_", "conversation", "conversation_not_found",
                               "owner.conversation"),
         "chat/completions": Kind("chatcmpl-", "stored chat completion", "not_found",
                                  "owner.chat_completion")}
# An id in a granted operation's path (`GET /v1/responses/{id}`,
# `/v1/conversations/{id}/items/{item}`, `/v1/chat/completions/{id}/messages`); the endpoints
# named there that are not ids.
STORED_PATH = re.compile(r"/(responses|conversations|chat/completions)/([^/]+)", re.IGNORECASE)
NOT_IDS = frozenset({("responses", "input_tokens"), ("responses", "compact")})


def _issued(prefix: str) -> re.Pattern[bytes]:
    # the first `"id"` of an answer's JSON or of its stream (`response.created`, a chunk)
    return re.compile(rb'"id"\s*:\s*"(' + re.escape(prefix.encode()) + rb'[A-Za-z0-9_-]{1,200})"')


ISSUED = {name: _issued(kind.prefix) for name, kind in KINDS.items()}


class Owners:
    def __init__(self) -> None:
        self._owner: OrderedDict[tuple[str, str], str] = OrderedDict()

    def claim(self, upstream: str, key: str, user: str) -> None:
        self._owner[upstream, key] = user
        self._owner.move_to_end((upstream, key))
        if len(self._owner) > SIZE:
            self._owner.popitem(last=False)

    def foreign(self, upstream: str, keys: list[str], user: str) -> bool:
        """Whether one of `keys` was issued to another user (here, among the latest `SIZE` issued
        or used)."""
        for key in keys:
            owner = self._owner.get((upstream, key))
            if owner is not None and owner != user:
                return True
            if owner is not None:
                self._owner.move_to_end((upstream, key))  # in use: kept, so it stays its user's
        return False


class StoredObjects:
    """Answers, conversations and chat completions an upstream stores are named by the user they
    were issued to only."""

    def __init__(self) -> None:
        # a table per kind: answers, far more frequent, do not push conversations out
        self.owners = {name: Owners() for name in KINDS}

    def request(self, flow: http.HTTPFlow) -> None:
        st = state(flow)
        if flow.response or flow.error or not self._governed(flow):
            return
        assert st.upstream and st.identity and st.interaction
        upstream, user = st.upstream.name, st.identity.user
        if st.interaction.granted:
            for m in STORED_PATH.finditer(flow.request.path.split("?")[0]):
                kind, named = m[1].lower(), m[2]
                if (kind, named) not in NOT_IDS and \
                        self.owners[kind].foreign(upstream, [named], user):
                    self._refuse(flow, kind, "the path names one issued to another user")
                    return
            if not flow.request.raw_content:
                return
        elif st.interaction.operation != "responses":
            return
        # a granted operation's body may name them too (`POST /v1/responses/input_tokens`)
        responses, conversations = self.owners["responses"], self.owners["conversations"]
        doc = protocols.document(flow, "request")
        if not isinstance(doc, dict):
            return
        previous = doc.get("previous_response_id")
        if isinstance(previous, str) and responses.foreign(upstream, [previous], user):
            self._refuse(flow, "responses", "previous_response_id names an answer issued to "
                                            "another user")
            return
        conversation = doc.get("conversation")
        named = conversation.get("id") if isinstance(conversation, dict) else conversation
        if conversation is not None and not isinstance(named, str):  # `{"id": "conv_..."}`
            self._refuse(flow, "conversations", "conversation names no id douane can read")
        elif conversation is not None and conversations.foreign(upstream, [named], user):
            self._refuse(flow, "conversations", "conversation names one issued to another user")

    def response(self, flow: http.HTTPFlow) -> None:
        st = state(flow)
        if not self._governed(flow) or not flow.response or flow.response.status_code != 200:
            return
        assert st.upstream and st.identity and st.interaction
        kind = self._issuing(flow)
        found = ISSUED[kind].search(flow.response.raw_content or b"", 0, ISSUED_BYTES) \
            if kind else None
        if found:
            self.owners[kind].claim(st.upstream.name, found[1].decode(), st.identity.user)

    @staticmethod
    def _issuing(flow: http.HTTPFlow) -> str | None:
        """The kind of stored object this (allowed) request creates, if any."""
        it = state(flow).interaction
        assert it
        if it.operation == "responses":
            return "responses"
        if it.operation == "chat.completions" and \
                protocols.document(flow, "request").get("store") is True:
            return "chat/completions"
        if it.granted and flow.request.method == "POST" and \
                flow.request.path.split("?")[0].endswith("/conversations"):
            return "conversations"
        return None

    @staticmethod
    def _refuse(flow: http.HTTPFlow, name: str, why: str) -> None:
        kind = KINDS[name]
        refuse(flow, 404, f"no such {kind.noun} for this user", kind.code, Reason(kind.rule, why))

    @staticmethod
    def _governed(flow: http.HTTPFlow) -> bool:
        st = state(flow)
        return bool(st.interaction and st.upstream and st.upstream.protocol == "openai"
                    and st.identity and flow.live)
