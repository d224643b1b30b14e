"""mitmproxy's built-in addons that would do nothing in this gateway, taken out of its event chain.

mitmproxy hands every event of every flow (requestheaders, request, responseheaders, response...)
to each addon of its chain, 36 in mitmdump, whether or not the addon has a hook for it. At
`running`, the built-ins that are idle under the options in force leave the chain: features behind
an option that is off (map_local, modify_headers, stickycookie, proxyauth, -w...) and addons that
only offer commands (cut, export, comment, browser). Their options and commands stay registered.
Turning one of those features on later is refused (restart with the option set), never ignored.
What guards traffic stays: block (block_global), disable_h2c, update_alt_svc, TLS, the proxy.

The addons that stay are still walked for every event, and for the `update` event mitmproxy sends
after each flow event (8 walks per request), mitmproxy's walk costing a coroutine, a context
manager and a generator per addon, most finding nothing, and the event's arguments built anew for
each addon it calls. `install_walk` replaces it by the same walk that visits only the addons that
may have a hook for the event (worked out once per chain, scripts' children looked at each time)
and calls each hook itself with the arguments built once: a hook that exists is called exactly
as mitmproxy calls it (in order, async ones awaited, its errors logged by mitmproxy's `safecall`
and the walk going on, `AddonHalt` ending it); ~45% less than the walk it replaced per request
(four events and their `update`s, loaded host: 39 µs against 74; mitmproxy's own: ~320). It
cannot skip douane's steps: they are attributes of the `Checkpoint`. It is checked against
mitmproxy's source at start, as douane's other wraps (`protocols.mitmpatch`).

Each request and response mitmproxy reads is built with a check of its fields' types that runs only
in Python's debug mode (`if __debug__`, the default; gone under `python -O`): each optional field
(`trailers`, `content`, `timestamp_end`) first fails its check against the other type, raising a
TypeError whose traceback is a reference cycle only the garbage collector frees. It cost ~100 µs a
request and a response on a loaded host (~8 µs without), and gave the young collections most of
their garbage. The fields are mitmproxy's parsers' own (bytes, str, int, float), never of a
client's choosing: `install_untyped_messages` takes the check out, as `-O` would, checked against
mitmproxy's source the same way.
"""

from __future__ import annotations

import inspect
import logging
import weakref
from collections.abc import Callable
from typing import Any

from mitmproxy import ctx, exceptions, hooks, http
from mitmproxy.addonmanager import AddonManager, safecall, traverse
from mitmproxy.options import Options

from douane.protocols import mitmpatch

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


# What the walk below relies on: mitmproxy's walk calls, for each addon of the chain, each
# attribute named like the event that is truthy in the addon or its children (`traverse`).
EXPECTED = {
    "trigger_event": "b763c59bc4992e33030d38fe5a62368b0437ad4f327ea609b0664db32286a4d9",
    "invoke_addon": "13180532440359de4072c45e3f24aa3ad3b75292ef1ebfa5caa6385160a0be12",
    "_iter_hooks": "350b419ab7284091f6341cbeb463bf6071dca027396ab37d0615789def57e7c0",
    "traverse": "bad3d9f88bdf9269a3a1380948222f64da429fcfa2801a38bbed467289d7bd60",
}
_original_walk = AddonManager.trigger_event
# what `install_untyped_messages` takes out: the check of a message's field types (debug mode)
MESSAGE_CHECK = "f65088e210cd9cc1dc277086ee4c7f5701d433b02e6f1d81a2ac22f94c484414"
_message_check = getattr(http.MessageData, "__post_init__", None)


# event name -> (the chain it was worked out for, the addons of that chain the walk visits)
_visits: dict[str, tuple[tuple[object, ...], tuple[object, ...]]] = {}


def _visited(chain: list[object], name: str) -> tuple[object, ...]:
    """The addons of `chain` that may have a hook for the event `name`: those with children
    (scripts: what they hold changes when one is reloaded, so it is looked at on each walk) and
    those with a truthy attribute of that name. A chain's built-ins keep their hooks, so this is
    worked out again only when the chain changes (an addon added or removed)."""
    now = tuple(chain)
    known = _visits.get(name)
    if known is not None and known[0] == now:
        return known[1]
    visits = tuple(a for a in now if hasattr(a, "addons") or getattr(a, name, None))
    _visits[name] = (now, visits)
    return visits


async def _walk(self: AddonManager, event: hooks.Hook) -> None:
    """mitmproxy's `AddonManager.trigger_event`, stepping over the addons it would call nothing
    in, and calling itself the hooks `invoke_addon` would call (an addon's, then its children's,
    depth first), with the event's arguments built once per walk where `invoke_addon` builds
    them anew for each addon; errors are logged by mitmproxy's `safecall`. An addon holding an
    attribute named like the event that is not callable (an error, or a module it imported) is
    left to `invoke_addon`."""
    name, args = event.name, None
    for addon in _visited(self.chain, name):
        found = [func for a in traverse((addon,)) if (func := getattr(a, name, None))]
        if not found:
            continue
        if not all(callable(f) for f in found):
            try:
                with safecall():
                    await self.invoke_addon(addon, event)
            except exceptions.AddonHalt:
                return
            continue
        if args is None:
            args = event.args()
        try:
            for func in found:
                result = func(*args)
                if result is not None and inspect.isawaitable(result):
                    await result
        except exceptions.AddonHalt:
            return
        except exceptions.OptionsError:
            raise
        except Exception:
            with safecall():  # logged as mitmproxy logs it
                raise


def install_walk() -> None:
    """Replace mitmproxy's event walk (once); ValueError when this mitmproxy is not the one the
    walk was written for."""
    mitmpatch.check("the event walk needs", "it walks every addon for every event", {
        "trigger_event": _original_walk, "invoke_addon": AddonManager.invoke_addon,
        "_iter_hooks": AddonManager._iter_hooks, "traverse": traverse}, EXPECTED)
    AddonManager.trigger_event = _walk  # type: ignore[method-assign]


def install_untyped_messages() -> None:
    """Build mitmproxy's requests and responses without the debug-mode check of their fields'
    types (once; nothing to do under `python -O`); ValueError when this mitmproxy is not the one
    this was written for."""
    if _message_check is None:
        return
    mitmpatch.check("building messages unchecked needs", "a debug-mode check of each message's "
                    "field types", {"MessageData.__post_init__": _message_check},
                    {"MessageData.__post_init__": MESSAGE_CHECK})
    http.MessageData.__post_init__ = _unchecked  # type: ignore[method-assign]


def _unchecked(self: http.MessageData) -> None:
    """(the dataclasses' `__init__` calls `__post_init__` whenever there was one)"""


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
        if AddonManager.trigger_event is not _walk:
            try:
                install_walk()
            except ValueError as e:
                raise exceptions.OptionsError(str(e)) from None
        if _message_check is not None and http.MessageData.__post_init__ is not _unchecked:
            try:
                install_untyped_messages()
            except ValueError as e:
                raise exceptions.OptionsError(str(e)) from None
        for name, option in _dropped.get(ctx.master, {}).items():
            if option in updated and not IDLE[name][1](ctx.options):
                raise exceptions.OptionsError(
                    f"{option}: mitmproxy's {name} addon was idle at start and douane took it "
                    f"out of the event chain; restart with --set {option}=... to use it")
