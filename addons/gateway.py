"""douane's mitmproxy script: `mitmdump -s addons/gateway.py --set douane_config=FILE`.

One addon, the `Checkpoint`, receives mitmproxy's per-flow events and calls each concern's step in
the order below: a flow is routed (for the shape of any refusal), authenticated, brokered,
inspected, decided, held and masked before the audit trail records the decision, then marked and
recorded; the upstream credential is added last.
"""

from mitmproxy import contentviews

from douane.admin import Admin, Metrics
from douane.approvals.addon import Approvals
from douane.audit import AuditTrail
from douane.builtins import DropIdleBuiltins
from douane.contentview import DouaneContentview
from douane.health import LoopMonitor
from douane.identity import Authenticate
from douane.inspect import Inspect
from douane.marks import Mark
from douane.masking.addon import Mask
from douane.owners import StoredObjects
from douane.pipeline import Checkpoint, Order
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
from douane.upstreamerrors import UpstreamErrors
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
keep_refusals = KeepRefusals()
# /healthz says "draining" at shutdown while flows finish, before the writers close
admin = Admin(settings, metrics, loop_monitor, authenticate, audit_trail, record, approvals,
              shared)
timeouts = ClientTimeouts(settings)
route = Route(settings)
resource_metadata = ProtectedResourceMetadata(settings)
resource_access = ResourceAccess(settings)
broker = Broker(settings, enforce.policy)
inspect = Inspect(settings)
stored_objects = StoredObjects(settings, shared, enforce.policy)  # ids bound to their users
police_websocket = PoliceWebSocket(enforce, audit_trail)
originals = KeepOriginals(settings)
mark = Mark()
inject_credential = InjectCredential()

contentviews.add(DouaneContentview)  # LLM and MCP flows read as conversations

# Load, configure, running and done reach these in this order: settings first, then the shared
# store (before the concerns that use it), admin early; the store closes after every other `done`.
CONCERNS = (settings, shared, keep_refusals, loop_monitor, admin, timeouts, route,
            resource_metadata, authenticate, resource_access, broker, inspect, stored_objects,
            pins, enforce,
            pins.calls, approvals, police_websocket, originals, mask, audit_trail, metrics, mark,
            record, inject_credential, UpstreamErrors(), shared.closer,
            DropIdleBuiltins())  # at running: mitmproxy's idle built-ins leave the event chain

ORDER = Order(
    http_connect=(
        timeouts.http_connect,
        authenticate.http_connect,
        broker.http_connect,  # refuses tunnels to undeclared hosts before any TLS
        audit_trail.http_connect,  # a refused CONNECT is a decision
        metrics.http_connect,
        mark.http_connect,
        record.http_connect,
    ),
    requestheaders=(
        admin.requestheaders,  # in flight, for draining
        timeouts.requestheaders,
        route.requestheaders,  # first: a refusal has the upstream's shape
        resource_metadata.requestheaders,  # MCP clients discover where to log in, unauthenticated
        authenticate.requestheaders,
        resource_access.requestheaders,  # an MCP resource's tokens: issued for it, its scopes
        broker.requestheaders,  # grants may name operations douane does not parse
        stored_objects.requestheaders,  # an MCP session of another user is unknown
        inspect.requestheaders,
        audit_trail.requestheaders,  # no request goes on while the audit log cannot be written
        record.requestheaders,
    ),
    request=(
        keep_refusals.request,  # an MCP refusal given on the headers names the request's id
        timeouts.request,
        inspect.request,  # the body is parsed once, here; every later step reads the interaction
        stored_objects.request,  # a stored answer or conversation of another user is unknown
        enforce.request,
        pins.calls.request,  # after Enforce: a call to a withheld MCP tool is refused
        approvals.request,  # a "hold" waits for an approver
        originals.request,  # before masking: the unmasked bodies, when auditors want them
        mask.request,
        inject_credential.request,  # last: nothing held, shown or recorded carries the key
    ),
    responseheaders=(
        keep_refusals.responseheaders,  # first: a refusal is never replaced (server replay)
        broker.responseheaders,  # the credential has been sent: forgotten
        stored_objects.responseheaders,  # an MCP session is bound before its id leaves
        inspect.responseheaders,  # an SSE answer is rewritten event by event; filters follow
        broker.streamheaders,  # first of them: a stream echoing the credential ends
        stored_objects.streamed_states,  # an MCP requestState is bound before its event leaves
        pins.responseheaders,
        enforce.responseheaders,
        originals.responseheaders,
        mask.responseheaders,
        audit_trail.responseheaders,  # the decision id on the answer
    ),
    response=(
        admin.response,
        timeouts.response,
        inspect.response,
        broker.response,  # an answer echoing the credential never reaches the caller
        stored_objects.response,  # whose stored answer (conversation, completion) this is
        pins.response,  # before Enforce: MCP tools are pinned from whole listings
        enforce.response,
        originals.response,
        mask.response,
        audit_trail.response,
        metrics.response,  # each flow counted once it is recorded
        mark.response,  # blocked, held, masked flows stand out in mitmweb and in recordings
        record.response,
        timeouts.answered,  # last: the connection idles once its answer leaves
    ),
    error=(
        admin.error,
        timeouts.error,
        broker.error,
        inspect.error,
        audit_trail.error,
        metrics.error,
        mark.error,
        record.error,
    ),
    douane_head_refused=(audit_trail.douane_head_refused,),  # no flow: its record alone
    douane_stream_wait=(mask.douane_stream_wait,),  # a masked stream's end, analysed off the loop
    websocket_start=(timeouts.websocket_start, police_websocket.websocket_start),
    websocket_message=(
        police_websocket.websocket_message,  # every message policed
        record.websocket_message,  # the messages held past a bound are written and let go
    ),
    websocket_end=(police_websocket.websocket_end, record.websocket_end),
    client_connected=(timeouts.client_connected,),
    client_disconnected=(timeouts.client_disconnected,),
)

addons = [Checkpoint(CONCERNS, ORDER)]
