"""Parsing of an HTTP/1.1 request head (RFC 9112) into a :class:`Request`, without I/O.

The parser is strict where leniency would let two readers disagree about a request (bare LF,
whitespace before a colon, obsolete line folding): those are answered with 400. It never raises
anything but :class:`~wsgate.errors.HttpError`. Size limits are the caller's business: the server
stops reading at ``_core.MAX_HEADER_BYTES`` before this parser sees the head.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import unquote

from .errors import HttpError

__all__ = [
    "Request",
    "bearer",
    "is_token",
    "parse_header_lines",
    "parse_query",
    "parse_request",
    "split_list",
]

# RFC 9110 §5.6.2 token: the characters allowed in a method and a header name.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TOKEN_STR = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# A field value: visible ASCII, obs-text, space and tab; no other control characters.
_FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
# origin-form request target (RFC 9112 §3.2.1): visible ASCII, starting with "/".
_ORIGIN_FORM = re.compile(rb"/[\x21-\x7e]*")
_VERSION = re.compile(rb"HTTP/1\.[01]")
_MAX_HEADERS = 100


@dataclass(frozen=True, repr=False)
class Request:
    """A parsed request head.

    ``path`` and ``query`` are the raw (still percent-encoded) parts of ``target``; ``headers``
    keeps every field in order with its name lower-cased.
    """

    method: str
    target: str
    path: str
    query: str
    version: str
    headers: tuple[tuple[str, str], ...]

    def header(self, name: str) -> str | None:
        """The value of header ``name``; repeated fields joined with ``", "`` (RFC 9110 §5.3)."""
        values = self.headers_all(name)
        return ", ".join(values) if values else None

    def headers_all(self, name: str) -> list[str]:
        """Every value of header ``name``, in order of appearance."""
        return list(self._by_name.get(name.lower(), ()))

    @functools.cached_property
    def _by_name(self) -> dict[str, list[str]]:
        # An upgrade's checks ask for eight headers: one pass over the fields, not eight.
        fields: dict[str, list[str]] = {}
        for field, value in self.headers:
            fields.setdefault(field, []).append(value)
        return fields

    def query_params(self) -> list[tuple[str, str]]:
        """The query as ``(decoded name, raw value)`` pairs, in order (see :func:`parse_query`)."""
        return parse_query(self.query)

    def __repr__(self) -> str:
        # The target may hold a token or a body: never print it.
        return (
            f"<Request {self.method} {len(self.target)}-byte target, {len(self.headers)} headers>"
        )


def parse_request(head: bytes) -> Request:
    """Parse a request head: the request line and header fields, ending with an empty line.

    The final ``b"\\r\\n\\r\\n"`` may be included or not. Raises ``HttpError(400, reason)``.
    """
    if head.endswith(b"\r\n\r\n"):
        head = head[:-4]
    lines = head.split(b"\r\n")
    method, target, path, query, version = _parse_request_line(lines[0])
    return Request(method, target, path, query, version, parse_header_lines(lines[1:]))


def _parse_request_line(line: bytes) -> tuple[str, str, str, str, str]:
    parts = line.split(b" ")
    if len(parts) != 3:
        raise HttpError(400, "malformed request line")
    method, target, version = parts
    if not _TOKEN.fullmatch(method):
        raise HttpError(400, "malformed request method")
    if not _VERSION.fullmatch(version):
        raise HttpError(400, "unsupported HTTP version")
    if not _ORIGIN_FORM.fullmatch(target) or b"#" in target:
        raise HttpError(400, "malformed request target")
    text = target.decode("ascii")
    path, _, query = text.partition("?")
    return method.decode("ascii"), text, path, query, version.decode("ascii")


def parse_header_lines(lines: Sequence[bytes]) -> tuple[tuple[str, str], ...]:
    """Parse header field lines (without their CRLF) into ``(lower-cased name, value)`` pairs.

    Shared by the client's request and the upstream bot's response. Raises ``HttpError(400)``.
    """
    if len(lines) > _MAX_HEADERS:
        raise HttpError(400, "too many header fields")
    fields: list[tuple[str, str]] = []
    for line in lines:
        name, colon, value = line.partition(b":")
        if not colon:
            raise HttpError(400, "malformed header field")
        if not _TOKEN.fullmatch(name):
            # Also catches "Name :" and a line starting with whitespace (obsolete folding).
            raise HttpError(400, "malformed header field name")
        if not _FIELD_VALUE.fullmatch(value):
            raise HttpError(400, "invalid character in header field value")
        fields.append((name.decode("ascii").lower(), value.strip(b" \t").decode("latin-1")))
    return tuple(fields)


def parse_query(query: str) -> list[tuple[str, str]]:
    """Split a raw query string into ``(name, value)`` pairs, in order.

    Names are percent-decoded; values are returned exactly as they appear in the target, because
    their decoding depends on the parameter (``body`` is decoded by the Rust core, which also
    reads a space as ``+``). Empty pieces (``a=1&&b=2``) are skipped; ``flag`` gives
    ``("flag", "")``.
    """
    pairs: list[tuple[str, str]] = []
    for piece in query.split("&"):
        if not piece:
            continue
        name, _, value = piece.partition("=")
        try:
            pairs.append((unquote(name, errors="strict"), value))
        except UnicodeDecodeError:
            raise HttpError(400, "malformed query string") from None
    return pairs


def split_list(values: Sequence[str]) -> list[str]:
    """Split comma-separated header values (RFC 9110 §5.6.1) into their non-empty elements."""
    items: list[str] = []
    for value in values:
        items.extend(item.strip(" \t") for item in value.split(","))
    return [item for item in items if item]


def is_token(value: str) -> bool:
    """Whether ``value`` is an RFC 9110 token (a valid subprotocol or header name)."""
    return _TOKEN_STR.fullmatch(value) is not None


def bearer(headers: Sequence[tuple[str, str]]) -> str | None:
    """The credentials of the one ``Authorization: Bearer …`` header among ``headers``
    (``(lower-cased name, value)`` pairs); None when there is none, more than one, or another
    scheme (``/start``'s keys and the session control's)."""
    values = [value for name, value in headers if name == "authorization"]
    if len(values) != 1:
        return None
    scheme, _, credentials = values[0].strip().partition(" ")
    credentials = credentials.strip()
    if scheme.lower() != "bearer" or not credentials:
        return None
    return credentials
