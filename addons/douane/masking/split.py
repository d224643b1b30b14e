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
"""

from __future__ import annotations

import copy

from douane import secrets
from douane.masking import engine, fields
from douane.masking.config import NER_ENTITIES
from douane.masking.engine import Span

PARTS = 2
Part = tuple[bool, list[Span]]  # (final: the whole analysis's spans, or the part's raw results)


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
        self._raw: list[Span] = []

    def _presidio(self, text: str, entities: list[str], nlp_artifacts) -> list:
        results = self._analyzer.presidio(text, entities, nlp_artifacts)
        self._raw = [Span(r.start, r.end, r.entity_type, r.score) for r in results]
        return results

    def raw(self, text: str) -> list[Span]:
        self._raw = []
        self.view._detections([text])
        return self._raw


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
    return bool(first and rest) and any(engine.LETTERS_WORD.search(t) for t in texts) and any(
        _patterns(t, rest) for t in texts)


def _patterns(text: str, entities: tuple[str, ...]) -> bool:
    digits = len(engine.DIGITS.findall(text))
    return any(engine.PREFILTERS[e](text, digits) for e in entities
               if e not in secrets.ENTITIES) or (
        any(e in secrets.ENTITIES for e in entities) and secrets.maybe(text))


_parts: list[_Part] = []


def analyze_part(texts: list[str], part: int) -> list[Part]:
    """In a worker: `part` of each text's analysis."""
    analyzer = engine._analyzer
    assert analyzer is not None, "worker not initialised"
    if not _parts:
        _parts.extend(_Part(analyzer, entities)
                      for entities in groups(analyzer.entities, analyzer.ner))
    out: list[Part] = []
    for text in texts:
        if secrets.readings(text) != [(text, None)]:
            out.append((True, analyzer.analyze_many([text])[0]) if part == 0 else (True, []))
        else:
            out.append((False, _parts[part].raw(text)))
    return out


def combine(texts: list[str], parts: list[list[Part]]) -> list[list[Span]]:
    """Each text's spans, as one analysis gives them, from its parts' results."""
    out = []
    for i, text in enumerate(texts):
        mine = [p[i] for p in parts]
        if mine[0][0]:
            out.append(mine[0][1])
            continue
        found = [s for _, spans in mine for s in spans]
        # Presidio's order (`remove_duplicates`: by type and place, then by score and place)
        found.sort(key=lambda s: (s.entity, s.start, s.start - s.end, -s.score))
        found.sort(key=lambda s: (-s.score, s.start, s.start - s.end))
        out.append(engine.merge(engine.refine(text, found)))
    return out
