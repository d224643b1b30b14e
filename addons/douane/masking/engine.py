"""The analyser: Presidio tuned for a gateway, and the worker-process entry points.

Faster than stock Presidio without losing recall on the configured entities:
- only the recognisers the config asks for (stock runs ~20, most for other countries);
- a cheap pre-filter per entity before its recogniser runs (no `@`, no email; fewer than 7
  digits, no phone number: the phone recogniser alone is half of stock Presidio's time);
- phone regions from config instead of every region, and a phone matcher that scans a text once
  for all of them and parses only the candidates that can be a number of a region
  (`masking.phone`: Presidio's matches, a fraction of the work);
- the recognisers called directly rather than through `AnalyzerEngine.analyze` (registry lookups
  and a pass per recogniser over all results, per call), and Presidio's context enhancer run in
  place on the results a context word can raise (it deep-copies every result): same results;
- spaCy's dependency parser (unused by NER and by Presidio) disabled; NER skipped when no NER
  entity is configured, and on a text without a word of two letters (`refine` keeps no name or
  place without one), not when a text has no capital letter (a stream's window would then decide
  names differently from the whole answer);
- texts analysed in a batch per call (NER's `pipe`, called directly: not through Presidio's
  `process_batch` and spaCy's `nlp.pipe`, ~0.1 ms per call);
- NER's products on numpy's OpenBLAS, one thread, with row-major transposed weights
  (`load_ner`, `inference_ops`), and no flags computed for new words that nothing reads;
- NER's token vectors as plain numpy products without thinc's layers, a word's embedding
  computed once (`TokenVectors`); its moves decoded by one product for every token's entity-free
  state and one for the continuations of the entities that may start, not spaCy's C loop of a
  step per token (`EntityDecoder`, same entities); pattern recognisers without Presidio's
  per-match explanation (`plain_patterns`); the lemmas and token offsets only the context
  enhancer reads, on first use;
- what reads a value alone kept across texts (a pattern recogniser's checks, the phone
  matcher's parses: a stream's windows and a conversation's turns read them again), and the
  tokenizer without the white-space special cases that kept every word after a text's first
  line break out of its cache (`uncached_whitespace`).
Offline: tldextract uses its bundled public-suffix snapshot, never the network.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
import re
import sys
from dataclasses import dataclass

from douane import secrets
from douane.masking import fields
from douane.masking.config import NER_ENTITIES, MaskingSettings
from douane.masking.phone import phone_recognizer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Span:
    start: int
    end: int
    entity: str
    score: float


def merge(spans: list[Span]) -> list[Span]:
    """Overlapping detections become one span over their union (an SSN inside a longer PERSON
    span is masked whole, not left partly in clear), named after the highest-scored one (then the
    longest); sorted by start. Spans that only touch stay apart."""
    out: list[Span] = []
    group: list[Span] = []
    end = 0
    for span in sorted(spans, key=lambda s: (s.start, s.end)):
        if group and span.start >= end:
            out.append(_union(group, end))
            group = []
        group.append(span)
        end = max(end, span.end) if len(group) > 1 else span.end
    if group:
        out.append(_union(group, end))
    return out


def _union(group: list[Span], end: int) -> Span:
    top = max(group, key=lambda s: (s.score, s.end - s.start))
    return Span(group[0].start, end, top.entity, top.score)


# spaCy components the NER of the en_core_web_sm family does not use (its `ner` has a tok2vec of
# its own): loading without them gives the same entities at about 2.6x the speed. Presidio's
# context enhancement compares lemmas: `nlp_engine_class` gives it the lower-cased words.
VOCABULARY = 20_000  # words a worker's spaCy keeps for its life (see Analyzer.detections)
NOT_FOR_NER = ["parser", "senter", "tok2vec", "tagger", "attribute_ruler", "lemmatizer"]
DIGITS = re.compile(r"\d")
COLON = re.compile(":")
# every IPv6 form Presidio's patterns match holds `::` but the full 8 groups (and 6 groups then a
# dotted quad, which the IPv4 test keeps): a clock's `23:04:41` is none
IPV6_SHAPE = re.compile(r"::|(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]")
DOTTED_QUAD = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}")
# What every value a recogniser finds holds: an SSN of Presidio's patterns (`[0-9]{9}`, `5-4`,
# `3-6`, `[0-9]{3}[- .][0-9]{2}[- .][0-9]{4}`) or of the field recogniser (`fields.SSN`), a card
# number (CARD_NUMBER), an IBAN (Presidio's `[A-Z]{2}[0-9]{2}(?:[ -]?[A-Z0-9]{4}){2,6}`, case
# ignored). In the `regex` module Presidio's patterns run in: its digits and letters are at
# least Python's and its own.
SHAPES = {"US_SSN": r"\d{3}(?:\d{2}-?\d{4}|-\d{6}|[- .]\d{2}[- .]\d{4})",
          "CREDIT_CARD": r"\d{4}[- ]?\d{3,4}[- ]?\d{3,4}[- ]?\d{3}",
          "IBAN_CODE": r"\d{2}[ -]?\w{4}[ -]?\w{4}"}


@functools.cache
def shape(entity: str):
    import regex  # (Presidio's; imported on first use, as spaCy is)

    return regex.compile(SHAPES[entity])


# entity -> a cheap test a text must pass for that entity's recogniser to run
PREFILTERS = {
    "EMAIL_ADDRESS": lambda t, d: "@" in t,
    "PHONE_NUMBER": lambda t, d: d >= 7,
    "CREDIT_CARD": lambda t, d: d >= 12 and shape("CREDIT_CARD").search(t) is not None,
    "US_SSN": lambda t, d: d >= 9 and shape("US_SSN").search(t) is not None,
    # every IPv4 form (plain, mapped, embedded) holds a dotted quad, every IPv6 form its shape
    # (`::` or seven colons: counted before the searches, which try every position)
    "IP_ADDRESS": lambda t, d: (d >= 4 and t.count(".") >= 3
                                and DOTTED_QUAD.search(t) is not None)
    or "::" in t or (t.count(":") >= 7 and IPV6_SHAPE.search(t) is not None),
    "IBAN_CODE": lambda t, d: d >= 8 and shape("IBAN_CODE").search(t) is not None,
    # none for NER: whether spaCy runs must not hang on a word anywhere in the text (a capital
    # letter), or a stream's window and the whole answer would decide a name differently
    "PERSON": lambda t, d: True,
    "LOCATION": lambda t, d: True,
    "NRP": lambda t, d: True,
    **{entity: lambda t, d: secrets.maybe(t) for entity in secrets.ENTITIES},
}

# Presidio's card pattern (Luhn-checked after) plus Mastercard's 2221-2720 range, which it lacks
CARD_NUMBER = (r"\b(?!1\d{12}(?!\d))((4\d{3})|(5[0-5]\d{2})|(2[2-7]\d{2})|(6\d{3})|(1\d{3})|"
               r"(3\d{3}))[- ]?(\d{3,4})[- ]?(\d{3,4})[- ]?(\d{3,5})\b")
# what a phone-number match must not be: part of a stricter value, a dotted quad, a clock's
# fraction (`23:52:05.939088`), an epoch timestamp (10 bare digits from 1: no area code starts so)
NOT_PHONE_INSIDE = ("IP_ADDRESS", "US_SSN", "CREDIT_CARD", "IBAN_CODE")
EPOCH = re.compile(r"1\d{9}")


def _outranks(o: Span, s: Span) -> bool:
    """Whether `o`, around `s`, says what `s` is: NER inside a pattern's value (an IPv6 address,
    a key) is a fragment, a pattern's value inside NER's span is still that value; else the
    higher score (then the longer span) wins."""
    if (o.entity in NER_ENTITIES) != (s.entity in NER_ENTITIES):
        return s.entity in NER_ENTITIES
    return (o.score, o.end - o.start) > (s.score, s.end - s.start)


# a word of letters (`Smith`, `emily`, `Al-Sayed`, `O'Connor`): a name or a place holds one
LETTERS_WORD = re.compile(r"[^\W\d_]{2,}(?:['’.-][^\W\d_]+)*\.?")
# Words no name or place starts with: function words (spaCy's stop words but those a name or a
# place starts with: May, Will, Per, Else, Ever, Front Royal) and the words answers open with
# (not Great: Great Britain). A name or place is trimmed of them at its start
# ("The Hague" -> "Hague"), so a stream releases them at once (streaming.plain_prefix): whatever
# follows, no PERSON/LOCATION/NRP span starts in one.
OPENERS = {"sure", "certainly", "yes", "okay", "hello", "hi", "hey", "thanks", "thank",
           "absolutely", "sorry", "unfortunately", "let", "following", "below", "based"}
NAME_STARTS = {"may", "will", "per", "else", "ever", "front"}
WORD_RUN = re.compile(r"\w+")


@functools.cache
def not_a_name_words() -> frozenset[str]:
    # spaCy is imported here, not with the module: every gateway and `douane` command imports
    # this module, and spaCy takes over a second of CPU to import
    from spacy.lang.en.stop_words import STOP_WORDS

    return frozenset({w for w in STOP_WORDS if w.isascii() and w.isalpha()} - NAME_STARTS
                     | OPENERS)


def not_a_name(word: str) -> bool:
    """`word` (a run of letters) is one no name or place starts with: lower-case or capitalised,
    never all capitals (IN, ME, OR, US are places)."""
    return (word.isascii() and (len(word) == 1 or word[1:].islower())
            and word.lower() in not_a_name_words())


def trim_name(text: str, s: Span) -> Span | None:
    """A name or place without the `not_a_name` words it starts with (None if nothing is left).
    Words are whole runs of `text`: a span starting inside a word is judged by that word."""
    begin = s.start
    while 0 < begin < len(text) and WORD_RUN.fullmatch(text, begin - 1, begin + 1):
        begin -= 1  # (both characters are word characters: the span starts inside a word)
    for m in WORD_RUN.finditer(text, begin):
        if m.start() >= s.end:
            break
        if not not_a_name(m.group()):
            return s if m.start() <= s.start else Span(m.start(), s.end, s.entity, s.score)
    return None


def refine(text: str, spans: list[Span]) -> list[Span]:
    """Trim names and places of the words they never start with (`trim_name`); drop what only
    looks like a phone number, names and places without a word of letters, and detections inside
    a stronger detection of another type (a name NER called a place, inside a field recognised as
    a place; NER's "person" inside an IPv6 address). Linear in the spans but for the ones that
    overlap."""
    spans = [t for s in spans
             if (t := trim_name(text, s) if s.entity in NER_ENTITIES else s) is not None]
    kept: list[Span] = []
    active: list[Span] = []  # spans that started before and have not ended
    same = {}  # (start, end) -> the spans of that extent
    for s in spans:
        same.setdefault((s.start, s.end), []).append(s)
    for s in sorted(spans, key=lambda s: (s.start, -s.end)):
        active = [o for o in active if o.end > s.start]
        around = [o for o in (*active, *same[s.start, s.end]) if o is not s and o.end >= s.end
                  and o.entity != s.entity]
        active.append(s)
        value = text[s.start:s.end]
        if s.entity == "PHONE_NUMBER" and (
                any(o.entity in NOT_PHONE_INSIDE for o in around)
                or DOTTED_QUAD.fullmatch(value) or EPOCH.fullmatch(value)
                or text[max(0, s.start - 1):s.start] in (":", ".")):
            continue
        if any(_outranks(o, s) for o in around):
            continue
        if s.entity in NER_ENTITIES and not any(
                LETTERS_WORD.fullmatch(w.strip(",;:()[]\"'")) for w in value.split()):
            continue  # spaCy reads `sha256 9f86d0…`, `eu-west-1` as names in lower-case text
        kept.append(s)
    return sorted(kept, key=lambda s: (s.start, s.end))


def load_ner(model: str):
    """The model without what NER does not use, its matrix products on numpy's BLAS rather than
    thinc's default (blis): 1.9x faster for the tok2vec's products, ~17% of NER's CPU, same
    entities on the corpus. On one BLAS thread: a worker is one analysis at a time and the
    cores are the gateway's (OpenBLAS's own threads cost 7x the CPU here)."""
    import spacy
    from thinc.api import use_ops
    from threadpoolctl import threadpool_limits

    threadpool_limits(1, user_api="blas")
    with use_ops("numpy", use_blis=False):
        nlp = spacy.load(model, exclude=NOT_FOR_NER)
    ops = inference_ops()
    for node in nlp.get_pipe("ner").model.walk():
        node.ops = ops
        if node.has_param("W"):
            ops.weights(node.get_param("W"))
    lean_tok2vec(nlp.get_pipe("ner").model, ops)
    unused_word_flags(nlp.vocab)
    uncached_whitespace(nlp.tokenizer)
    nlp.tokenizer.suffix_search = TailSuffixSearch.of(nlp.tokenizer.suffix_search)
    return nlp


def uncached_whitespace(tokenizer) -> None:
    """Without spaCy's special cases for a space, a tab and a line break alone, which make of
    each the one token the tokenizer makes of it anyway (tests/test_masking_fastpaths.py): a
    special case met in a text keeps every later chunk of that text out of the tokenizer's cache
    (spaCy's guard for #1250), so the words after a text's first line break were split again
    in every text (56% of the corpus's texts have one; 135 -> 87 us per corpus text known)."""
    from spacy.attrs import ORTH

    rules = tokenizer.rules
    plain = [k for k in (" ", "\t", "\n") if rules.get(k) == [{ORTH: k}]]
    if plain:
        tokenizer.rules = {k: v for k, v in rules.items() if k not in plain}


class EntityDecoder:
    """spaCy's greedy NER decoding (`Parser.greedy_parse`: a C step per token, each a few small
    products and a scan of the 74 moves' validity) as a few numpy products for all the docs'
    tokens at once, same entities. The NER's state is only whether an entity is open: closed, a
    token's features are its own vector and padding (`StateC.set_context_tokens` with 3
    features: the next token, the open entity's first and the token before), so every token's
    move as if closed comes of one product, and an entity's continuation (its next `AHEAD`
    tokens: most entities are shorter) of one more, for every token where one may start.
    Validity is `ner.pyx`'s for docs without preset entities or sentence starts past the first
    token (what `make_doc` gives): closed, O always, U-x and B-x not on a space token, B-x not
    on the last token; open, I-x but on the last token, and L-x, of the open entity's label;
    the first best-scored valid move wins. The products make the floats blis makes in spaCy's
    C loop (`scores`), and a row's scores do not depend on the rows beside it
    (tests/test_masking_fastpaths.py checks the entities against spaCy's)."""

    AHEAD = 4

    def __init__(self, ner):
        import numpy as np

        model = ner.model
        tok2vec, lower, upper = model.layers
        names = [ner.moves.get_class_name(i) for i in range(ner.moves.n_moves)]
        if (ner.name != "ner" or lower.get_dim("nF") != 3 or not model.attrs["has_upper"]
                or model.attrs["unseen_classes"] or upper.name != "linear"
                or any(n != "O" and n[:2] not in ("B-", "I-", "L-", "U-") for n in names)):
            raise ValueError(f"not the NER of en_core_web_sm: {model.name}")
        from spacy.attrs import IS_SPACE
        from spacy.tokens import Span

        self.Span, self.IS_SPACE = Span, IS_SPACE  # (an import per call costs ~2 us each)
        self.tok2vec, self.ops = tok2vec, lower.ops
        # the lower layer's product as `_precomputable_affine.forward` makes it (its ops, its
        # weights' view), without its output's padding row and backward closure
        self.shape = (lower.get_dim("nF"), lower.get_dim("nO"), lower.get_dim("nP"))
        self.lower = lower.get_param("W").reshape((-1, lower.get_dim("nI")))
        self.pad = lower.get_param("pad")[0]
        self.W, self.b = upper.get_param("W"), upper.get_param("b")
        self.WT = np.ascontiguousarray(self.W.T)
        self.bias = lower.get_param("b")
        self.out = names.index("O")
        self.moves = [(n[0], n[2:]) for n in names]
        index = {n: i for i, n in enumerate(names)}
        # per move: for a B-x, the moves I-x and L-x that continue its entity
        self.inside = np.array([index.get(f"I-{label}", 0) for _, label in self.moves])
        self.last = np.array([index.get(f"L-{label}", 0) for _, label in self.moves])
        self.begins = np.array([m == "B" for m, _ in self.moves])
        self.steps = np.arange(1, self.AHEAD + 1)
        unit = np.array([m == "U" and bool(label) for m, label in self.moves])
        out = np.arange(len(names)) == self.out
        self.closed = np.where(out | unit | self.begins, 0, -np.inf).astype("float32")
        self.closed_last = np.where(out | unit, 0, -np.inf).astype("float32")

    def scores(self, hidden):
        """The upper layer's scores, as `predict_states` computes them (blis's product, then
        the bias). numpy's BLAS makes blis's floats for this product (64 terms a row) and ~10x
        cheaper on an answer's rows (blis.py's typed dispatch): but for one row, which it
        computes another way, so that row is made with a second one beside it."""
        import numpy as np

        if len(hidden) == 1:
            return self.scores(np.concatenate([hidden, hidden]))[:1]
        scores = np.matmul(hidden, self.WT)
        scores += self.b
        return scores

    def hidden(self, f0, f1, f2):
        """Summed features (in `sum_state_features`' order), the bias, then the maxout."""
        import numpy as np

        summed = f0 + f1
        summed += f2
        summed += self.bias
        hidden = np.ascontiguousarray(summed[..., 0])
        for piece in range(1, summed.shape[-1]):  # (a reduction over 2 is 4x slower)
            np.maximum(hidden, summed[..., piece], out=hidden)
        return hidden

    def __call__(self, docs) -> None:
        """Each doc's entities set, as `ner.pipe` sets them."""
        import numpy as np

        Span, IS_SPACE = self.Span, self.IS_SPACE
        docs = [doc for doc in docs if len(doc)]
        if not docs:
            return
        feats = self.ops.gemm(self.tok2vec.predict(docs), self.lower, trans2=True).reshape(
            (-1, *self.shape))  # per token: its features' share of each hidden unit's pieces
        # (few numpy calls: on an answer's rows each costs about as much as its arithmetic)
        pad = self.pad
        lengths = [len(doc) for doc in docs]
        bounds = list(itertools.accumulate(lengths))
        # per token: where its doc ends
        end = np.full(bounds[0], bounds[0]) if len(docs) == 1 else np.repeat(bounds, lengths)
        lasts = [b - 1 for b in bounds]  # each doc's last token
        closed = self.scores(self.hidden(feats[:, 0], pad[1], pad[2]))
        final = (closed[lasts] + self.closed_last).argmax(axis=1)
        closed += self.closed
        moves = closed.argmax(axis=1)
        moves[lasts] = final
        spaces = docs[0].to_array(IS_SPACE) if len(docs) == 1 else np.concatenate(
            [doc.to_array(IS_SPACE) for doc in docs])
        moves[spaces.astype(bool)] = self.out
        # where an entity may start, whether it ends at each of the next AHEAD tokens
        known = {}
        first = np.flatnonzero(self.begins[moves])
        if len(first):
            start = np.repeat(first, self.AHEAD)
            at = (first[:, None] + self.steps).ravel()
            within = at < end[start]
            start, at = start[within], at[within]
            if len(at):
                ends = self.ends(feats, moves[start], start, at, end)
                known = dict(zip(zip(start.tolist(), at.tolist(), strict=True), ends.tolist(),
                                 strict=True))
        moves = moves.tolist()
        base = 0
        for doc, n in zip(docs, lengths, strict=True):
            ents = []
            t = 0
            while t < n:
                kind, label = self.moves[moves[base + t]]
                t += 1
                if kind == "U":
                    ents.append(Span(doc, t - 1, t, label=label))
                elif kind == "B":
                    first = base + t - 1
                    while True:
                        g = base + t
                        if (first, g) not in known:  # a long entity: its next tokens
                            at = np.arange(g, min(g + self.AHEAD, base + n))
                            begin = np.full(len(at), first)
                            known.update(zip(zip(begin.tolist(), at.tolist(), strict=True),
                                             self.ends(feats, np.full(len(at), moves[first]),
                                                       begin, at, end).tolist(), strict=True))
                        closing = known[first, g]
                        t += 1
                        if closing:
                            ents.append(Span(doc, first - base, t, label=label))
                            break
            doc.set_ents(ents, default="outside")
            base += n

    def ends(self, feats, begin, start, at, end):
        """Per row: whether the entity that move `begin` opened at token `start` ends at token
        `at` (L rather than I; only L is valid on a doc's last token)."""
        import numpy as np

        scores = self.scores(self.hidden(feats[at, 0], feats[start, 1], feats[at - 1, 2]))
        rows = np.arange(len(at))
        return (scores[rows, self.last[begin]] > scores[rows, self.inside[begin]]) | (
            at + 1 == end[at])

class TailSuffixSearch:
    """spaCy's suffix search (its suffixes joined as `a$|b$|...`) with the same match, without
    trying each of the ~80 suffixes at every position of the string (a third of the tokenizer's
    time on ids, hashes and CSV lines): every match ends at the end, so a suffix of at most
    `width` characters can only start in the last `width`; the few of no bound (`\\.\\.+$`)
    are searched apart, and the leftmost of the two starts is the search's (both end at the
    end). A string ending in a newline (where `$` also matches before it) is searched as is."""

    def __init__(self, search, bounded, width: int, unbounded):
        self.search, self.bounded, self.width, self.unbounded = search, bounded, width, unbounded

    @classmethod
    def of(cls, search):
        """`search` as a TailSuffixSearch, or as it is if it is not a join of `…$` suffixes."""
        pattern = getattr(search, "__self__", None)
        if not isinstance(pattern, re.Pattern) or not isinstance(pattern.pattern, str):
            return search
        bounded, unbounded, width = [], [], 0
        for piece in top_level_alternatives(pattern.pattern):
            escapes = len(piece) - 1 - len(piece[:-1].rstrip("\\"))
            if not piece.endswith("$") or escapes % 2:  # (an escaped `$` is a character)
                return search
            most = re._parser.parse(piece, pattern.flags).getwidth()[1]
            if most >= re._constants.MAXREPEAT:
                unbounded.append(piece)
            else:
                bounded.append(piece)
                width = max(width, most)
        return cls(search, re.compile("|".join(bounded) or "(?!)", pattern.flags), width,
                   re.compile("|".join(unbounded), pattern.flags) if unbounded else None)

    def __call__(self, string: str):
        if string.endswith("\n"):
            return self.search(string)
        found = self.bounded.search(string, max(0, len(string) - self.width))
        if self.unbounded is not None and (far := self.unbounded.search(string)) is not None and (
                found is None or far.start() < found.start()):
            return far
        return found


def top_level_alternatives(pattern: str) -> list[str]:
    """A regex's alternatives at its top level: split at each `|` outside a group, a class or
    an escape."""
    out, depth, start, i, klass = [], 0, 0, 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            i += 2
            continue
        if klass:
            klass = c != "]"
        elif c == "[":
            klass = True
            i += 1 + pattern.startswith("^", i + 1)  # a `]` first in a class is a character
            i += pattern.startswith("]", i)
            continue
        elif c in "()":
            depth += 1 if c == "(" else -1
        elif c == "|" and depth == 0:
            out.append(pattern[start:i])
            start = i + 1
        i += 1
    return [*out, pattern[start:]]


def lean_tok2vec(parser_model, ops) -> None:
    """The parser's tok2vec replaced by `TokenVectors` (same vectors), as a thinc layer without
    children: spaCy also walks the whole model on each call to set its dropout."""
    from thinc.api import Model

    tok2vec = parser_model.get_ref("tok2vec")
    vectors = TokenVectors(tok2vec, ops)
    lean = Model("douane_tok2vec", lambda model, docs, is_train: (vectors(docs), None), ops=ops)
    parser_model.replace_node(tok2vec, lean)


def inference_ops():
    """thinc's numpy ops whose products with a layer's weights (`X @ W.T`, every dense layer of
    the NER) read a row-major copy of the transposed weights, made once: OpenBLAS multiplies
    the few rows of one answer (its tokens and 8 rows of padding) by a transposed matrix 2-5x
    slower than by a row-major one (9 rows: 88 vs 20 us per product, 6 per layer stack)."""
    import numpy
    from thinc.api import NumpyOps

    class InferenceOps(NumpyOps):
        def __init__(self):
            super().__init__(use_blis=False)
            self.transposed: dict[tuple, tuple] = {}  # (address, shape) -> (weights, copy)

        def weights(self, w) -> None:
            """Registered weights are kept alive here: no other array can take their address."""
            if w.flags.c_contiguous:
                address = w.__array_interface__["data"][0]
                self.transposed[address, w.size] = (w, None)

        def gemm(self, x, y, *, out=None, trans1=False, trans2=False):
            entry = None
            if trans2 and not trans1 and y.flags.c_contiguous:
                key = (y.__array_interface__["data"][0], y.size)
                entry = self.transposed.get(key)
            if entry is None:
                return super().gemm(x, y, out=out, trans1=trans1, trans2=trans2)
            w, copies = entry
            if copies is None or y.shape not in copies:
                copies = {**(copies or {}), y.shape: numpy.ascontiguousarray(y.T)}
                self.transposed[key] = (w, copies)
            return numpy.matmul(x, copies[y.shape], out=out)

    return InferenceOps()


EMBEDDINGS = 20_000  # token vectors a worker keeps, like its vocabulary (see TokenVectors)


def row_keys(array) -> list[bytes]:
    """Each row of a 2-d array as the bytes it is made of (equal rows, equal keys)."""
    import numpy as np

    array = np.ascontiguousarray(array)
    return array.view(f"V{array.shape[1] * array.itemsize}").ravel().tolist()


class TokenVectors:
    """The NER's tok2vec (spaCy's MultiHashEmbed >> MaxoutWindowEncoder >> Linear) run as a few
    numpy products, with the same operations in the same order as thinc's layers, so the same
    floats: thinc's per-layer calls (15 layers, 3 per product) cost as much as the products for
    an answer's ~60 tokens. A token's embedding (hashes of its norm, prefix, suffix and shape,
    then a maxout and a layer norm: a quarter of the products) depends on those four values
    only: computed once per distinct word, for the first EMBEDDINGS words, like the vocabulary."""

    COLUMNS = ("NORM", "PREFIX", "SUFFIX", "SHAPE")

    def __init__(self, tok2vec, ops):
        nodes = list(tok2vec.walk())
        embeds = [n for n in nodes if n.name == "hashembed"]
        maxouts = [n for n in nodes if n.name == "maxout"]
        norms = [n for n in nodes if n.name == "layernorm"]
        windows = [n for n in nodes if n.name == "expand_window"]
        linear = tok2vec.layers[-1]
        extract = next(n for n in nodes if n.name == "extract_features")
        encode = next(n for n in nodes if n.name.startswith("with_array(residual"))
        if (tuple(extract.attrs["columns"]) != self.COLUMNS or len(embeds) != 4
                or [e.attrs["column"] for e in embeds] != [0, 1, 2, 3]
                or len(maxouts) != len(norms) or len(windows) != len(maxouts) - 1
                or any(w.attrs["window_size"] != 1 for w in windows)
                or linear.name != "linear" or encode.attrs.get("pad") != len(windows)
                or tok2vec.layers[-2].name != "list2array"):
            raise ValueError(f"not the tok2vec of en_core_web_sm's NER: {tok2vec.name}")
        import numpy as np

        self.ops = ops
        self.embeds = [(e.get_param("E"), e.attrs["seed"]) for e in embeds]
        self.layers = [(*self._piecewise(m), m.get_dim("nO"), m.get_dim("nP"),
                        n.get_param("G"), n.get_param("b"))
                       for m, n in zip(maxouts, norms, strict=True)]
        self.pad = len(windows)
        self.linear = (np.ascontiguousarray(linear.get_param("W").T),
                       linear.get_param("b"))
        width = maxouts[0].get_dim("nO")
        self.table = np.zeros((EMBEDDINGS, width), dtype="float32")
        self.rows: dict[bytes, int] = {}  # `row_keys` of the features -> row of `table`

    @staticmethod
    def _piecewise(maxout):
        """A maxout's weights (nO, nP, nI) as a row-major (nI, nP * nO) matrix, piece by piece,
        and its bias alike: the pieces of an output are then column blocks, whose maximum is
        two `numpy.maximum` (along thinc's last axis of 3 it is 1.5x the product)."""
        import numpy as np

        W, b = maxout.get_param("W"), maxout.get_param("b")
        return (np.ascontiguousarray(W.transpose(2, 1, 0).reshape((W.shape[-1], -1))),
                np.ascontiguousarray(b.T).reshape(-1))

    def _maxout_norm(self, X, layer):
        """thinc's maxout >> layernorm (layernorm.forward, maxout.forward), same operations."""
        import numpy as np

        W, b, nO, nP, G, beta = layer
        Y = np.matmul(X, W)
        Y += b
        # the pieces' maximum in an array of its own, not in Y's first columns: the layer norm
        # reads its rows without a stride (up to ~1.25x the layer on a short text; same floats)
        best = Y[:, :nO] if nP == 1 else np.maximum(Y[:, :nO], Y[:, nO:2 * nO])
        for piece in range(2, nP):
            np.maximum(best, Y[:, piece * nO:(piece + 1) * nO], out=best)
        # Y.mean and Y.var as numpy computes them (`_methods._mean`, `_var`: a sum, divided by
        # the count as a numpy integer), the mean once: the wrappers cost as much for a few rows
        count = np.intp(best.shape[1])
        mu = np.add.reduce(best, axis=1, keepdims=True)
        np.true_divide(mu, count, out=mu, casting="unsafe")
        centred = np.subtract(best, mu)
        var = np.add.reduce(np.square(centred), axis=1, keepdims=True)
        np.true_divide(var, count, out=var, casting="unsafe")
        var += 1e-08
        centred *= var ** (-1.0 / 2.0)
        centred *= G
        centred += beta
        return centred

    def embed(self, features):
        """Each token's embedding from its four features (rows of uint64)."""
        import numpy as np

        # a row's four features as one 32-byte key, not a tuple of four ints (a corpus text's
        # keys and lookups ~6 us instead of ~20)
        keys = row_keys(features)
        index = [self.rows.get(k, -1) for k in keys]
        missing = [i for i, r in enumerate(index) if r < 0]
        if not missing:
            return self.table[index]
        ids = np.ascontiguousarray(features[missing])
        hashed = np.concatenate([self.ops.gather_add(E, self.ops.hash(
            np.ascontiguousarray(ids[:, c]), seed) % E.shape[0])
            for c, (E, seed) in enumerate(self.embeds)], axis=1)
        new = self._maxout_norm(hashed, self.layers[0])
        if len(missing) == len(keys):
            out = new
        else:
            out = self.table[[max(r, 0) for r in index]]
            out[missing] = new
        for i, row in zip(missing, new, strict=True):
            if len(self.rows) >= EMBEDDINGS:
                break
            if keys[i] not in self.rows:
                self.rows[keys[i]] = len(self.rows)
                self.table[self.rows[keys[i]]] = row
        return out

    def __call__(self, docs):
        """What `tok2vec.predict(docs)` returns: one (tokens, 64) array for all the docs."""
        import numpy as np
        from spacy.attrs import NORM, PREFIX, SHAPE, SUFFIX

        # the docs' rows one after the other, `pad` zero rows before, between and after them
        # (thinc's `flatten` with `pad`, empty docs left out), then only the docs' rows kept
        # (`unflatten` then `flatten`): one array and one index, not a list of arrays
        pad, rows, end = self.pad, [], self.pad
        X = np.zeros((sum(len(doc) + pad for doc in docs) + pad, self.table.shape[1]),
                     "float32")
        for doc in docs:
            if len(doc):
                X[end:end + len(doc)] = self.embed(doc.to_array(
                    [NORM, PREFIX, SUFFIX, SHAPE]).astype("uint64", copy=False).reshape((-1, 4)))
                rows.append((end, end + len(doc)))
                end += len(doc) + pad
        X = X[:end]
        if rows:  # each layer (a window of one) only on the rows the next ones still read: the
            lo, hi = rows[0][0], rows[-1][1]  # outer padding shrinks by one row per layer, to
            for depth, layer in enumerate(self.layers[1:], 1):  # one (BLAS takes one row of
                reach = max(pad - depth, 1)  # a product another way: other floats)
                a, b = lo - reach, hi + reach
                X[a:b] += self._maxout_norm(self.ops.seq2col(X[a - 1:b + 1], 1)[1:-1], layer)
        X = X[rows[0][0]:rows[0][1]] if len(rows) == 1 else X[np.concatenate(
            [np.arange(start, stop) for start, stop in rows] or [np.arange(0)])]
        W, b = self.linear
        Y = np.matmul(X, W)
        Y += b
        return Y


def unused_word_flags(vocab) -> None:
    """Not computed for each new word spaCy meets (~40% of the cost of a word: every id, hash
    and number in an answer is one, again in each batch once the vocabulary is full): flags
    neither NER (norm, prefix, suffix, shape, IS_SPACE) nor Presidio (IS_STOP, IS_PUNCT) reads.
    They read as False."""
    from spacy import attrs

    for flag in (attrs.LIKE_NUM, attrs.LIKE_URL, attrs.LIKE_EMAIL, attrs.IS_CURRENCY,
                 attrs.IS_BRACKET, attrs.IS_QUOTE, attrs.IS_LEFT_PUNCT, attrs.IS_RIGHT_PUNCT,
                 attrs.IS_TITLE):
        vocab.lex_attr_getters.pop(flag, None)


def secret_recognizer(entities: list[str]):
    """The secret catalogue (`douane.secrets`) as a Presidio recogniser: what the policy flags
    and the recording redacts is what an answer masks."""
    from presidio_analyzer import EntityRecognizer, RecognizerResult

    class SecretRecognizer(EntityRecognizer):
        def load(self) -> None:
            pass

        def analyze(self, text, entities, nlp_artifacts=None):
            return [RecognizerResult(f.kind.entity, f.start, f.end, 1.0)
                    for f in secrets.find(text) if f.kind.entity in entities]

    return SecretRecognizer(supported_entities=entities, name="douane_secrets")


CHECKS = 4096  # values whose checks a pattern recogniser keeps, then forgets at once


def plain_patterns(recognizer):
    """A Presidio pattern recogniser whose `analyze` is `PatternRecognizer`'s (same matches,
    validation, scores, duplicates removed, a pattern that times out skipped) without what
    nothing here reads: two clock reads and a debug line per pattern and text, an explanation
    object per match: ~20% of their time (0.30 -> 0.24 ms per corpus text for e-mail, IP, SSN
    and card). Not for one that overrides `analyze` (IBAN)."""
    from presidio_analyzer import EntityRecognizer, PatternRecognizer, RecognizerResult
    from presidio_analyzer.pattern_recognizer import REGEX_TIMEOUT_SECONDS, re

    assert type(recognizer).analyze is PatternRecognizer.analyze, recognizer
    metadata = {RecognizerResult.RECOGNIZER_NAME_KEY: recognizer.name,
                RecognizerResult.RECOGNIZER_IDENTIFIER_KEY: recognizer.id}
    entity, lowest = recognizer.supported_entities[0], EntityRecognizer.MIN_SCORE
    # value -> (validate_result, invalidate_result): both read the value alone (an e-mail
    # address's public suffix by tldextract, ~25 us; a card's Luhn sum; an IP's parse), and a
    # stream's windows, a conversation's turns read the same values again
    checks: dict[str, tuple] = {}

    def checked(value: str) -> tuple:
        found = checks.get(value)
        if found is None:
            if len(checks) >= CHECKS:
                checks.clear()
            found = checks[value] = (recognizer.validate_result(value),
                                     recognizer.invalidate_result(value))
        return found

    def analyze(text, entities, nlp_artifacts=None, regex_flags=None):
        flags = regex_flags or recognizer.global_regex_flags
        results = []
        for pattern in recognizer.patterns:
            if not pattern.compiled_regex or pattern.compiled_with_flags != flags:
                pattern.compiled_with_flags = flags
                pattern.compiled_regex = re.compile(pattern.regex, flags=flags)
            try:
                for match in pattern.compiled_regex.finditer(text, timeout=REGEX_TIMEOUT_SECONDS):
                    start, end = match.span()
                    if start == end:
                        continue
                    score = pattern.score
                    valid, invalid = checked(text[start:end])
                    if valid is not None:
                        score = EntityRecognizer.MAX_SCORE if valid else lowest
                    if invalid:
                        score = lowest
                    if score > lowest:
                        results.append(RecognizerResult(entity, start, end, score,
                                                        recognition_metadata=dict(metadata)))
            except TimeoutError:
                logger.warning("regex pattern %s timed out, skipped", pattern.name)
        return EntityRecognizer.remove_duplicates(results)

    recognizer.analyze = analyze
    return recognizer


def field_recognizer(entities: list[str]):
    """Names, places and SSNs by their field (`masking.fields`), scored above NER's 0.85 so the
    field's type wins where NER says another."""
    from presidio_analyzer import EntityRecognizer, RecognizerResult

    class FieldRecognizer(EntityRecognizer):
        def load(self) -> None:
            pass

        def analyze(self, text, entities, nlp_artifacts=None):
            return [RecognizerResult(entity, start, end, 0.9)
                    for start, end, entity in fields.find(text, set(entities))]

    return FieldRecognizer(supported_entities=entities, name="douane_fields")


def context_enhancer():
    """Presidio's context enhancer, in place: only results a context word can raise are looked
    at (names, fields and secrets, most results, have no context words; a valid card or e-mail
    address already has the highest score), and none is deep-copied
    (Presidio copies every result it is given; these are fresh per analysis). The words around a
    result are Presidio's (`_extract_surrounding_words`) found without its scans of the whole
    text: the result's token by bisection on the tokens' ends, and whether a word near it is one
    of the text's keywords from that word (`Artifacts.keyword`), not from a list of them all."""
    from presidio_analyzer import RecognizerResult
    from presidio_analyzer.context_aware_enhancers import LemmaContextAwareEnhancer

    key = RecognizerResult.RECOGNIZER_IDENTIFIER_KEY
    boosted = RecognizerResult.IS_SCORE_ENHANCED_BY_CONTEXT_KEY

    class ContextEnhancer(LemmaContextAwareEnhancer):
        def enhance_using_context(self, text, raw_results, nlp_artifacts, recognizers,
                                  context=None):
            by_id = {r.id: r for r in recognizers if r.context}
            for result in raw_results:
                recognizer = by_id.get(result.recognition_metadata.get(key))
                if (recognizer is None or result.score >= self.MAX_SCORE  # (nothing to raise)
                        or result.recognition_metadata.get(boosted)):
                    continue
                words = self.surrounding_words(nlp_artifacts, text[result.start:result.end],
                                               result.start)
                if self.supported(words, recognizer.context):
                    result.score = min(max(result.score + self.context_similarity_factor,
                                           self.min_score_with_context_similarity),
                                       self.MAX_SCORE)
            return raw_results

        def supported(self, words: list[str], context: list[str]) -> bool:
            """`_find_supportive_word_in_context` found a word (`words` are lower-case)."""
            if self.context_matching_mode == "substring":
                return any(c in w for c in map(str.lower, context) for w in words)
            return bool(self._find_supportive_word_in_context(words, context,
                                                              self.context_matching_mode))

        def surrounding_words(self, artifacts, word: str, start: int) -> list[str]:
            """What `_extract_surrounding_words` returns (as a list of the same words)."""
            tokens = artifacts.tokens
            if not tokens:
                return [""]
            index = int(artifacts.token_ends.searchsorted(start, side="right"))
            if index == len(tokens):  # Presidio's error, for the same case
                raise ValueError(f"Did not find word {word!r} in the list of tokens")
            words = set()
            for n, step in ((self.context_prefix_count, -1), (self.context_suffix_count, 1)):
                i, remaining = index, n + 1
                while 0 <= i < len(tokens) and remaining > 0:
                    if artifacts.keyword(lemma := tokens[i].lower_):
                        words.add(lemma.lower())
                        remaining -= 1
                    i += step
            return list(words)

    return ContextEnhancer()


KEPT: dict[str, bool] = {}  # lemma -> `Artifacts.kept`, for the first VOCABULARY lemmas


def nlp_engine_class():
    """Presidio's spaCy engine whose artifacts compute their lemmas, token offsets and keywords
    (a stop-word lookup per token), read only by the context enhancer for the few results it can
    raise, on first use."""
    from presidio_analyzer.nlp_engine import NlpArtifacts, SpacyNlpEngine

    class Artifacts(NlpArtifacts):
        def __init__(self, *, nlp_engine, language, **kwargs):
            super().__init__(nlp_engine=None, language=language, lemmas=[], tokens_indices=[],
                             **kwargs)  # none of the three yet
            del self.keywords, self.lemmas, self.tokens_indices
            self.nlp_engine, self.language = nlp_engine, language

        def __getattr__(self, name):
            # Presidio's context words ("ssn", "phone", "card") are compared with lemmas, which
            # the lemmatizer left out (NOT_FOR_NER) would set: the lower-cased words instead
            if name == "lemmas":
                value = [token.lower_ for token in self.tokens]
            elif name == "tokens_indices":
                value = [token.idx for token in self.tokens]
            elif name == "keywords":
                value = self.set_keywords(self.nlp_engine, self.lemmas, self.language)
            elif name == "token_ends":  # increasing: tokens are in order, none is empty
                value = self.tokens.to_array([IDX, LENGTH]).sum(axis=1)
            elif name == "colon_words":  # the words of the keywords with a colon
                value = set()
                colons = [m.start() for m in COLON.finditer(self.tokens.text)]
                for i in set(self.token_ends.searchsorted(colons, side="right").tolist()):
                    if self.kept(lemma := self.tokens[i].lower_):
                        value.update(lemma.lower().split(":"))
            else:
                raise AttributeError(name)
            setattr(self, name, value)
            return value

        def kept(self, lemma: str) -> bool:
            """`set_keywords` keeps the lemma (its words are keywords)."""
            kept = KEPT.get(lemma)
            if kept is None:
                kept = (lemma not in ("-PRON-", "be") and not self.nlp_engine.is_stopword(
                    lemma, self.language) and not self.nlp_engine.is_punct(lemma, self.language))
                if len(KEPT) < VOCABULARY:
                    KEPT[lemma] = kept
            return kept

        def keyword(self, lemma: str) -> bool:
            """`lemma.lower() in self.keywords`, without the text's keywords: a word is one if
            its lemma is kept, or if it is a word of a kept lemma with a colon (the keywords are
            the kept lemmas lower-cased, split at colons; a lemma is lower-case already)."""
            return ":" not in lemma and (self.kept(lemma) or lemma.lower() in self.colon_words)

    class NlpEngine(SpacyNlpEngine):
        def _doc_to_nlp_artifact(self, doc, language):
            entities, scores = self._get_updated_entities(
                self._get_entities(doc), self._get_scores_for_entities(doc))
            return Artifacts(entities=entities, tokens=doc, nlp_engine=self, language=language,
                             scores=scores)

        # the flags a word's lexeme would get, without making one for each word not yet in the
        # vocabulary (Presidio asks `vocab[word].is_stop`: a new lexeme per new word)
        def is_stopword(self, word: str, language: str) -> bool:
            return self.nlp[language].vocab.lex_attr_getters[IS_STOP](word)

        def is_punct(self, word: str, language: str) -> bool:
            return self.nlp[language].vocab.lex_attr_getters[IS_PUNCT](word)

    from spacy.attrs import IDX, IS_PUNCT, IS_STOP, LENGTH

    return NlpEngine


def offline_tldextract() -> None:
    """Presidio's email recogniser calls tldextract, which downloads the suffix list by default."""
    import tldextract
    import tldextract.tldextract

    tldextract.tldextract.TLD_EXTRACTOR = tldextract.TLDExtract(suffix_list_urls=(),
                                                                cache_dir=None)


def quiet_presidio() -> None:
    for name in ("presidio-analyzer", "presidio_analyzer", "spacy", "tldextract"):
        logging.getLogger(name).setLevel(logging.ERROR)


class Analyzer:
    """douane's Presidio pipeline for one process."""

    def __init__(self, settings: MaskingSettings):
        from presidio_analyzer import AnalyzerEngine, Pattern
        from presidio_analyzer.predefined_recognizers import (
            CreditCardRecognizer,
            EmailRecognizer,
            IbanRecognizer,
            IpRecognizer,
            SpacyRecognizer,
            UsSsnRecognizer,
        )
        from presidio_analyzer.recognizer_registry import RecognizerRegistry

        offline_tldextract()
        quiet_presidio()
        self.settings = settings
        self.entities = settings.entities
        nlp_engine = nlp_engine_class()(models=[{"lang_code": "en",
                                             "model_name": settings.model or "blank"}])
        if settings.model:
            import spacy

            nlp_engine.nlp = {"en": load_ner(settings.model)}
        else:
            import spacy

            nlp_engine.nlp = {"en": spacy.blank("en")}
        self.nlp_engine = nlp_engine
        registry = RecognizerRegistry(supported_languages=["en"])
        builtin = {
            "EMAIL_ADDRESS": lambda: plain_patterns(EmailRecognizer()),
            "PHONE_NUMBER": lambda: phone_recognizer(settings.phone_regions),
            "CREDIT_CARD": lambda: plain_patterns(CreditCardRecognizer(patterns=[Pattern(
                "card", CARD_NUMBER, 0.3)])),
            "US_SSN": lambda: plain_patterns(UsSsnRecognizer()),
            "IP_ADDRESS": lambda: plain_patterns(IpRecognizer()),
            "IBAN_CODE": lambda: IbanRecognizer(),
        }
        for entity in self.entities:
            if entity in builtin:
                registry.add_recognizer(builtin[entity]())
        wanted = [e for e in self.entities if e in secrets.ENTITIES]
        if wanted:
            registry.add_recognizer(secret_recognizer(wanted))
        by_field = [e for e in self.entities if e in fields.ENTITIES]
        if by_field:
            registry.add_recognizer(field_recognizer(by_field))
        ner = [e for e in self.entities if e in NER_ENTITIES]
        if ner and settings.model:
            registry.add_recognizer(SpacyRecognizer(supported_entities=ner))
        self.engine = AnalyzerEngine(registry=registry, nlp_engine=nlp_engine,
                                     supported_languages=["en"],
                                     context_aware_enhancer=context_enhancer())
        self.learning = True  # words read are kept in spaCy's vocabulary (see `detections`)
        self.ner = bool(ner and settings.model)  # whether spaCy's pipeline runs past tokens
        # the NER run as `nlp.pipe` would (the pipeline is the NER alone: load_ner), decoded
        # without spaCy's per-token C loop and the per-call work of `pipe`
        self.decode = EntityDecoder(nlp_engine.nlp["en"].get_pipe("ner")) if self.ner else None
        if self.ner and nlp_engine.nlp["en"].pipe_names != ["ner"]:
            raise ValueError(f"{settings.model}: only its NER is run, not "
                             f"{nlp_engine.nlp['en'].pipe_names}")
        self.recognizers = {e: [r for r in registry.recognizers if e in r.supported_entities]
                            for e in self.entities}

    def candidates(self, text: str) -> list[str]:
        """The entities whose PREFILTERS `text` passes; the secrets' test (the same for each
        secret entity) made once."""
        digits = len(DIGITS.findall(text))
        secret = None
        out = []
        for e in self.entities:
            if e in secrets.ENTITIES:
                if secret is None:
                    secret = secrets.maybe(text)
                if secret:
                    out.append(e)
            elif PREFILTERS[e](text, digits):
                out.append(e)
        return out

    def analyze(self, text: str) -> list[Span]:
        return self.analyze_many([text])[0]

    def analyze_many(self, texts: list[str]) -> list[list[Span]]:
        """Texts analysed together: spaCy runs once over the batch (about half the cost per
        text of separate calls), then each text's recognisers; overlaps merged."""
        return [merge(spans) for spans in self.detections(texts)]

    def detections(self, texts: list[str]) -> list[list[Span]]:
        """Each text's detections before overlaps are merged (what scripts/eval-masking scores
        per type). A text is read as the secrets' patterns read it (`secrets.readings`: format
        characters such as zero-width joiners dropped, NFKC, and tag characters also decoded):
        a name with invisible characters between its letters is found all the same, its span
        the original characters it was read from."""
        views = [(i, seen, origin) for i, text in enumerate(texts)
                 for seen, origin in secrets.readings(text)]
        found = self._detections([seen for _, seen, _ in views])
        out: list[list[Span]] = [[] for _ in texts]
        for (i, _, origin), spans in zip(views, found, strict=True):
            out[i] += spans if origin is None else [
                Span(origin[s.start], origin[s.end - 1] + 1, s.entity, s.score) for s in spans]
        if len(views) > len(texts):  # a text with tags read twice: each detection once
            out = [sorted(set(spans), key=lambda s: (s.start, s.end)) for spans in out]
        return out

    def _detections(self, texts: list[str]) -> list[list[Span]]:
        candidates = [self.candidates(t) for t in texts]
        todo = [i for i, c in enumerate(candidates) if c]
        out: list[list[Span]] = [[] for _ in texts]
        # spaCy keeps every new word it reads (its vocabulary and strings would grow with each
        # id, hash and number for the worker's life): the first VOCABULARY words are kept (the
        # common ones, met again and again: a new word costs spaCy ~10 us to describe), then
        # what a batch adds is freed at the end of its zone
        nlp = self.nlp_engine.nlp["en"]
        self.learning = self.learning and len(nlp.vocab) < VOCABULARY
        with contextlib.nullcontext() if self.learning else nlp.memory_zone():
            docs = [nlp.make_doc(texts[i]) for i in todo]
            # the pipeline (NER) run on the batch as `nlp.pipe` runs it, without its and
            # Presidio's per-call work (~0.1 ms), and not on a text without a word of letters:
            # `refine` drops every name or place without one
            named = [d for d, i in zip(docs, todo, strict=True)
                     if self.ner and LETTERS_WORD.search(texts[i])]
            if named:
                self.decode(named)
            for i, doc in zip(todo, docs, strict=True):
                nlp_artifacts = self.nlp_engine._doc_to_nlp_artifact(doc, "en")
                results = self.presidio(texts[i], candidates[i], nlp_artifacts)
                out[i] = refine(texts[i], [Span(r.start, r.end, r.entity_type, r.score)
                                           for r in results])
        return out

    def presidio(self, text: str, entities: list[str], nlp_artifacts) -> list:
        """What `AnalyzerEngine.analyze` returns for these recognisers (tests check it), without
        its per-call work: the registry's lookup, a pass per recogniser over all results, the
        results' explanations copied."""
        from presidio_analyzer import EntityRecognizer, RecognizerResult

        recognizers = list(dict.fromkeys(r for e in entities for r in self.recognizers[e]))
        results = []
        for recognizer in recognizers:
            found = recognizer.analyze(text=text, entities=entities, nlp_artifacts=nlp_artifacts)
            for r in found or ():
                r.recognition_metadata = r.recognition_metadata or {}
                r.recognition_metadata.setdefault(RecognizerResult.RECOGNIZER_IDENTIFIER_KEY,
                                                  recognizer.id)
            results += found or ()
        results = self.engine.context_aware_enhancer.enhance_using_context(
            text, results, nlp_artifacts, recognizers)
        results = EntityRecognizer.remove_duplicates(
            [r for r in results if r.score >= self.settings.score_threshold])
        if self.settings.allow_list:
            results = self.engine._remove_allow_list(results, list(self.settings.allow_list),
                                                     text, None, "exact")
        return results


_analyzer: Analyzer | None = None


def init_worker(settings: MaskingSettings) -> None:
    """Build the pipeline once per worker."""
    global _analyzer
    _analyzer = Analyzer(settings)
    _analyzer.analyze("warm up John Smith john@example.com 212-555-0147")


def serve(conn) -> None:
    """A worker process, forked with its analyser built (`pool.Zygote`): jobs `(id, function,
    args)` in, `(id, ok, result or exception)` out, until None or the pipe closes. The process
    then exits without the interpreter's teardown: freeing spaCy's and Presidio's objects one by
    one costs 1-4 s of CPU, taken from a gateway that is stopping (its recording writer
    flushing), and nothing here needs it (answers are sent whole; the streams are flushed)."""
    _answer_jobs(conn)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _answer_jobs(conn) -> None:
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        job, fn, args = message
        try:
            answer = (job, True, fn(*args))
        except Exception as e:  # the caller's future carries it
            answer = (job, False, e)
        try:
            conn.send(answer)
        except OSError:  # the pool stopped reading: it was shut down
            return


def analyze_batch(texts: list[str]) -> list[list[Span]]:
    assert _analyzer is not None, "worker not initialised"
    return _analyzer.analyze_many(texts)


def crash_worker() -> None:
    """For tests: kill the worker process as a segfault would."""
    os._exit(1)
