"""Property tests of the Rust ``?body=`` decoder (``_core.decode_body``, SPEC §4).

Two kinds: every way a client may encode a JSON document decodes to that exact document, and a
small pure-Python reference of the accept/reject decision (below, :func:`reference_decision`)
agrees with the Rust one on arbitrary input. The reference is the executable spec: read it to
know what the decoder accepts.
"""

from __future__ import annotations

import base64
import json
import re
from urllib.parse import quote, unquote

import pytest
from hypothesis import HealthCheck, assume, example, given, reject, settings
from hypothesis import strategies as st

from wsgate import _core
from wsgate.routing import body_error

LIMIT = _core.MAX_BODY_BYTES
# Longest base64 of a LIMIT-byte document, padded; and the longest raw value that may still hold
# one (every symbol percent-escaped as %XX). Longer raw input is refused as 413 unread.
MAX_ENCODED_LEN = -(-LIMIT // 3) * 4
MAX_RAW_LEN = 3 * MAX_ENCODED_LEN

_STANDARD = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")
_HEX = frozenset(b"0123456789abcdefABCDEF")
# After percent-decoding: a space (a '+' turned into one on the way) and the URL-safe symbols
# read as the standard ones.
_READ_AS = {ord(" "): ord("+"), ord("-"): ord("+"), ord("_"): ord("/")}


Verdict = str | tuple[int, str]  # the JSON text, or a refusal
TOO_LARGE = (413, "too large")
NOT_BASE64 = (400, "not base64")
NOT_JSON = (400, "not JSON")
TOO_DEEP = (400, "too deep")
DEPTH = _core.MAX_BODY_DEPTH


def nesting_depth(document: str) -> int:
    """Deepest nesting of arrays and objects, brackets inside strings not counted."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in document:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


class BeyondReference(Exception):
    """Input the reference cannot judge (Python's json recursion limit); not a verdict."""


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def reference_decision(raw: str) -> Verdict:
    """What ``decode_body`` must do with ``raw``: the JSON text it returns, or which refusal
    (status and check) its ``BodyError`` is. Checks run in the decoder's order."""
    data = raw.encode()
    if len(data) > MAX_RAW_LEN:
        return TOO_LARGE  # judged on length alone: it cannot hold a document within the limit
    text = bytearray()
    i = 0
    while i < len(data):
        byte = data[i]
        if byte == ord("%"):
            digits = data[i + 1 : i + 3]
            if len(digits) < 2 or not set(digits) <= _HEX:
                return NOT_BASE64  # a malformed escape is not base64
            byte = int(digits, 16)
            i += 3
        else:
            i += 1
        text.append(_READ_AS.get(byte, byte))
    symbols = text.rstrip(b"=")
    padding = len(text) - len(symbols)
    if padding and (padding > 2 or len(text) % 4):
        return NOT_BASE64  # padding is optional, but when present it must complete the last quad
    if len(symbols) % 4 == 1:
        return NOT_BASE64  # six bits cannot end a byte
    if len(symbols) // 4 * 3 + len(symbols) % 4 * 3 // 4 > LIMIT:
        return TOO_LARGE  # judged from the length, before a symbol is read
    if not set(symbols) <= _STANDARD:
        return NOT_BASE64
    # Non-zero bits after the last byte are ignored, as binascii does.
    decoded = base64.b64decode(bytes(symbols) + b"=" * (-len(symbols) % 4), validate=True)
    try:
        document = decoded.decode("utf-8")
        # JSON as RFC 8259 has it: Python's extensions (NaN, Infinity, -Infinity) are refused.
        json.loads(document, parse_constant=_reject_constant)
    except RecursionError:
        # Python's parser gives up near depth 1000; the decoder's cap is far below that, but a
        # document it cannot parse it cannot judge as JSON either.
        raise BeyondReference from None
    except ValueError:  # UnicodeDecodeError and JSONDecodeError included
        return NOT_JSON
    if nesting_depth(document) > DEPTH:
        return TOO_DEEP
    return document


def rust_decision(raw: str) -> Verdict:
    try:
        document, _ = _core.decode_body(raw)
    except _core.BodyError as exc:
        if body_error(exc).status == 413:
            return TOO_LARGE
        if "base64" in exc.reason:
            return NOT_BASE64
        return TOO_DEEP if "nests" in exc.reason else NOT_JSON
    return document


def escape_every_byte(text: str, *, upper: bool) -> str:
    escaped = "".join(f"%{b:02x}" for b in text.encode())
    return escaped.upper() if upper else escaped


def variants(document: bytes) -> dict[str, str]:
    """Every way a client may send ``document`` as ``?body=`` (SPEC §4), by name."""
    standard = base64.b64encode(document).decode()
    url_safe = base64.urlsafe_b64encode(document).decode()
    mixed = "".join({"+": "-", "/": "_"}.get(c, c) if i % 2 else c for i, c in enumerate(standard))
    return {
        "standard": standard,
        "standard unpadded": standard.rstrip("="),
        "url-safe": url_safe,
        "url-safe unpadded": url_safe.rstrip("="),
        "alphabets mixed": mixed,
        "'+' arrived as a space": standard.replace("+", " "),
        "'+' as %2B, all percent-encoded": quote(standard, safe=""),
        "'+' as %2B, unpadded": quote(standard.rstrip("="), safe=""),
        "lowercase escapes": re.sub(
            "%[0-9A-F]{2}", lambda m: m[0].lower(), quote(standard, safe="")
        ),
        "space percent-encoded": standard.replace("+", "%20"),
        "every byte escaped": escape_every_byte(standard, upper=False),
        "url-safe, every byte escaped": escape_every_byte(url_safe, upper=True),
    }


def padded_standard(document: bytes) -> str:
    return base64.b64encode(document).decode()


# --- strategies ---------------------------------------------------------------------------------

_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=8) | st.dictionaries(st.text(), inner, max_size=8),
    max_leaves=40,
)


@st.composite
def json_documents(draw: st.DrawFn, max_bytes: int = LIMIT) -> str:
    """A JSON text of at most ``max_bytes`` UTF-8 bytes, compact or pretty, ASCII or not."""
    value = draw(_json_values | st.text(min_size=0, max_size=1500))
    text = json.dumps(
        value,
        ensure_ascii=draw(st.booleans()),
        indent=draw(st.none() | st.integers(0, 4)),
        separators=draw(st.sampled_from([None, (",", ":"), (" , ", " : ")])),
    )
    text = (
        draw(st.sampled_from(["", " ", "\n", "\t\r\n "]))
        + text
        + draw(st.sampled_from(["", " \n"]))
    )
    assume(len(text.encode()) <= max_bytes)
    return text


# Text the decoder has to think about: base64 symbols of both alphabets, padding, escapes.
_b64ish = st.text(
    alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/-_= %e3",
    max_size=64,
)
# JSON-ish text: encoded, it often decodes and parses, so both verdicts are exercised.
_jsonish = st.text(alphabet='{}[]",:0123456789.eE-+ tnrufalsNIiy\\\n\x00é', max_size=24)


@st.composite
def encoded_jsonish(draw: st.DrawFn) -> str:
    """Base64 of a small document, JSON-ish text or random bytes, maybe slightly damaged."""
    payload = draw(
        json_documents(max_bytes=48).map(str.encode)
        | _jsonish.map(str.encode)
        | st.binary(max_size=24)
    )
    encoded = draw(st.sampled_from(list(variants(payload).values())))
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):
        if encoded:
            at = draw(st.integers(0, len(encoded) - 1))
            encoded = encoded[:at] + draw(st.sampled_from("=%_-+ !A\u00e9")) + encoded[at + 1 :]
    return encoded


def _not_json(text: str) -> bool:
    try:
        json.loads(text, parse_constant=_reject_constant)
    except ValueError:
        return True
    return False


# --- every encoding of a document within the limit ----------------------------------------------


@pytest.mark.slow
@given(json_documents())
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@example('{"k":"??>>~~","n":[1,2.5,null,true]} ')  # standard base64 with '+', '/' and padding
def test_every_encoding_of_a_json_document_decodes_to_the_same_text(document: str) -> None:
    data = document.encode()
    for name, raw in variants(data).items():
        text, upstream_value = _core.decode_body(raw)
        assert text == document, name
        assert unquote(upstream_value) == padded_standard(data), name
        assert re.fullmatch(r"[A-Za-z0-9%]*", upstream_value), name


@given(json_documents())
@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
def test_the_upstream_value_is_the_same_however_the_client_encoded(document: str) -> None:
    values = {_core.decode_body(raw)[1] for raw in variants(document.encode()).values()}
    assert values == {quote(padded_standard(document.encode()), safe="")}


def test_a_document_of_exactly_the_limit_is_accepted_in_every_encoding() -> None:
    document = json.dumps("a" * (LIMIT - 2))
    assert len(document) == LIMIT
    for name, raw in variants(document.encode()).items():
        assert _core.decode_body(raw)[0] == document, name


def test_nesting_up_to_the_cap_is_accepted_and_deeper_is_400() -> None:
    # Valid JSON, but a bot parsing 2,000 brackets with json.loads would crash (RecursionError).
    at_cap = "[" * DEPTH + "]" * DEPTH
    assert _core.decode_body(padded_standard(at_cap.encode()))[0] == at_cap
    for depth in (DEPTH + 1, LIMIT // 2):
        document = "[" * depth + "]" * depth
        with pytest.raises(_core.BodyError) as refused:
            _core.decode_body(padded_standard(document.encode()))
        assert body_error(refused.value).status == 400
        assert f"deeper than {DEPTH} levels" in refused.value.reason
    quoted = json.dumps({"a": "[" * 500})  # brackets inside a string do not nest
    assert _core.decode_body(padded_standard(quoted.encode()))[0] == quoted


# --- refusals -----------------------------------------------------------------------------------


@given(length=st.integers(LIMIT - 1, 3 * LIMIT), filler=st.sampled_from("a\u00e9 "))
@settings(max_examples=60)
def test_a_document_over_the_limit_is_413_in_every_encoding(length: int, filler: str) -> None:
    data = json.dumps(filler * length, ensure_ascii=False).encode()
    assert len(data) > LIMIT
    for name, raw in variants(data).items():
        with pytest.raises(_core.BodyError) as caught:
            _core.decode_body(raw)
        assert body_error(caught.value).status == 413, name
        assert str(LIMIT) in caught.value.reason, name


@given(st.integers(0, 255), st.binary(min_size=1, max_size=64))
@settings(max_examples=30)
def test_anything_decoding_to_more_than_the_limit_is_413_before_it_is_read(
    fill: int, tail: bytes
) -> None:
    data = bytes([fill]) * LIMIT + tail  # not even JSON: the size is judged first
    with pytest.raises(_core.BodyError) as caught:
        _core.decode_body(base64.b64encode(data).decode())
    assert body_error(caught.value).status == 413


@given(st.text(max_size=64), st.integers(0, 64), st.sampled_from("!*.~@#$()[]{}:;,'\"\\\u00e9"))
def test_text_with_a_symbol_outside_both_alphabets_is_400(text: str, at: int, bad: str) -> None:
    raw = text[:at] + bad + text[at:]
    with pytest.raises(_core.BodyError) as caught:
        _core.decode_body(raw)
    assert (body_error(caught.value).status, caught.value.reason) == (400, "body is not base64")


@given(st.binary(max_size=300))
@example(b"\xff")
@example(b'"\xed\xa0\x80"')  # a UTF-16 surrogate encoded in "UTF-8"
def test_base64_of_bytes_that_are_not_utf8_is_400(data: bytes) -> None:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    else:
        assume(False)
    for name, raw in variants(data).items():
        with pytest.raises(_core.BodyError) as caught:
            _core.decode_body(raw)
        assert body_error(caught.value).status == 400, name
        assert caught.value.reason == "body is not a UTF-8 JSON document", name


@given(st.text(max_size=200).filter(_not_json))
@example("NaN")
@example("[Infinity]")
@example('{"a": -Infinity}')
@example("")
@example("   ")
@example('{"a":1}x')
def test_base64_of_text_that_is_not_json_is_400(text: str) -> None:
    with pytest.raises(_core.BodyError) as caught:
        _core.decode_body(padded_standard(text.encode()))
    assert (body_error(caught.value).status, caught.value.reason) == (
        400,
        "body is not a UTF-8 JSON document",
    )


def test_a_body_error_is_a_value_error_whose_reason_never_echoes_the_input() -> None:
    for raw in ["zzsecretzz*", padded_standard(b'"zzsecretzz"x'), "z" * (MAX_RAW_LEN + 1)]:
        with pytest.raises(ValueError) as caught:
            _core.decode_body(raw)
        assert isinstance(caught.value, _core.BodyError)
        assert "zz" not in str(caught.value) and "\n" not in caught.value.reason


# --- the reference and the decoder agree ----------------------------------------------------------


@pytest.mark.slow
@given(st.text(max_size=64) | _b64ish | encoded_jsonish())
@settings(max_examples=1000)
@example("e3=")  # incomplete padding
@example("e30==")
@example("ZTMw=")
@example("e3=0")
@example("====")
@example("MR")  # non-zero trailing bits
@example("MQ=%3D")
@example("e30%2")
@example("e30%C3%A9")
@example("TmFO")  # NaN
@example("")
def test_the_reference_and_the_rust_decoder_agree_on_any_input(raw: str) -> None:
    try:
        expected = reference_decision(raw)
    except BeyondReference:
        reject()
    assert rust_decision(raw) == expected


@given(st.integers(MAX_ENCODED_LEN - 8, MAX_RAW_LEN + 8), st.sampled_from(["A", "%41", "!", "="]))
@settings(max_examples=100)
def test_the_reference_and_the_rust_decoder_agree_around_the_size_limits(
    length: int, unit: str
) -> None:
    raw = (unit * length)[:length]
    assert rust_decision(raw) == reference_decision(raw)


def test_the_reference_gives_the_pinned_verdicts_of_known_cases() -> None:
    # Pins the reference itself, so a wrong reference cannot agree with a wrong decoder silently.
    cases: dict[str, Verdict] = {
        "e30": "{}",
        "e30=": "{}",
        "MQ%3D%3D": "1",
        "WyI_Pz8-Il0": '["???>"]',
        "e3=": NOT_BASE64,
        "e": NOT_BASE64,
        "e30%zz": NOT_BASE64,
        "e3*0": NOT_BASE64,
        "TmFO": NOT_JSON,
        "_w": NOT_JSON,
        "": NOT_JSON,
        "A" * (MAX_ENCODED_LEN + 4): TOO_LARGE,
        "%" * (MAX_RAW_LEN + 1): TOO_LARGE,
    }
    for raw, expected in cases.items():
        assert reference_decision(raw) == expected, raw
