"""mitmproxy's idle built-in addons leave the event chain; features behind an option stay usable."""

from __future__ import annotations

import asyncio

import pytest
from mitmproxy import exceptions, options
from mitmproxy.addons import default_addons
from mitmproxy.hooks import RunningHook
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
