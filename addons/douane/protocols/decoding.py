"""Bodies decoded with a bound on the decoded size: 15 KB of brotli must not become gigabytes.

mitmproxy's own decoding (`message.get_content()`, `.text`) inflates a body whole, synchronously,
and keeps the last result alive in a module-level cache. douane decodes once, incrementally,
refusing past the limit; the decoded bytes then replace the body and its Content-Encoding is
dropped (`decode_body`), so nothing downstream (policy, masking, recording) decodes again.
Blocking (up to `limit` bytes of output): run it off the event loop.
"""

from __future__ import annotations

import zlib

import brotli
import zstandard
from mitmproxy import http

from douane import headerfields

STEP = 64 * 1024  # compressed bytes fed per round to brotli (its output is bounded per round)
ZSTD_STEP = 256  # zstd's output is not: 256 bytes inflate to 8 MB at most (32,000:1)
# RFC 9659: a zstd content coding needs at most an 8 MB window; larger ones only cost memory.
ZSTD_WINDOW = 8 * 1024**2
# Bodies read back from a recording (the gateway applies its configured limits before).
OFFLINE_LIMIT = 64 * 1024**2


class TooLarge(Exception):
    pass


def decode(data: bytes, encoding: str, limit: int) -> bytes:
    """`data` decoded; `TooLarge` past `limit` decoded bytes, `ValueError` if it cannot be
    decoded (unknown, stacked or broken encodings, truncated data)."""
    encoding = encoding.strip().lower() or "identity"
    if encoding == "identity":
        out = data
    elif encoding in ("gzip", "x-gzip", "deflate"):
        out = _inflate(data, encoding, limit)
    elif encoding == "br":
        out = _unbrotli(data, limit)
    elif encoding == "zstd":
        out = _unzstd(data, limit)
    else:
        raise ValueError(f"unsupported Content-Encoding {encoding[:40]!r}")
    if len(out) > limit:
        raise TooLarge
    return out


def _inflate(data: bytes, encoding: str, limit: int) -> bytes:
    try:
        if encoding != "deflate":
            return _zlib(data, zlib.MAX_WBITS | 16, limit)
        try:  # zlib-wrapped as the RFC says, or raw as some servers send it
            return _zlib(data, zlib.MAX_WBITS, limit)
        except zlib.error:
            return _zlib(data, -zlib.MAX_WBITS, limit)
    except zlib.error as e:
        raise ValueError(f"broken {encoding} body: {e}") from None


def _zlib(data: bytes, wbits: int, limit: int) -> bytes:
    out = bytearray()
    while True:  # gzip may hold several members
        inflater = zlib.decompressobj(wbits)
        out += inflater.decompress(data, limit + 1 - len(out))
        if len(out) > limit:
            raise TooLarge
        if not inflater.eof:
            raise ValueError("truncated compressed body")
        data = inflater.unused_data
        if wbits < 0 or not data.strip(b"\0"):
            return bytes(out)


def _unbrotli(data: bytes, limit: int) -> bytes:
    out = bytearray()
    inflater = brotli.Decompressor()
    try:
        for start in range(0, len(data), STEP):
            out += inflater.process(data[start:start + STEP], output_buffer_limit=limit + 1 - len(out))
            while len(out) <= limit and not inflater.can_accept_more_data():
                out += inflater.process(b"", output_buffer_limit=limit + 1 - len(out))
            if len(out) > limit:
                raise TooLarge
    except brotli.error as e:
        raise ValueError(f"broken brotli body: {e}") from None
    if not inflater.is_finished():
        raise ValueError("truncated compressed body")
    return bytes(out)


def _unzstd(data: bytes, limit: int) -> bytes:
    out = bytearray()
    zstd = zstandard.ZstdDecompressor(max_window_size=ZSTD_WINDOW)
    try:
        while True:  # one or more frames
            inflater, fed = zstd.decompressobj(), 0
            while not inflater.eof and fed < len(data):
                out += inflater.decompress(data[fed:fed + ZSTD_STEP])
                fed += ZSTD_STEP
                if len(out) > limit:
                    raise TooLarge
            if not inflater.eof:
                raise ValueError("truncated compressed body")
            data = inflater.unused_data + data[fed:]
            if not data:
                return bytes(out)
    except zstandard.ZstdError as e:
        raise ValueError(f"broken zstd body: {e}") from None


def content(message: http.Message, limit: int = OFFLINE_LIMIT) -> bytes:
    """For readers of recorded flows: `get_content(strict=False)` bounded, the body decoded, or
    as it is when it cannot be decoded within `limit`."""
    raw = message.raw_content or b""
    try:
        return decode(raw, message.headers.get("content-encoding", "identity"), limit)
    except (TooLarge, ValueError):
        return raw


def decode_body(message: http.Message, limit: int) -> None:
    """Replace an encoded body by its decoded bytes (bounded) and drop the Content-Encoding."""
    encoding = headerfields.get(message.headers, b"content-encoding", "identity")
    if encoding.strip().lower() in ("", "identity"):
        return
    body = decode(message.raw_content or b"", encoding, limit)
    del message.headers["content-encoding"]
    message.content = body  # no encoding left: stored as is, Content-Length updated
