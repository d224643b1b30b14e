"""Built-in detectors: prompt-injection phrasing in tool results (secrets: `douane.secrets`).

Each is (rule id, compiled pattern, score, hints). Patterns run on normalised (case-folded) text. A
pattern only runs when one of its lower-case hints occurs in the text (each hint tested once, by
`injections`: most tool results hold none).
"""

from __future__ import annotations

import re

INJECTION: list[tuple[str, re.Pattern[str], float, tuple[str, ...]]] = [
    ("detector.injection.ignore_instructions", re.compile(
        r"\b(?:ignore|disregard|forget|override)\b.{0,30}\b(?:previous|prior|above|earlier|all|"
        r"your)\b.{0,20}\b(?:instructions?|prompts?|rules|directions)\b"), 60,
     ("ignore", "disregard", "forget", "override")),
    ("detector.injection.new_instructions",
     re.compile(r"\b(?:new|updated|real) (?:system )?instructions?\s*:"), 40, ("instruction",)),
    ("detector.injection.role_override",
     re.compile(r"\byou are now\b|\bfrom now on,? you\b|\bact as (?:an? )?(?:admin|root|dan)\b"),
     40, ("you are now", "from now on", "act as")),
    ("detector.injection.exfiltrate",
     re.compile(r"\b(?:send|post|upload|exfiltrate|forward)\b.{0,40}\b(?:credentials?|api keys?|"
                r"passwords?|secrets?|tokens?|ssh keys?)\b"), 50,
     ("send", "post", "upload", "exfiltrate", "forward")),
    ("detector.injection.hide_from_user",
     re.compile(r"\bdo not (?:tell|inform|show|mention)\b.{0,20}\buser\b"), 40, ("do not",)),
    ("detector.injection.chat_markup", re.compile(r"<\|im_start\|>|<\|system\|>|\[/?inst\]"), 50,
     ("<|", "inst]")),
]
HINTS = tuple(dict.fromkeys(h for *_, hints in INJECTION for h in hints))


def injections(plain: str) -> list[tuple[str, float]]:
    """(rule id, score) of the injection detectors matching a normalised text, in order."""
    present = {h for h in HINTS if h in plain}
    if not present:
        return []
    return [(rule_id, score) for rule_id, pattern, score, hints in INJECTION
            if not present.isdisjoint(hints) and pattern.search(plain)]
