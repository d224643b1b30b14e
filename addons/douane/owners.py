"""State an upstream keeps for one user, named by an id it issued: an MCP session, a stored
Responses answer (`previous_response_id` continues it, the whole conversation with it).

douane sends every user's requests to an upstream with one credential, so such an id is all the
upstream tells users apart by: another user holding it (from a screen, a log, a recording) would
continue that conversation or act in that session. Each id is remembered with the user it was
issued to (per replica, the latest `SIZE`), and another user naming it is refused as the upstream
refuses an id it does not know. An id this replica did not see issued passes (another replica, or
one before a restart, may have).
"""

from __future__ import annotations

import re
from collections import OrderedDict

from mitmproxy import http

from douane import protocols
from douane.flowstate import Reason, state
from douane.refusals import refuse

SIZE = 100_000
# a stored answer's id: the first `"id"` of its JSON or of its stream (`response.created`)
RESPONSE_ID = re.compile(rb'"id"\s*:\s*"(resp_[A-Za-z0-9_-]{1,200})"')
RESPONSE_ID_BYTES = 64 * 1024  # where a stream says it (its first event)


class Owners:
    def __init__(self) -> None:
        self._owner: OrderedDict[tuple[str, str], str] = OrderedDict()

    def claim(self, upstream: str, key: str, user: str) -> None:
        self._owner[upstream, key] = user
        self._owner.move_to_end((upstream, key))
        if len(self._owner) > SIZE:
            self._owner.popitem(last=False)

    def foreign(self, upstream: str, keys: list[str], user: str) -> bool:
        """Whether one of `keys` was issued to another user."""
        return any(self._owner.get((upstream, k), user) != user for k in keys)


class StoredResponses:
    """`previous_response_id` names an answer issued to the caller, or one this replica never
    saw issued."""

    def __init__(self) -> None:
        self.owners = Owners()

    def request(self, flow: http.HTTPFlow) -> None:
        st = state(flow)
        if flow.response or flow.error or not self._responses(flow):
            return
        assert st.upstream and st.identity
        previous = protocols.document(flow, "request").get("previous_response_id")
        if isinstance(previous, str) and self.owners.foreign(st.upstream.name, [previous],
                                                             st.identity.user):
            refuse(flow, 404, "no such stored response for this user", "response_not_found",
                   Reason("owner.response", "previous_response_id names an answer issued to "
                                            "another user"))

    def response(self, flow: http.HTTPFlow) -> None:
        st = state(flow)
        if not self._responses(flow) or not flow.response or flow.response.status_code != 200:
            return
        assert st.upstream and st.identity
        found = RESPONSE_ID.search(flow.response.raw_content or b"", 0, RESPONSE_ID_BYTES)
        if found:
            self.owners.claim(st.upstream.name, found[1].decode(), st.identity.user)

    @staticmethod
    def _responses(flow: http.HTTPFlow) -> bool:
        st = state(flow)
        return bool(st.interaction and st.interaction.operation == "responses" and st.upstream
                    and st.identity and flow.live)
