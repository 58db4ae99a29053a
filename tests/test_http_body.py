"""A Session API request's body framing and the chunked decoder (:mod:`wsgate.http_body`),
without sockets: every refusal of the module's table, limits judged before the bytes they guard,
and the same body however the bytes are split."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wsgate.errors import HttpError
from wsgate.http_body import MAX_FRAMING_BYTES, ChunkedBody, body_framing

LIMIT = 1000


@pytest.mark.parametrize(
    ("headers", "length"),
    [
        ([], 0),
        ([("content-length", "12")], 12),
        ([("content-length", "12"), ("content-length", " 12")], 12),
        ([("content-length", f"{LIMIT}")], LIMIT),
        ([("transfer-encoding", "chunked")], None),
        ([("transfer-encoding", " Chunked ")], None),
    ],
)
def test_body_framing(headers: list[tuple[str, str]], length: int | None) -> None:
    assert body_framing(headers, LIMIT) == length


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ([("content-length", f"{LIMIT + 1}")], 413),
        ([("content-length", "9" * 10_000)], 413),
        ([("content-length", "1"), ("content-length", "2")], 400),
        ([("content-length", "+1")], 400),
        ([("content-length", "1_0")], 400),
        ([("transfer-encoding", "chunked"), ("content-length", "3")], 400),
        ([("transfer-encoding", "gzip, chunked")], 501),
        ([("transfer-encoding", "chunked"), ("transfer-encoding", "chunked")], 501),
    ],
)
def test_body_framing_refusals(headers: list[tuple[str, str]], status: int) -> None:
    with pytest.raises(HttpError) as refused:
        body_framing(headers, LIMIT)
    assert refused.value.status == status


def chunked(*parts: bytes, trailer: bytes = b"") -> bytes:
    return b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in parts) + b"0\r\n" + trailer + b"\r\n"


@given(
    parts=st.lists(st.binary(min_size=1, max_size=40), max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=10),
)
def test_the_body_is_the_same_however_its_bytes_arrive(parts: list[bytes], cuts: list[int]) -> None:
    wire = chunked(*parts, trailer=b"X-Sum: 1\r\n") + b"past its end: ignored"
    decoder = ChunkedBody(LIMIT)
    bounds = [0, *sorted(c for c in cuts if c < len(wire)), len(wire)]
    for a, b in itertools.pairwise(bounds):
        body = decoder.feed(wire[a:b])
        if body is not None:
            break
    assert body == b"".join(parts)


def test_a_body_fed_byte_by_byte_with_extensions_and_trailers() -> None:
    wire = b'3;ext=1;q="a b"\r\nabc\r\n2 \r\nde\r\n0;last\r\nA: 1\r\nB: 2\r\n\r\n'
    decoder = ChunkedBody(LIMIT)
    results = [decoder.feed(wire[i : i + 1]) for i in range(len(wire))]
    assert results[:-1] == [None] * (len(wire) - 1) and results[-1] == b"abcde"


def test_the_limit_holds_to_the_byte_and_is_judged_on_the_size_line() -> None:
    assert ChunkedBody(LIMIT).feed(chunked(b"a" * 600, b"b" * 400)) == b"a" * 600 + b"b" * 400
    decoder = ChunkedBody(LIMIT)
    assert decoder.feed(chunked(b"a" * 600)[:-5]) is None  # 600 taken
    with pytest.raises(HttpError) as refused:
        decoder.feed(b"191\r\n")  # 401 more: refused before any of its data
    assert refused.value.status == 413
    assert refused.value.reason == "Request too large"


@pytest.mark.parametrize(
    ("wire", "status"),
    [
        (b"zz\r\n", 400),
        (b"\r\n", 400),
        (b"-1\r\n", 400),
        (b"1" * 17 + b"\r\n", 400),
        (b"3\r\nabcXY", 400),
        (b"3\nabc\n0\n\n", 400),  # bare LF: the line never ends, until it is too long
        (b"f" * 16 + b"\r\n", 413),
    ],
)
def test_bad_framing_is_refused(wire: bytes, status: int) -> None:
    decoder = ChunkedBody(LIMIT)
    with pytest.raises(HttpError) as refused:
        decoder.feed(wire)
        decoder.feed(b"x" * 5000)  # a line that never ends is refused once too long
    assert refused.value.status == status


def test_framing_is_bounded_beside_the_data() -> None:
    decoder = ChunkedBody(LIMIT)
    extension = b"1;" + b"e" * 100 + b"\r\nx\r\n"
    with pytest.raises(HttpError) as refused:
        for _ in range(MAX_FRAMING_BYTES // 100 + 1):
            decoder.feed(extension)
    assert refused.value.status == 413
    assert "framing" in refused.value.reason
