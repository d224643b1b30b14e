"""mitmproxy's idle built-in addons leave the event chain; features behind an option stay usable."""

from __future__ import annotations

import asyncio
import logging
import re
import types

import pytest
from mitmproxy import exceptions, options
from mitmproxy.addonmanager import AddonManager
from mitmproxy.addons import default_addons
from mitmproxy.hooks import RunningHook, UpdateHook
from mitmproxy.proxy.layers.http import HttpRequestHook as RequestHook
from mitmproxy.test import tflow
from mitmproxy.tools.dump import DumpMaster

from douane import builtins
from douane.builtins import DropIdleBuiltins


def started(**opts) -> DumpMaster:
    """A mitmdump master with its default addons and douane's, after `running`."""
    master = DumpMaster(options.Options(), with_termlog=False)
    master.addons.add(DropIdleBuiltins())
    master.options.update(**opts)
    master.addons.trigger(RunningHook())  # (the master is mitmproxy's ctx.master)
    return master


def chain(master: DumpMaster) -> set[str]:
    return {type(a).__name__.lower() for a in master.addons.chain}


def test_idle_builtins_leave_the_chain_and_guards_stay():
    async def scenario() -> None:
        master = started(flow_detail=0, mode=["reverse:http://127.0.0.1:1"])
        assert {"maplocal", "dumper", "onboarding"} <= builtins._dropped[master].keys()
        names = chain(master)
        assert not names & {"maplocal", "modifyheaders", "stickycookie", "proxyauth", "save",
                            "savehar", "dumper", "onboarding", "cut", "export", "blocklist"}
        assert {"proxyserver", "block", "disableh2c", "updatealtsvc", "tlsconfig", "nextlayer",
                "scriptloader", "core", "clientplayback"} <= names
        assert len(master.addons.chain) < len(default_addons()) - 10
        # their commands still answer
        assert "export.file" in master.commands.commands
    asyncio.run(scenario())


def test_a_feature_on_at_start_keeps_its_addon():
    async def scenario() -> None:
        master = started(map_local=["|example.com/x|/tmp"], flow_detail=1,
                         modify_headers=["/~q/x-a/b"])
        assert {"maplocal", "modifyheaders", "dumper", "onboarding"} <= chain(master)
    asyncio.run(scenario())


def test_turning_a_dropped_feature_on_later_is_refused():
    async def scenario() -> None:
        master = started(flow_detail=0)
        with pytest.raises(exceptions.OptionsError, match="restart"):
            master.options.update(map_local=["|example.com/x|/tmp"])
        assert master.options.map_local == []  # rolled back, not silently ignored
        master.options.update(map_local=[])  # still off: fine
        # the script reloaded: its new instance still refuses
        master.addons.remove(master.addons.get("dropidlebuiltins"))
        master.addons.add(DropIdleBuiltins())
        with pytest.raises(exceptions.OptionsError, match="restart"):
            master.options.update(stickycookie=".*")
    asyncio.run(scenario())


class Hooked:
    """An addon whose `request` hook notes each call (or raises, or halts the walk)."""

    def __init__(self, name: str, calls: list[str], fail: type[Exception] | None = None):
        self.name, self.calls, self.fail = name, calls, fail

    def request(self, flow) -> None:
        self.calls.append(self.name)
        if self.fail:
            raise self.fail(self.name)


class HookedAsync(Hooked):
    async def request(self, flow) -> None:
        await asyncio.sleep(0)
        super().request(flow)


class Plain:
    """No hook of its own; its children may have some (as a script under ScriptLoader)."""

    def __init__(self, name: str, children: list[object] = ()):
        self.name, self.addons = name, list(children)


async def walked(walk, chain: list[object], flow) -> tuple[list[str], list[str]]:
    """(the hooks called, the errors logged) when `walk` sends a `request` event to `chain`."""
    master = DumpMaster(options.Options(), with_termlog=False)
    for addon in chain:
        master.addons.add(addon)
    errors: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: errors.append(re.sub(" at 0x[0-9a-f]+", "", record.getMessage()))
    logging.getLogger("mitmproxy.addonmanager").addHandler(handler)
    try:
        calls: list[str] = chain[0].calls
        await walk(master.addons, RequestHook(flow))
        await walk(master.addons, UpdateHook([flow]))  # nobody has an `update` hook
    finally:
        logging.getLogger("mitmproxy.addonmanager").removeHandler(handler)
    return calls, errors


def test_the_walk_calls_every_hook_mitmproxys_walk_calls():
    """Same hooks, same order, same errors logged, as mitmproxy's own walk: hooks at any depth,
    an addon without one, one raising (logged, the walk goes on), a non-callable attribute named
    like the event (logged), `AddonHalt` (the walk ends)."""
    async def scenario() -> None:
        flow = tflow.tflow()

        def chain() -> list[object]:
            calls: list[str] = []
            odd = Plain("odd")
            odd.request = "not callable"
            imported = Plain("imported", [Hooked("beside", calls)])
            imported.request = types  # a module it imported, named like the event: passed over
            return [Hooked("first", calls), Plain("empty"),
                    Plain("loader", [Plain("script", [Hooked("deep", calls)])]),
                    HookedAsync("awaited", calls), imported,
                    Hooked("failing", calls, ValueError), odd,
                    Plain("nested", [Hooked("child", calls), Plain("leaf")]),
                    Hooked("halting", calls, exceptions.AddonHalt), Hooked("never", calls)]

        ours = await walked(builtins._walk, chain(), flow)
        theirs = await walked(builtins._original_walk, chain(), flow)
        assert ours == theirs
        calls, errors = ours
        assert calls == ["first", "deep", "awaited", "beside", "failing", "child", "halting"]
        assert any("failing" in e for e in errors) and any("not callable" in e for e in errors)
    asyncio.run(scenario())


def test_the_walk_sees_addons_added_and_children_changed_after_a_walk():
    """What the walk visits is worked out once per chain: an addon added later, or a script
    whose children change (reloaded), is called on the next walk; one removed is not."""
    async def scenario() -> None:
        flow = tflow.tflow()
        calls: list[str] = []
        script = Plain("script", [])
        master = DumpMaster(options.Options(), with_termlog=False)
        master.addons.add(script)
        await builtins._walk(master.addons, RequestHook(flow))
        later = Hooked("later", calls)
        master.addons.add(later)
        script.addons.append(Hooked("reloaded", calls))
        await builtins._walk(master.addons, RequestHook(flow))
        assert calls == ["reloaded", "later"]
        master.addons.remove(later)
        await builtins._walk(master.addons, RequestHook(flow))
        assert calls == ["reloaded", "later", "reloaded"]
    asyncio.run(scenario())


def test_the_walk_is_installed_once_and_only_on_the_mitmproxy_it_was_written_for(monkeypatch):
    async def scenario() -> None:
        started(flow_detail=0)
        assert AddonManager.trigger_event is builtins._walk
        builtins.install_walk()  # checked against mitmproxy's own, not against itself
        monkeypatch.setitem(builtins.EXPECTED, "_iter_hooks", "0" * 64)
        with pytest.raises(ValueError, match="with a different _iter_hooks"):
            builtins.install_walk()
        monkeypatch.setattr(AddonManager, "trigger_event", builtins._original_walk)
        with pytest.raises(exceptions.OptionsError, match="different _iter_hooks"):
            started(flow_detail=0)
    asyncio.run(scenario())


def test_messages_are_built_without_the_debug_type_check_and_leave_no_cycle(monkeypatch):
    import gc

    from mitmproxy import http

    async def scenario() -> None:
        started(flow_detail=0)
        assert http.MessageData.__post_init__ is builtins._unchecked
        gc.collect()
        gc.disable()
        try:
            for _ in range(10):  # as mitmproxy's HTTP/1 reader and the upstream's answer make them
                http.Request("example.com", 443, b"POST", b"https", b"", b"/v1/x", b"HTTP/1.1",
                             http.Headers(host="example.com"), None, None, 1.0, None)
                http.Response(b"HTTP/1.1", 200, b"OK", http.Headers(), None, None, 1.0, None)
            assert gc.collect() == 0  # (the check's caught TypeErrors were cycles: ~40 objects)
        finally:
            gc.enable()
        # only on the mitmproxy it was written for
        monkeypatch.setattr(http.MessageData, "__post_init__", builtins._message_check)
        monkeypatch.setattr(builtins, "MESSAGE_CHECK", "0" * 64)
        with pytest.raises(exceptions.OptionsError, match="different MessageData.__post_init__"):
            started(flow_detail=0)
    asyncio.run(scenario())
