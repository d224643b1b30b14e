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
from douane.masking import engine
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


def groups(analyzer: engine.Analyzer) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The NER's entities and those of every recogniser that shares one with them (to a fixed
    point), then the rest."""
    first = {e for e in analyzer.entities if e in NER_ENTITIES} if analyzer.ner else set()
    grown = None
    while grown != first:
        grown = set(first)
        for entity in grown:
            for recognizer in analyzer.recognizers[entity]:
                first |= set(recognizer.supported_entities) & set(analyzer.entities)
    return (tuple(e for e in analyzer.entities if e in first),
            tuple(e for e in analyzer.entities if e not in first))


_parts: list[_Part] = []


def analyze_part(texts: list[str], part: int) -> list[Part]:
    """In a worker: `part` of each text's analysis."""
    analyzer = engine._analyzer
    assert analyzer is not None, "worker not initialised"
    if not _parts:
        _parts.extend(_Part(analyzer, entities) for entities in groups(analyzer))
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
