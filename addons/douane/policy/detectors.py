"""Built-in detectors: secrets leaving in prompts, prompt-injection phrasing in tool results.

Each is (rule id, compiled pattern, score, hints). Patterns run on normalised (case-folded) text,
except secrets, whose shapes depend on case and run on the original text. A pattern only runs when
one of its lower-case hints occurs in the text (a cheap substring test first).
"""

from __future__ import annotations

import math
import re
from collections import Counter

SECRETS: list[tuple[str, re.Pattern[str], float, tuple[str, ...]]] = [
    ("detector.secret.aws_access_key", re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), 90,
     ("akia", "asia")),
    ("detector.secret.private_key",
     re.compile(r"-----BEGIN (?:RSA |EC |DSA |OPENSSH |ENCRYPTED |PGP )?PRIVATE KEY-----"), 100,
     ("private key",)),
    ("detector.secret.api_key", re.compile(r"\bsk-(?:proj-|ant-|live-)?[A-Za-z0-9_-]{20,}"), 90,
     ("sk-",)),
    ("detector.secret.github_token", re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}\b"), 90,
     ("ghp_", "gho_", "ghu_", "ghs_", "ghr_")),
    ("detector.secret.slack_token", re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}"), 90, ("xox",)),
    ("detector.secret.google_api_key", re.compile(r"\bAIza[0-9A-Za-z_-]{35}\b"), 90, ("aiza",)),
    ("detector.secret.jwt",
     re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"), 80,
     ("eyj",)),
    ("detector.secret.bearer", re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/-]{20,}=*"), 70,
     ("bearer",)),
]
HIGH_ENTROPY = re.compile(r"[A-Za-z0-9+/_=-]{32,}")
HIGH_ENTROPY_RULE, HIGH_ENTROPY_SCORE, ENTROPY_BITS = "detector.secret.high_entropy", 40.0, 4.5
ENCODED_CONTENT = 1024
SHORTEST_SECRET = 15  # no pattern above matches fewer characters (a Slack token)

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


def entropy(token: str) -> float:
    counts = Counter(token)
    return -sum(n / len(token) * math.log2(n / len(token)) for n in counts.values())


def credential_like(token: str) -> bool:
    """A long token mixing cases and digits with high entropy: likely a credential. Hex digests
    and UUIDs stay below the bar (16 symbols: at most 4 bits per character)."""
    return (any(c.islower() for c in token) and any(c.isupper() for c in token)
            and any(c.isdigit() for c in token) and entropy(token) >= ENTROPY_BITS)


def high_entropy_tokens(text: str) -> bool:
    return any(credential_like(token) for token in HIGH_ENTROPY.findall(text))


def redact_secrets(text: str, high_entropy: bool = True) -> str:
    """`text` with every match of the secret detectors replaced by `<SECRET:rule id>`: what the
    policy would flag as a credential is never kept (recordings). High-entropy runs longer than
    `ENCODED_CONTENT` characters are encoded content (an image, a file), not a credential."""
    lowered = text.lower()
    for rule_id, pattern, _, hints in SECRETS:
        if any(h in lowered for h in hints):
            text = pattern.sub(f"<SECRET:{rule_id}>", text)
    if high_entropy:
        text = HIGH_ENTROPY.sub(lambda m: f"<SECRET:{HIGH_ENTROPY_RULE}>"
                                if len(m.group(0)) <= ENCODED_CONTENT
                                and credential_like(m.group(0)) else m.group(0), text)
    return text
