"""Parsing of request heads (wsgate.request): strict, Sans-I/O, only HttpError(400) on failure."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wsgate.errors import HttpError
from wsgate.request import parse_header_lines, parse_query, parse_request, split_list

HEAD = (
    b"GET /ws/generic/echo.demo?body=e30%3D&x=1 HTTP/1.1\r\n"
    b"Host: gw.example\r\n"
    b"Upgrade: websocket\r\n"
    b"X-Multi: a\r\n"
    b"x-multi:  b \r\n"
    b"\r\n"
)


def test_a_well_formed_head_gives_method_target_path_query_and_ordered_headers() -> None:
    request = parse_request(HEAD)
    assert request.method == "GET"
    assert request.target == "/ws/generic/echo.demo?body=e30%3D&x=1"
    assert request.path == "/ws/generic/echo.demo"
    assert request.query == "body=e30%3D&x=1"
    assert request.version == "HTTP/1.1"
    assert request.headers == (
        ("host", "gw.example"),
        ("upgrade", "websocket"),
        ("x-multi", "a"),
        ("x-multi", "b"),
    )


def test_header_lookup_ignores_case_and_joins_repeated_fields() -> None:
    request = parse_request(HEAD)
    assert request.header("UPGRADE") == "websocket"
    assert request.header("x-multi") == "a, b"
    assert request.headers_all("X-Multi") == ["a", "b"]
    assert request.header("absent") is None
    assert request.headers_all("absent") == []


def test_the_head_may_be_given_without_its_final_empty_line() -> None:
    assert parse_request(HEAD[:-4]).headers == parse_request(HEAD).headers


def test_the_repr_never_shows_the_target_which_may_hold_a_token_or_body() -> None:
    request = parse_request(b"GET /ws/generic/a.b/SECRET?body=BODY HTTP/1.1\r\nHost: h\r\n\r\n")
    assert "SECRET" not in repr(request)
    assert "BODY" not in repr(request)


@pytest.mark.parametrize(
    ("head", "reason"),
    [
        (b"GET /\r\n\r\n", "malformed request line"),
        (b"GET  / HTTP/1.1\r\n\r\n", "malformed request line"),
        (b"GET / HTTP/1.1 x\r\n\r\n", "malformed request line"),
        (b"G(T / HTTP/1.1\r\n\r\n", "malformed request method"),
        (b"GET / HTTP/2.0\r\n\r\n", "unsupported HTTP version"),
        (b"GET / http/1.1\r\n\r\n", "unsupported HTTP version"),
        (b"GET http://h/ HTTP/1.1\r\n\r\n", "malformed request target"),
        (b"GET * HTTP/1.1\r\n\r\n", "malformed request target"),
        (b"GET /a#frag HTTP/1.1\r\n\r\n", "malformed request target"),
        (b"GET /\xc3\xa9 HTTP/1.1\r\n\r\n", "malformed request target"),
        (b"GET / HTTP/1.1\r\nHost h\r\n\r\n", "malformed header field"),
        (b"GET / HTTP/1.1\r\nHost : h\r\n\r\n", "malformed header field name"),
        (b"GET / HTTP/1.1\r\nA: b\r\n fold: ed\r\n\r\n", "malformed header field name"),
        (b"GET / HTTP/1.1\r\n: empty-name\r\n\r\n", "malformed header field name"),
        (b"GET / HTTP/1.1\r\nA: b\nC: d\r\n\r\n", "invalid character in header field value"),
        (b"GET / HTTP/1.1\r\nA: b\x00c\r\n\r\n", "invalid character in header field value"),
    ],
)
def test_a_malformed_head_is_answered_400_with_a_reason(head: bytes, reason: str) -> None:
    with pytest.raises(HttpError) as caught:
        parse_request(head)
    assert (caught.value.status, caught.value.reason) == (400, reason)


def test_a_head_with_too_many_fields_is_refused() -> None:
    with pytest.raises(HttpError) as caught:
        parse_header_lines([b"a: b"] * 101)
    assert caught.value.status == 400
    assert len(parse_header_lines([b"a: b"] * 100)) == 100


def test_header_values_may_hold_obs_text_read_as_latin1() -> None:
    assert parse_header_lines([b"x: caf\xe9"]) == (("x", "caf\xe9"),)


def test_query_names_are_decoded_and_values_kept_raw_in_order() -> None:
    assert parse_query("body=a%2Bb+c&service%48ost=x.y&&flag&body=2") == [
        ("body", "a%2Bb+c"),
        ("serviceHost", "x.y"),
        ("flag", ""),
        ("body", "2"),
    ]
    assert parse_query("") == []


def test_a_query_name_that_is_not_utf8_is_a_400() -> None:
    with pytest.raises(HttpError) as caught:
        parse_query("%ff=1")
    assert caught.value.status == 400


def test_header_lists_split_on_commas_and_drop_empty_elements() -> None:
    assert split_list(["chat, superchat", " ,v2 ,"]) == ["chat", "superchat", "v2"]


@given(st.binary(max_size=300))
def test_any_bytes_either_parse_or_raise_http_error_400(head: bytes) -> None:
    try:
        request = parse_request(head)
    except HttpError as exc:
        assert exc.status == 400
    else:
        assert request.path.startswith("/")


@given(
    st.lists(
        st.tuples(
            st.from_regex(r"[A-Za-z0-9-]{1,20}", fullmatch=True),
            st.from_regex(r"[\x21-\x7e]([\x20-\x7e]{0,30}[\x21-\x7e])?", fullmatch=True),
        ),
        max_size=10,
    )
)
def test_well_formed_fields_round_trip_in_order(fields: list[tuple[str, str]]) -> None:
    head = "GET /x?a=1 HTTP/1.1\r\n" + "".join(f"{n}: {v}\r\n" for n, v in fields) + "\r\n"
    assert parse_request(head.encode()).headers == tuple((n.lower(), v) for n, v in fields)
