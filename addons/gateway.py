"""douane's mitmproxy script: `mitmdump -s addons/gateway.py --set douane_config=FILE`.

mitmproxy calls each hook on these addons in this order, so a flow is routed (for the shape of any
refusal), authenticated, brokered, inspected, decided and masked before the audit trail records the
decision.
"""

from mitmproxy import contentviews

from douane.admin import Admin, Metrics
from douane.approvals.addon import Approvals
from douane.audit import AuditTrail
from douane.contentview import DouaneContentview
from douane.health import LoopMonitor
from douane.identity import Authenticate
from douane.inspect import Inspect
from douane.marks import Mark
from douane.masking.addon import Mask
from douane.policy.addon import Enforce
from douane.recording.addon import Record
from douane.recording.originals import KeepOriginals
from douane.refusals import KeepRefusals
from douane.resource import ProtectedResourceMetadata, ResourceAccess
from douane.routing import Broker, InjectCredential, Route
from douane.settings import Settings
from douane.store.addon import SharedStore
from douane.timeouts import ClientTimeouts
from douane.toolpins import PinTools
from douane.websocket import PoliceWebSocket

settings = Settings()
shared = SharedStore(settings)  # PostgreSQL shared by replicas (`database:`), else None
audit_trail = AuditTrail(settings)
mask = Mask(settings)
enforce = Enforce(settings, shared)
loop_monitor = LoopMonitor()
authenticate = Authenticate(settings)
approvals = Approvals(settings, audit_trail, mask, shared)
record = Record(settings)
metrics = Metrics()
pins = PinTools(settings, audit_trail)

contentviews.add(DouaneContentview)  # LLM and MCP flows read as conversations

addons = [
    settings,
    shared,  # the store opens before the concerns that use it
    KeepRefusals(),  # first on every response: a refusal is never replaced (server replay)
    loop_monitor,
    # early: at shutdown /healthz says "draining" while flows finish, before the writers close
    Admin(settings, metrics, loop_monitor, authenticate, audit_trail, record, approvals),
    ClientTimeouts(settings),
    Route(settings),
    ProtectedResourceMetadata(settings),  # MCP clients discover where to log in, unauthenticated
    authenticate,
    ResourceAccess(),  # an MCP resource's tokens: issued for it, with its scopes
    Broker(settings, enforce.policy),  # grants may name operations douane does not parse
    Inspect(settings),
    pins,  # before Enforce: MCP tools are pinned from whole listings, not a caller's share
    enforce,
    pins.calls,  # after Enforce, before Approvals: a call to a withheld MCP tool is refused
    approvals,  # right after Enforce: a "hold" waits for an approver
    PoliceWebSocket(enforce, audit_trail),  # allowed WebSockets: every message policed
    KeepOriginals(settings),  # before Mask: the unmasked bodies, when auditors want them
    mask,
    audit_trail,
    metrics,  # after the audit trail: each flow counted once it is recorded
    Mark(),  # blocked, held, masked flows stand out in mitmweb and in recordings
    record,
    InjectCredential(),  # last: nothing held, shown or recorded before sending carries the key
    shared.closer,  # the store closes after every concern's `done`
]
