"""The benchmark's upstream: an ASGI app under uvicorn (one process, loopback), three APIs.

- POST .../chat/completions (OpenAI): a JSON answer at once, or with `"stream": true` 50 tokens in
  OpenAI's SSE format at 50 tokens/s; a model named `...-paceN` streams at N tokens/s instead.
- POST .../messages (Anthropic Messages): a JSON answer at once.
- POST .../mcp (MCP Streamable HTTP, JSON answers): `tools/call` returns the answer as the tool's
  text; any other method an empty result.
Every answer carries the same ~200 characters with PII (a name, an email, a phone, a card number),
so masking has work to do.
Run: python scripts/bench_upstream.py PORT
"""

from __future__ import annotations

import asyncio
import json
import re
import sys

import uvicorn

ANSWER = ("Sure. The account belongs to Maria Garcia; her email is maria.garcia@example.com and "
          "her phone 212-555-0147. The last payment used card 4111 1111 1111 1111 on March 3. "
          "Anything else I can look up for you today?")
TOKENS = [ANSWER[i:i + 4] for i in range(0, len(ANSWER), 4)][:50]
USAGE = {"prompt_tokens": 5, "completion_tokens": 50, "total_tokens": 55}
OPENAI = json.dumps({"id": "c", "object": "chat.completion", "created": 0, "model": "m",
                     "choices": [{"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": ANSWER}}],
                     "usage": USAGE}).encode()
ANTHROPIC = json.dumps({"id": "msg_bench", "type": "message", "role": "assistant", "model": "m",
                        "content": [{"type": "text", "text": ANSWER}], "stop_reason": "end_turn",
                        "stop_sequence": None,
                        "usage": {"input_tokens": 5, "output_tokens": 50}}).encode()
PACE = re.compile(rb'"model":\s*"[^"]*-pace(\d+)"')


def mcp_answer(body: bytes) -> bytes:
    request = json.loads(body)
    result = ({"content": [{"type": "text", "text": ANSWER}], "isError": False}
              if request.get("method") == "tools/call" else {})
    return json.dumps({"jsonrpc": "2.0", "id": request.get("id"), "result": result}).encode()


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    path = scope["path"]
    stream = b'"stream": true' in body or b'"stream":true' in body
    if not stream:
        answer = (ANTHROPIC if path.endswith("/messages") else mcp_answer(body)
                  if path.endswith("/mcp") else OPENAI)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(answer)).encode())]})
        await send({"type": "http.response.body", "body": answer})
        return
    pace = PACE.search(body)
    interval = 1 / int(pace.group(1)) if pace else 0.02
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/event-stream")]})
    for token in TOKENS:
        chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
                 "choices": [{"index": 0, "delta": {"content": token}, "finish_reason": None}]}
        await send({"type": "http.response.body", "body": f"data: {json.dumps(chunk)}\n\n"
                    .encode(), "more_body": True})
        await asyncio.sleep(interval)
    await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="error",
                access_log=False)
