"""douane's mitmproxy script: `mitmdump -s addons/gateway.py --set douane_config=FILE`.

The addons run in this order on every flow: settings, identity, routing (credential broker), then
the inspection stages, and the audit trail last so it sees every decision.
"""

from douane.settings import Settings

settings = Settings()

addons = [
    settings,
]
