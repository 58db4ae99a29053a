"""The gateway's own HTTP responses, Sans-I/O: one builder for the plain-text refusals of the
upgrade and the JSON answers of ``/start``. Every response closes its connection (the gateway
serves one request per connection). Imports nothing of wsgate."""

from __future__ import annotations

import json
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

__all__ = ["http_response", "json_parts", "json_response", "plain_lines_response", "plain_response"]


def http_response(
    status: int, body: bytes, content_type: str, headers: Sequence[tuple[str, str]] = ()
) -> bytes:
    """A complete ``Connection: close`` HTTP/1.1 response."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    lines = [
        f"HTTP/1.1 {status} {phrase}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        *(f"{name}: {value}" for name, value in headers),
        "Connection: close",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + body


def plain_response(status: int, text: str) -> bytes:
    """A response with a one-line plain-text body (an upgrade's refusal)."""
    return plain_lines_response(status, [text])


def plain_lines_response(status: int, lines: Sequence[str]) -> bytes:
    """A plain-text response of one or more lines (``/readyz`` names pools' members)."""
    # Each line is one line by contract; make sure no CR/LF can split the response.
    text = "".join(" ".join(line.split()) + "\n" for line in lines)
    return http_response(status, text.encode("utf-8"), "text/plain; charset=utf-8")


def json_response(status: int, document: Any, allow: str = "POST") -> bytes:
    """``/start``'s answer (and session control's). ``Cache-Control: no-store``: a 200 holds a
    bearer token (SPEC §5). ``allow``: the ``Allow`` header of a 405."""
    headers, payload = json_parts(status, document, allow)
    return http_response(status, payload, "application/json", headers)


def json_parts(
    status: int, document: Any, allow: str = "POST"
) -> tuple[list[tuple[str, str]], bytes]:
    """``/start``'s answer as its extra headers and JSON payload (for the ASGI app too)."""
    payload = json.dumps(document, separators=(",", ":")).encode()
    headers = [("Cache-Control", "no-store")]
    if status == 405:
        headers.append(("Allow", allow))
    return headers, payload
