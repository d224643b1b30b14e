"""Bounded decoding (douane.protocols.decoding): exact output within the limit, TooLarge past it
without producing the rest, broken, truncated, unknown and stacked encodings refused."""

from __future__ import annotations

import gzip
import zlib

import brotli
import pytest
import zstandard
from mitmproxy.test import tutils

from douane.protocols import decoding

BODY = b'{"model": "m", "messages": [{"role": "user", "content": "' + b"hi " * 500 + b'"}]}'
ENCODERS = {
    "gzip": gzip.compress,
    "x-gzip": gzip.compress,
    "deflate": zlib.compress,  # zlib-wrapped, as the RFC says
    "br": brotli.compress,
    "zstd": lambda d: zstandard.ZstdCompressor().compress(d),
}


@pytest.mark.parametrize("encoding", ENCODERS)
def test_each_encoding_decodes_exactly(encoding):
    packed = ENCODERS[encoding](BODY)
    assert decoding.decode(packed, encoding, len(BODY)) == BODY
    with pytest.raises(decoding.TooLarge):
        decoding.decode(packed, encoding, len(BODY) - 1)
    for cut in (packed[:-3], packed[:len(packed) // 2]):
        with pytest.raises(ValueError):
            decoding.decode(cut, encoding, 10 * len(BODY))


def test_raw_deflate_several_gzip_members_and_zstd_frames():
    raw = zlib.compressobj(6, zlib.DEFLATED, -15)
    assert decoding.decode(raw.compress(BODY) + raw.flush(), "deflate", 10**6) == BODY
    assert decoding.decode(gzip.compress(BODY) + gzip.compress(BODY), "gzip", 10**6) == BODY * 2
    frame = zstandard.ZstdCompressor().compress(BODY)
    assert decoding.decode(frame + frame, "zstd", 10**6) == BODY * 2


@pytest.mark.parametrize("encoding", ["gzip", "br", "zstd"])
def test_a_bomb_stops_at_the_limit(encoding):
    zeros = bytes(1024**2)
    if encoding == "gzip":
        z = zlib.compressobj(9, zlib.DEFLATED, 31)
        bomb = b"".join(z.compress(zeros) for _ in range(512)) + z.flush()
    elif encoding == "br":
        b = brotli.Compressor(quality=5)
        bomb = b"".join(b.process(zeros) for _ in range(512)) + b.finish()
    else:
        c = zstandard.ZstdCompressor().compressobj()
        bomb = b"".join(c.compress(zeros) for _ in range(512)) + c.flush()
    with pytest.raises(decoding.TooLarge):  # 512 MiB inflated: only 1 MiB (+ a step) is made
        decoding.decode(bomb, encoding, 1024**2)


@pytest.mark.parametrize("encoding", ["gzip, gzip", "gzip,br", "compress", "utf-8", "x-rot13"])
def test_unknown_and_stacked_encodings_are_refused(encoding):
    with pytest.raises(ValueError):
        decoding.decode(gzip.compress(BODY), encoding, 10**6)


def test_decode_body_replaces_the_body_and_its_framing():
    message = tutils.treq(content=b"")
    message.headers["content-encoding"] = "gzip"
    message.raw_content = gzip.compress(BODY)
    decoding.decode_body(message, 10**6)
    assert "content-encoding" not in message.headers and message.raw_content == BODY
    assert message.headers["content-length"] == str(len(BODY))


def test_content_falls_back_to_the_raw_bytes():
    message = tutils.treq(content=b"")
    message.headers["content-encoding"] = "gzip"
    message.raw_content = b"not gzip"
    assert decoding.content(message) == b"not gzip"
    message.raw_content = gzip.compress(BODY)
    assert decoding.content(message) == BODY
    assert decoding.content(message, limit=10) == message.raw_content
