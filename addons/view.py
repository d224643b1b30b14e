"""Read recordings as conversations, without running the gateway (no config, no credentials, no
state written): `mitmdump -nr FILE.mitm -s addons/view.py --flow-detail 3`, or
`mitmweb -nr FILE.mitm -s addons/view.py`. The gateway script registers the same view.
"""

from mitmproxy import contentviews

from douane.contentview import DouaneContentview

contentviews.add(DouaneContentview)
