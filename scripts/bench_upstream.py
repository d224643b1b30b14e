"""The benchmark's upstream: an ASGI app under uvicorn (one process, loopback).

POST /v1/chat/completions answers at once in JSON, or with `"stream": true` streams 50 tokens at
20 ms intervals in OpenAI's SSE format, with PII in the text so masking has work to do.
Run: python scripts/bench_upstream.py PORT
"""

from __future__ import annotations

import asyncio
import json
import sys

import uvicorn

ANSWER = ("Sure. The account belongs to Maria Garcia; her email is maria.garcia@example.com and "
          "her phone 212-555-0147. The last payment used card 4111 1111 1111 1111 on March 3. "
          "Anything else I can look up for you today?")
TOKENS = [ANSWER[i:i + 4] for i in range(0, len(ANSWER), 4)][:50]
BODY = json.dumps({"id": "c", "object": "chat.completion", "created": 0, "model": "m",
                   "choices": [{"index": 0, "finish_reason": "stop",
                                "message": {"role": "assistant", "content": ANSWER}}],
                   "usage": {"prompt_tokens": 5, "completion_tokens": 50,
                             "total_tokens": 55}}).encode()


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    stream = b'"stream": true' in body or b'"stream":true' in body
    if not stream:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(BODY)).encode())]})
        await send({"type": "http.response.body", "body": BODY})
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/event-stream")]})
    for token in TOKENS:
        chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
                 "choices": [{"index": 0, "delta": {"content": token}, "finish_reason": None}]}
        await send({"type": "http.response.body", "body": f"data: {json.dumps(chunk)}\n\n"
                    .encode(), "more_body": True})
        await asyncio.sleep(0.02)
    await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="error",
                access_log=False)
