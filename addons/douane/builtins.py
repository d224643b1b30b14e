"""mitmproxy's built-in addons that would do nothing in this gateway, taken out of its event chain.

mitmproxy hands every event of every flow (requestheaders, request, responseheaders, response...)
to each addon of its chain, 36 in mitmdump, whether or not the addon has a hook for it. At
`running`, the built-ins that are idle under the options in force leave the chain: features behind
an option that is off (map_local, modify_headers, stickycookie, proxyauth, -w...) and addons that
only offer commands (cut, export, comment, browser). Their options and commands stay registered.
Turning one of those features on later is refused (restart with the option set), never ignored.
What guards traffic stays: block (block_global), disable_h2c, update_alt_svc, TLS, the proxy.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from typing import Any

from mitmproxy import ctx, exceptions
from mitmproxy.options import Options

logger = logging.getLogger(__name__)

# addon name -> (the option that turns it on, whether it is idle under the options in force)
IDLE: dict[str, tuple[str | None, Callable[[Options], bool]]] = {
    "anticache": ("anticache", lambda o: not o.anticache),
    "anticomp": ("anticomp", lambda o: not o.anticomp),
    "blocklist": ("block_list", lambda o: not o.block_list),
    "maplocal": ("map_local", lambda o: not o.map_local),
    "mapremote": ("map_remote", lambda o: not o.map_remote),
    "modifybody": ("modify_body", lambda o: not o.modify_body),
    "modifyheaders": ("modify_headers", lambda o: not o.modify_headers),
    "stickyauth": ("stickyauth", lambda o: not o.stickyauth),
    "stickycookie": ("stickycookie", lambda o: not o.stickycookie),
    "upstreamauth": ("upstream_auth", lambda o: not o.upstream_auth),
    "proxyauth": ("proxyauth", lambda o: not o.proxyauth),
    "save": ("save_stream_file", lambda o: not o.save_stream_file),
    "savehar": ("hardump", lambda o: not o.hardump),
    "readfilestdin": ("rfile", lambda o: not o.rfile),
    "dumper": ("flow_detail", lambda o: o.flow_detail == 0),  # mitmdump -q
    # mitm.it's certificate page is only ever asked of a proxy in regular-like modes
    "onboarding": (None, lambda o: not o.onboarding or
                   all(m.startswith("reverse:") for m in o.mode)),
    # commands only: no flow hooks
    "browser": (None, lambda o: True),
    "comment": (None, lambda o: True),
    "cut": (None, lambda o: True),
    "export": (None, lambda o: True),
}


# Per master, addon name -> the option that would need it: the instance a reloaded script makes
# still refuses what an earlier one took out.
_dropped: weakref.WeakKeyDictionary[Any, dict[str, str | None]] = weakref.WeakKeyDictionary()


class DropIdleBuiltins:
    def running(self) -> None:
        addons, dropped = ctx.master.addons, _dropped.setdefault(ctx.master, {})
        for name, (option, idle) in IDLE.items():
            addon = addons.get(name)
            if addon is not None and idle(ctx.options):
                addons.remove(addon)
                dropped[name] = option
        logger.debug("douane: mitmproxy addons out of the event chain: %s", ", ".join(dropped))

    def configure(self, updated: set[str]) -> None:
        for name, option in _dropped.get(ctx.master, {}).items():
            if option in updated and not IDLE[name][1](ctx.options):
                raise exceptions.OptionsError(
                    f"{option}: mitmproxy's {name} addon was idle at start and douane took it "
                    f"out of the event chain; restart with --set {option}=... to use it")
