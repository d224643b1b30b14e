"""Recording redaction benchmark: what `recording_of` (scrubbing a flow's state and redacting its
secrets) costs the recording writer process per flow (JSON prompts and answers, a streamed answer of
4-character deltas, a base64 image, a stream whose secret is split across deltas and is rewritten,
and an Anthropic answer of text blocks in a row, whole and streamed, clean or with a secret split
across two blocks; `streamed` is what the gateway hands the writer, `writer.texts_read`)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from mitmproxy.test import tflow, tutils

from douane.recording.writer import recording_of

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support.upstream import (  # noqa: E402
    _anthropic,
    _openai_chat_events,
    _pieces,
    anthropic_stream,
)

WORDS = "The quarterly report shows revenue grew in every region except the north. "
KEY = "AKIA" + "Q3VJ7XK2MZP4WT6B"  # fake


def bench(name: str, request: str, ctype: str, response: str, runs: int = 20,
          streamed: tuple[str, ...] = (), protocol: str = "openai") -> None:
    times = []
    for _ in range(runs):
        f = tflow.tflow(resp=tutils.tresp())
        f.request.method = "POST"
        f.request.path = "/v1/messages" if protocol == "anthropic" else "/v1/chat/completions"
        f.metadata["douane"] = {"interaction": {"protocol": protocol}}
        f.request.headers["content-type"] = "application/json"
        f.request.text = request
        f.response.headers["content-type"] = ctype
        f.response.text = response
        snapshot = f.get_state()
        start = time.perf_counter()
        recording_of(snapshot, frozenset(), streamed)
        times.append(time.perf_counter() - start)
    times.sort()
    print(f"{name:<46} {len(request) + len(response):>9} bytes  p50 "
          f"{times[len(times) // 2] * 1000:8.2f} ms  max {times[-1] * 1000:8.2f} ms")


def main() -> int:
    prompt = json.dumps({"model": "m", "messages": [{"role": "user", "content": WORDS * 4}]})
    answer = json.dumps({"choices": [{"message": {"role": "assistant", "content": WORDS * 8}}]})
    bench("chat 1 KB prompt, JSON answer", prompt, "application/json", answer)
    history = json.dumps({"model": "m", "messages": [{"role": "user", "content": WORDS * 20}]
                          * 700})
    bench("chat 1 MB conversation, JSON answer", history, "application/json", answer)
    text = WORDS * 100
    stream = "".join(_openai_chat_events("m", _pieces(text, 4)))
    bench("7.5 KB answer streamed in 4-character deltas", prompt, "text/event-stream", stream)
    image = json.dumps({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                            + "iVBORw0KGgoAAAANSUhEUgAA" * 200_000}}]}]})
    bench("5 MB base64 image", image, "application/json", answer, runs=5)
    leaky = "".join(_openai_chat_events("m", _pieces(text + KEY, 4)))
    bench("same stream, a secret split across deltas", prompt, "text/event-stream", leaky,
          streamed=(text + KEY,))
    ask = json.dumps({"model": "m", "max_tokens": 99, "messages": [
        {"role": "user", "content": WORDS * 4}]})
    for label, blocks in (("clean", [WORDS * 8] * 3),
                          ("a secret split across two", [WORDS * 8 + KEY[:9], KEY[9:] + " " + WORDS * 8,
                                                         WORDS * 8])):
        message = _anthropic("m", "")
        message["content"] = [{"type": "text", "text": b} for b in blocks]
        bench(f"Anthropic, 3 blocks in a row, {label}", ask, "application/json",
              json.dumps(message), streamed=("".join(blocks),), protocol="anthropic")
        stream = "".join(anthropic_stream(message, lambda t: _pieces(t, 4)))
        bench(f"  the same streamed ({label})", ask, "text/event-stream", stream,
              streamed=tuple(blocks), protocol="anthropic")
    return 0


if __name__ == "__main__":
    sys.exit(main())
