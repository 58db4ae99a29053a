"""A Session API request's body, Sans-I/O: its framing (``Content-Length`` or ``chunked``) and a
decoder of chunked bodies, every limit judged before the bytes it guards are held.

The gateway reads a Session API body whole, at most ``limit`` bytes (``/start``'s), before the
bot is dialled: a body over the limit or too slow (``handshake_timeout``) is answered by the
gateway and never reaches the bot. A chunked body goes on to the bot with a ``Content-Length``
of its decoded size, so the bot sees one unambiguous framing.

| framing | answer |
| --- | --- |
| ``Content-Length`` not ``1*DIGIT``, or repeated with other values | 400 |
| ``Content-Length`` over the limit | 413, before a byte of the body is read |
| ``Transfer-Encoding`` other than exactly ``chunked`` | 501 |
| both ``Transfer-Encoding`` and ``Content-Length`` (RFC 9112 §6.3: a smuggling sign) | 400 |
| a chunk size that is not hex, a line without CRLF, no CRLF after a chunk's data | 400 |
| chunks whose data pass the limit | 413, as soon as a chunk's size says so |
| framing (size lines, extensions, trailers) over :data:`MAX_FRAMING_BYTES` | 413 |
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import HttpError

__all__ = ["MAX_FRAMING_BYTES", "ChunkedBody", "body_framing"]

#: The most bytes of chunked framing (size lines with their extensions, CRLFs, trailer fields)
#: taken beside a body's data: a body of 64 KiB in chunks of 16 bytes needs about 32 KiB.
MAX_FRAMING_BYTES = 64 * 1024
# Longest chunk size line or trailer line; longer is refused before more is buffered.
_MAX_LINE = 4096
_HEX = frozenset(b"0123456789abcdefABCDEF")


def body_framing(headers: Sequence[tuple[str, str]], limit: int) -> int | None:
    """The body's length from the request's framing headers (0 without any), or None for a
    chunked body. Raises ``HttpError`` as the table in this module's docstring says."""
    codings = [value for name, value in headers if name == "transfer-encoding"]
    lengths = {value.strip() for name, value in headers if name == "content-length"}
    if codings:
        if lengths:
            raise HttpError(400, "both Transfer-Encoding and Content-Length")
        if [c.strip().lower() for c in codings] != ["chunked"]:
            raise HttpError(501, "Transfer-Encoding other than chunked is not supported")
        return None
    if not lengths:
        return 0
    if len(lengths) > 1:
        raise HttpError(400, "bad Content-Length")
    (text,) = lengths
    if not (text.isascii() and text.isdigit()):
        raise HttpError(400, "bad Content-Length")
    # Judged by its digits before int(): a 10,000-digit length costs nothing to refuse.
    if len(text.lstrip("0")) > len(str(limit)) or int(text) > limit:
        raise HttpError(413, "Request too large")
    return int(text)


class ChunkedBody:
    """Decodes a chunked body (RFC 9112 §7.1) fed as it arrives: :meth:`feed` returns the
    whole body once its last chunk and trailer section are in. Chunk extensions and trailer
    fields are read and dropped; bytes past the body's end are ignored (one request per
    connection)."""

    __slots__ = ("_body", "_buf", "_framing", "_left", "_limit", "_state")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._buf = bytearray()
        self._body = bytearray()
        self._state = "size"  # size, data, data-end, trailer
        self._left = 0
        self._framing = 0

    def feed(self, data: bytes) -> bytes | None:
        """Take the next bytes; the body when it is complete, else None. Raises
        ``HttpError`` (400 bad framing, 413 over a limit)."""
        self._buf += data
        while True:
            if self._state == "data":
                take = min(self._left, len(self._buf))
                self._body += self._buf[:take]
                del self._buf[:take]
                self._left -= take
                if self._left:
                    return None
                self._state = "data-end"
            elif self._state == "data-end":
                if len(self._buf) < 2:
                    return None
                if self._buf[:2] != b"\r\n":
                    raise HttpError(400, "bad chunked body: no CRLF after a chunk")
                self._take_framing(2)
                self._state = "size"
            else:
                line = self._line()
                if line is None:
                    return None
                if self._state == "trailer":
                    if not line:
                        return bytes(self._body)
                    continue  # a trailer field: dropped
                size = _chunk_size(line)
                if size == 0:
                    self._state = "trailer"
                elif size > self._limit - len(self._body):
                    raise HttpError(413, "Request too large")
                else:
                    self._left = size
                    self._state = "data"

    def _line(self) -> bytes | None:
        """The next CRLF-ended line of framing, taken from the buffer; None until it is in."""
        end = self._buf.find(b"\r\n", 0, _MAX_LINE + 2)
        if end < 0:
            if len(self._buf) > _MAX_LINE:
                raise HttpError(400, "bad chunked body: line too long")
            return None
        line = bytes(self._buf[:end])
        self._take_framing(end + 2)
        return line

    def _take_framing(self, n: int) -> None:
        del self._buf[:n]
        self._framing += n
        if self._framing > MAX_FRAMING_BYTES:
            raise HttpError(413, "Request too large: too much chunked framing")


def _chunk_size(line: bytes) -> int:
    """A chunk size line's size (its extensions, after ``;``, ignored)."""
    text = line.split(b";", 1)[0].rstrip(b" \t")
    if not text or len(text) > 16 or not _HEX.issuperset(text):
        raise HttpError(400, "bad chunked body: bad chunk size")
    return int(text, 16)
