"""`Mark`: blocked, held, refused, masked and failed flows stand out in mitmweb's flow list.

mitmproxy 12 markers are emoji shortcodes. The mark is set once the decision is final (after the
audit trail, before `Record` copies the flow), so recordings carry it, and mitmweb, which updates
its list after the script's hooks, shows it. Allowed flows stay unmarked. A flow waiting for an
approver is already shown as intercepted; it is marked by how its hold ended.
"""

from __future__ import annotations

from mitmproxy import http

from douane.flowstate import peek

MARKERS = {
    "block": ":no_entry:",
    "refuse": ":no_entry_sign:",
    "hold": ":hourglass:",
    "mask": ":mask:",
    "error": ":warning:",
}


class Mark:
    def http_connect(self, flow: http.HTTPFlow) -> None:
        self._mark(flow)

    def response(self, flow: http.HTTPFlow) -> None:
        self._mark(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._mark(flow)

    @staticmethod
    def _mark(flow: http.HTTPFlow) -> None:
        st = peek(flow)
        if st is not None and st.decision is not None and flow.live:
            flow.marked = MARKERS.get(st.decision.action, "")
