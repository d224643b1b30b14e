"""Fault injection for the hardening suite: real failures inside a real gateway process.

Loaded with `mitmdump -s addons/gateway.py -s tests/hardening/fault_script.py` and PYTHONPATH set
to the repository, so the spawned masking workers import this module too (the pool pickles
`analyze_batch` by name). A text carrying a trigger makes that stage fail:
- FAULT-POLICY: the policy engine raises;
- FAULT-MASK: the masking analysis raises inside the worker process;
- FAULT-CRASH: the masking worker process dies (as a segfault would), breaking the pool;
- FAULT-HANG: the masking analysis never ends (as a text that makes the engine loop would);
- FAULT-ECHO: the policy engine raises an error quoting the text (as a KeyError or a parser's
  error names the value it choked on).
"""

from __future__ import annotations

import os
import time

from douane.masking import engine as masking_engine
from douane.policy import engine as policy_engine

_risk = policy_engine.risk
_analyze_batch = masking_engine.analyze_batch


def risk(policy, pieces):
    if any("FAULT-POLICY" in p.text for p in pieces):
        raise RuntimeError("injected policy fault")
    echoed = [p.text for p in pieces if "FAULT-ECHO" in p.text]
    if echoed:
        raise ValueError(f"cannot read {echoed[0]}")
    return _risk(policy, pieces)


def analyze_batch(texts: list[str]):
    if any("FAULT-CRASH" in t for t in texts):
        os._exit(70)
    if any("FAULT-HANG" in t for t in texts):
        time.sleep(3600)
    if any("FAULT-MASK" in t for t in texts):
        raise RuntimeError("injected masking fault")
    return _analyze_batch(texts)


def install() -> None:
    policy_engine.risk = risk
    masking_engine.analyze_batch = analyze_batch
