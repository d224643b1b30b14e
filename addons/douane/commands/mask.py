"""`douane mask [FILE] [--jsonl] [--spans]`: a text masked as the gateway would mask it in an
answer, with the configuration's `masking:` section: the same analyser and operators, so an
operator can try a config on their own samples before turning it on.

FILE is a text file, or `-`/nothing for stdin; with `--jsonl`, one JSON object per line whose
`text` field is masked (the line is printed back with it replaced). `--spans` prints the
detections instead, as a JSON list per text: `start`, `end` (characters), `type`, `score`. Hashed values
(`type: hash`) match the gateway's only with the same `hash_key`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from douane.commands import add_config_option, config_file, load_config
from douane.masking.config import MaskingSettings
from douane.untrusted import escape

if TYPE_CHECKING:
    from douane.masking.engine import Span


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("mask", help="mask a text as the gateway would (or show its detections)")
    p.add_argument("file", nargs="?", default="-", help="a text file; '-' or none: stdin")
    p.add_argument("--jsonl", action="store_true",
                   help="one JSON object per line; its `text` field is masked")
    p.add_argument("--spans", action="store_true",
                   help="print the detections as JSON (start, end, type, score)")
    add_config_option(p)
    p.set_defaults(func=run)


def _read(file: str, limit: int) -> str:
    """The input, decoded, at most `limit` bytes (the gateway's body size limit)."""
    stream = sys.stdin.buffer if file == "-" else open(file, "rb")  # noqa: SIM115
    with stream:
        data = stream.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"the input is larger than the gateway's body size limit ({limit} "
                         "bytes): the gateway would refuse it")
    return data.decode("utf-8", errors="replace")


def _spans(spans: list[Span]) -> list[dict]:
    return [{"start": s.start, "end": s.end, "type": s.entity, "score": round(s.score, 4)}
            for s in spans]


def _out(text: str) -> None:
    # a terminal gets control characters escaped (a sample may hold anything); a pipe the text
    sys.stdout.write(escape(text, keep="\n\t") if sys.stdout.isatty() else text)


def run(args: argparse.Namespace) -> int:
    config = load_config(args)
    settings: MaskingSettings | None = config.sections.get("masking")
    if settings is None:
        print(f"{config_file(args)} has no masking section: the gateway masks nothing",
              file=sys.stderr)
        return 2
    try:
        data = _read(args.file, config.body_size_limit)
        if args.jsonl:
            docs = [json.loads(line) for line in data.splitlines() if line.strip()]
            if not all(isinstance(d, dict) and isinstance(d.get("text"), str) for d in docs):
                raise ValueError("every line must be a JSON object with a string `text` field")
            texts = [d["text"] for d in docs]
        else:
            docs, texts = [], [data]
    except (OSError, ValueError) as e:
        print(f"douane mask: {e}", file=sys.stderr)
        return 2
    # imported here: spaCy takes seconds to import, and every `douane` command registers this one
    from douane.masking import operators
    from douane.masking.engine import Analyzer

    analyzer = Analyzer(settings)
    results = analyzer.analyze_many(texts)
    counts: dict[str, int] = {}
    for k, (text, spans) in enumerate(zip(texts, results, strict=True)):
        if args.spans:
            _out(json.dumps(_spans(spans)) + "\n")
        elif args.jsonl:
            masked = operators.apply(settings, text, spans, counts)
            _out(json.dumps({**docs[k], "text": masked}, ensure_ascii=False) + "\n")
        else:
            _out(operators.apply(settings, text, spans, counts))
    if counts:
        print("douane mask: " + ", ".join(f"{n} {e}" for e, n in sorted(counts.items())),
              file=sys.stderr)
    return 0
