"""A stream compressed once for many readers: `Content-Encoding: deflate` (a zlib stream,
RFC 1950 and 1951) made of pieces each compressed on its own. Pure.

Subscribers of the event stream mostly read the same chunks of frames (shoal.master.broadcast
makes each once for all at one index). Compressing each reader's stream with its own
compressor would cost a compression per reader; here a chunk is compressed once, with a
compressor of its own and a sync flush at its end, so it refers to nothing before it and
ends on a byte boundary. Such pieces join, in any order, into one valid deflate stream: a
reader's stream is the zlib header, its pieces, and at its end a final empty block and the
Adler-32 of everything it carried, combined from its pieces' own (`adler32_combine`, as
zlib's, which Python's zlib module does not offer).

Frames of server-sent events compress about tenfold: the bytes a master encrypts and sends
to a hundred subscribers, most of its work for them, shrink as much.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import AsyncIterator, Callable
from typing import NamedTuple

HEADER = b"\x78\x01"  # zlib: deflate, 32 KiB window, the fastest level, no dictionary
FINAL = b"\x03\x00"  # an empty final block with fixed codes: the deflate stream's end
_LEVEL = 1  # the fastest: at level 6 a chunk compresses a tenth smaller at four times the cost
_BASE = 65521  # Adler-32's modulus


class Piece(NamedTuple):
    deflated: bytes  # raw deflate, sync-flushed, referring to nothing before it
    adler: int  # Adler-32 of the bytes it holds
    size: int  # of the bytes it holds


def squeeze(data: bytes) -> Piece:
    compressor = zlib.compressobj(_LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)
    return Piece(deflated, zlib.adler32(data), len(data))


def adler32_combine(first: int, second: int, second_size: int) -> int:
    """The Adler-32 of two byte strings joined, from each one's and the second's length."""
    rem = second_size % _BASE
    low = first & 0xFFFF
    high = (rem * low) % _BASE
    low = (low + (second & 0xFFFF) + _BASE - 1) % _BASE
    high = (high + (first >> 16) + (second >> 16) + _BASE - rem) % _BASE
    return low | (high << 16)


async def deflating(chunks: AsyncIterator[bytes], piece_of: Callable[[bytes], Piece]) -> AsyncIterator[bytes]:
    """`chunks` as one zlib stream, each chunk a piece `piece_of` gives (made once for the
    readers that share it). The stream's end is written only when `chunks` ends: a reader
    gone mid-way is sent nothing more."""
    async with contextlib.aclosing(chunks):  # type: ignore[type-var]
        yield HEADER
        adler = 1  # of no bytes
        async for chunk in chunks:
            piece = piece_of(chunk)
            adler = adler32_combine(adler, piece.adler, piece.size)
            yield piece.deflated
    yield FINAL + adler.to_bytes(4, "big")


def accepts_deflate(accept_encoding: str) -> bool:
    """Whether an Accept-Encoding header (RFC 9110, its lines joined with commas) lets
    `deflate` in: named, or `*`, with a weight above zero (a coding it names outweighs `*`),
    and no lower than `identity`'s when that is named."""
    weights: dict[str, float] = {}
    for item in accept_encoding.split(","):
        coding, *params = (part.strip() for part in item.split(";"))
        weight = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    weight = float(value)
                except ValueError:
                    weight = 0.0  # a weight it cannot read: not taken as a yes
        if coding:
            weights[coding.lower()] = weight
    deflate = weights.get("deflate", weights.get("*", 0.0))
    return deflate > 0 and deflate >= weights.get("identity", 0.0)
