"""Pieces compressed once join into one zlib stream that inflates to what they held, ends as
a whole, and carries the Adler-32 of it all; Accept-Encoding is read as RFC 9110 says."""

from __future__ import annotations

import asyncio
import random
import zlib
from collections.abc import AsyncIterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shoal.master.deflate import accepts_deflate, adler32_combine, deflating, squeeze

chunks = st.lists(st.binary(max_size=4096) | st.sampled_from([b"", b"id: 1\n\n" * 300]), max_size=12)


@given(st.binary(max_size=2048), st.binary(max_size=2048))
def test_two_adler32s_combine_into_that_of_the_bytes_joined(first: bytes, second: bytes) -> None:
    combined = adler32_combine(zlib.adler32(first), zlib.adler32(second), len(second))
    assert combined == zlib.adler32(first + second)


@pytest.mark.parametrize("size", [65_520, 65_521, 65_522, 200_000, 1 << 20])
def test_adler32s_combine_past_the_modulus_of_the_second_length(size: int) -> None:
    first, second = random.Random(size).randbytes(100), random.Random(-size).randbytes(size)
    combined = adler32_combine(zlib.adler32(first), zlib.adler32(second), len(second))
    assert combined == zlib.adler32(first + second)


async def _each(items: list[bytes]) -> AsyncIterator[bytes]:
    for item in items:
        yield item


def _deflated(items: list[bytes]) -> list[bytes]:
    async def gather() -> list[bytes]:
        return [part async for part in deflating(_each(items), squeeze)]

    return asyncio.run(gather())


@given(chunks)
def test_pieces_made_apart_inflate_as_one_stream_to_what_they_held(items: list[bytes]) -> None:
    inflater = zlib.decompressobj()
    assert inflater.decompress(b"".join(_deflated(items))) == b"".join(items)
    assert inflater.eof and not inflater.unused_data  # its end and checksum were read, and held


@given(chunks)
def test_each_piece_inflates_as_it_comes(items: list[bytes]) -> None:
    """A reader decodes what it was sent so far: nothing waits on what follows."""
    inflater = zlib.decompressobj()
    parts = _deflated(items)
    assert inflater.decompress(parts[0]) == b""  # the header
    for item, part in zip(items, parts[1:-1], strict=True):
        assert inflater.decompress(part) == item


def test_a_piece_refers_to_nothing_before_it_and_one_made_again_is_the_same() -> None:
    frames = b"id: 7\nevent: tasks\ndata: {}\n\n" * 100
    assert squeeze(frames) == squeeze(frames)
    alone = zlib.decompressobj(-zlib.MAX_WBITS)
    assert alone.decompress(squeeze(frames).deflated) == frames  # inflated with no history
    assert len(squeeze(frames).deflated) < len(frames) // 10


@pytest.mark.parametrize(
    ("header", "taken"),
    [
        ("gzip, deflate, br", True),
        ("deflate", True),
        ("DEFLATE;q=0.1", True),
        ("gzip;q=1.0, deflate;q=0", False),
        ("gzip", False),
        ("identity", False),
        ("", False),
        ("*", True),
        ("*;q=0", False),
        ("*, deflate;q=0", False),
        ("deflate;q=0.5, *;q=0", True),
        ("deflate;q=oops", False),
        (" , ;q=1, deflate ; q = 0.8 ", True),
        ("identity, deflate;q=0.1", False),  # identity named, and weighed more
        ("deflate, identity;q=0.5", True),
    ],
)
def test_accept_encoding_lets_deflate_in_when_named_or_starred_and_weighed_no_less_than_identity(
    header: str, taken: bool
) -> None:
    assert accepts_deflate(header) is taken
