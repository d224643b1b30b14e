"""One analysis in two parts, on two idle workers at once (`MaskingPool.analyze`).

At c=1 one answer's analysis is the masked path's latency while the second core stands idle.
The analysis splits by recogniser, exactly: part 0 runs the NER and every recogniser of an
entity it shares with the NER's (the field recogniser's names, places and SSNs), part 1 the rest
(e-mail, phone, card, IP, IBAN, secrets). Each part's results before `engine.refine` are what
the whole analysis's are for those recognisers: Presidio scores, enhances by context and drops
duplicates of each result on its own or within its entity type, and every recogniser is in one
part. `combine` puts them in the order the whole analysis gives them to `refine` (which drops a
name inside a pattern's value: across the parts), then refines and merges as it does.
A text read through another view (`secrets.readings`: format or tag characters) is analysed
whole in part 0: its spans are refined in the view's places, which the caller does not have.
tests/test_masking_split.py holds `combine` to the whole analysis on the corpus and random texts.
The parts lean on how the engine reads a text (`Analyzer._detections` calls `presidio` once per
text with candidates): the zygote checks them on fixed texts (`prepare`), and a part that finds
its capture unused answers with the whole analysis. Either way slower, never less masked.
"""

from __future__ import annotations

import copy
import logging

from douane import secrets
from douane.masking import engine, fields
from douane.masking.config import NER_ENTITIES
from douane.masking.engine import Span

logger = logging.getLogger(__name__)

PARTS = 2
MOST_CHARS = 16_384  # (`worth` reads the texts on the event loop, ~0.15 µs a character: longer read whole)
Part = tuple[bool, list[Span]]  # (final: the whole analysis's spans, or the part's raw results)
# The self-check's fixed texts: published example values only, no real person's or account's
# (Visa's test card, the voided SSN 078-05-1120, AWS's documented example key id, Ofcom's drama
# number, the IBAN standard's example).
CHECKS = ("warm up John Smith john@example.com 212-555-0147",
          "Sure. Maria Garcia (maria.garcia@example.com, +44 20 7946 0958) paid with card "
          "4111 1111 1111 1111 from 10.0.0.1; SSN 078-05-1120; key AKIAIOSFODNN7EXAMPLE.",
          "name: Jean Dupont, city: Lyon, IBAN DE89370400440532013000")


class _Part:
    """An analyser that runs only `entities`' recognisers and keeps their results before
    `refine` (`raw`); the rest (spaCy's document, the NER, the vocabulary's bounds) is the
    analyser's own code."""

    def __init__(self, analyzer: engine.Analyzer, entities: tuple[str, ...]):
        self.view = copy.copy(analyzer)
        self.view.entities = entities
        self.view.ner = analyzer.ner and any(e in NER_ENTITIES for e in entities)
        self.view.presidio = self._presidio
        self._analyzer = analyzer
        self._raw: list[Span] | None = None

    def _presidio(self, text: str, entities: list[str], nlp_artifacts) -> list:
        results = self._analyzer.presidio(text, entities, nlp_artifacts)
        self._raw = [Span(r.start, r.end, r.entity_type, r.score) for r in results]
        return results

    def raw(self, text: str) -> list[Span] | None:
        """None when the engine found something without asking `presidio` (it reads otherwise
        now): what this part would give is unknown."""
        self._raw = None
        found = self.view._detections([text])[0]
        return self._raw if self._raw is not None else None if found else []


def groups(entities: tuple[str, ...], ner: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The NER's entities with the others of the field recogniser (`fields.ENTITIES`: a name, a
    place or an SSN by its field), then the rest; all in the second without the NER (nothing
    to split: the caller does not). tests/test_masking_split.py checks that no recogniser of
    the engine's has entities in both."""
    first = {e for e in entities if e in NER_ENTITIES or e in fields.ENTITIES} if ner and any(
        e in NER_ENTITIES for e in entities) else set()
    return (tuple(e for e in entities if e in first),
            tuple(e for e in entities if e not in first))


def worth(texts: list[str], parts: tuple[tuple[str, ...], tuple[str, ...]]) -> bool:
    """Whether each part has something to read in `texts` (a guess on the texts as sent, made
    before they leave): the NER a word of letters, the rest a pattern's pre-filter passed
    (`engine.PREFILTERS`). Prose with no digit, `@` or secret's hint would leave the second
    part nothing to do, and the split would only add a round trip."""
    first, rest = parts
    return bool(first and rest) and sum(map(len, texts)) <= MOST_CHARS and any(engine.LETTERS_WORD.search(t) for t in texts) and any(
        _patterns(t, rest) for t in texts)


def _patterns(text: str, entities: tuple[str, ...]) -> bool:
    digits = len(engine.DIGITS.findall(text))
    return any(engine.PREFILTERS[e](text, digits) for e in entities
               if e not in secrets.ENTITIES) or (
        any(e in secrets.ENTITIES for e in entities) and secrets.maybe(text))


_parts: list[_Part] | None = None  # (none: each text analysed whole, in part 0)


def prepare() -> None:
    """In the zygote, its analyser built: the parts, if `combine` gives the whole analysis's
    spans from them on `CHECKS` (its fixed texts, never a user's)."""
    global _parts
    analyzer = engine._analyzer
    assert analyzer is not None, "worker not initialised"
    try:
        _parts = [_Part(analyzer, e) for e in groups(analyzer.entities, analyzer.ner)]
        same = all(combine([t], [analyze_part([t], p) for p in range(PARTS)])
                   == analyzer.analyze_many([t]) for t in CHECKS)
    except Exception:  # (the engine's attributes changed): no parts, the pool still starts
        logger.exception("douane: masking's split analysis failed on its checks")
        same = False
    if not same:
        logger.error("douane: masking's split analysis does not match the engine's; answers "
                     "are analysed whole")
        _parts = []


def analyze_part(texts: list[str], part: int) -> list[Part]:
    """In a worker: `part` of each text's analysis."""
    if _parts is None:
        prepare()
    analyzer = engine._analyzer
    assert analyzer is not None and _parts is not None, "worker not initialised"
    out: list[Part] = []
    for text in texts:
        raw = _parts[part].raw(text) if _parts and secrets.readings(text) == [(text, None)] \
            else None if part == 0 else []
        out.append((True, analyzer.analyze_many([text])[0]) if raw is None else (False, raw))
    return out


def combine(texts: list[str], parts: list[list[Part]]) -> list[list[Span]]:
    """Each text's spans, as one analysis gives them, from its parts' results."""
    out = []
    for i, text in enumerate(texts):
        mine = [p[i] for p in parts]
        whole = next((spans for final, spans in mine if final), None)
        if whole is not None:
            out.append(whole)
            continue
        found = [s for _, spans in mine for s in spans]
        # Presidio's order (`remove_duplicates`: by type and place, then by score and place)
        found.sort(key=lambda s: (s.entity, s.start, s.start - s.end, -s.score))
        found.sort(key=lambda s: (-s.score, s.start, s.start - s.end))
        out.append(engine.merge(engine.refine(text, found)))
    return out
