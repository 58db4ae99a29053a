"""The ``?body=`` decoder: ``_core.decode_body`` (Rust) against the standard library doing the same
work (``urllib.parse.unquote``, space and URL-safe symbols to standard, ``base64``, UTF-8,
``json.loads``, then the padded standard base64 escaped for the bot's query string).

    python -m pytest benches/bench_body.py --benchmark-only

Plain ``pytest`` does not run this file: ``testpaths`` is ``tests``.
"""

from __future__ import annotations

import base64
import itertools
import json
from collections.abc import Callable
from urllib.parse import quote, unquote

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from wsgate import _core

_TO_STANDARD = str.maketrans({" ": "+", "-": "+", "_": "/"})


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def stdlib_decode_body(raw: str) -> tuple[str, str]:
    """What ``_core.decode_body`` does, written with the standard library."""
    text = unquote(raw, errors="strict").translate(_TO_STANDARD).rstrip("=")
    if len(text) // 4 * 3 + len(text) % 4 * 3 // 4 > _core.MAX_BODY_BYTES:
        raise ValueError("too large")
    data = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    document = data.decode("utf-8")
    json.loads(document, parse_constant=_reject_constant)
    # Three replaces: urllib.parse.quote would add ~230 µs at 4 KiB and flatter the Rust side.
    upstream = base64.b64encode(data).decode()
    return document, upstream.replace("+", "%2B").replace("/", "%2F").replace("=", "%3D")


def document_of(size: int) -> str:
    """A JSON object of exactly ``size`` bytes, shaped like a session body (short fields)."""
    notes: list[str] = []
    fields: dict[str, object] = {"user": "u-1234", "lang": "en-US", "notes": notes, "pad": ""}

    def compact() -> str:
        return json.dumps(fields, separators=(",", ":"))

    for word in itertools.cycle(["lorem", "ipsum+dolor", "sit/amet"]):
        notes.append(word)
        if len(compact()) > size:
            notes.pop()
            break
    fields["pad"] = "x" * (size - len(compact()))
    return compact()


# As a client sends it: standard base64 with padding, percent-encoded for the query string.
BODIES = {
    size: quote(base64.b64encode(document_of(size).encode()).decode(), safe="")
    for size in (100, _core.MAX_BODY_BYTES)
}
DECODERS: dict[str, Callable[[str], tuple[str, str]]] = {
    "rust": _core.decode_body,
    "stdlib": stdlib_decode_body,
}


@pytest.mark.parametrize("size", sorted(BODIES), ids=lambda size: f"{size}B")
@pytest.mark.parametrize("decoder", sorted(DECODERS))
def test_decoding_a_body(benchmark: BenchmarkFixture, decoder: str, size: int) -> None:
    raw = BODIES[size]
    benchmark.group = f"decode a {size}-byte body"
    result = benchmark(DECODERS[decoder], raw)
    assert result == _core.decode_body(raw) == stdlib_decode_body(raw)
    assert len(result[0]) == size
