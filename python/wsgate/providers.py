"""The telephony provider endpoints of SPEC §6b (``/ws/twilio``, ``/ws/telnyx``, ``/ws/plivo``,
``/ws/exotel``), without I/O: which provider a path names, and :class:`OpeningReader`, which reads
the messages a provider sends right after the upgrade (``connected``, then ``start``) from the
client's raw frame bytes.

Twilio cannot put the service host in its stream URL, so it arrives in the ``start`` message
(``start.customParameters._pipecatCloudServiceHost``) and the gateway must read that far before it
can route. The reader judges every limit from frame headers, before a payload is buffered, and
keeps every byte it was fed: the gateway forwards them to the bot unchanged, so a bot that parses
the opening itself (Pipecat's ``parse_telephony_websocket``) sees what the provider sent. Field
names follow what Pipecat reads (``pipecat/runner/utils.py``). Nothing here logs.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from .errors import HttpError, OpeningError

__all__ = [
    "PROVIDERS",
    "Opening",
    "OpeningError",
    "OpeningReader",
    "close_for",
    "provider_of_path",
]

PROVIDERS: frozenset[str] = frozenset({"twilio", "telnyx", "plivo", "exotel"})
# Providers that send {"event": "connected"} before "start"; Plivo sends "start" alone.
_SENDS_CONNECTED = frozenset({"twilio", "telnyx", "exotel"})

# Call and stream ids end up in log lines: visible ASCII only, and short.
_ID = re.compile(r"[\x21-\x7e]{1,128}")
# Frames of any kind (fragments, pings, pongs) allowed before "start". Real providers send two;
# the cap, with the message size limit, bounds the bytes held: 1-byte fragments or a stream of
# pings must not cost more than a few KiB of headers.
_MAX_FRAMES = 64
_MAX_CONTROL_PAYLOAD = 125  # RFC 6455 §5.5

_CONTINUATION, _TEXT, _BINARY, _CLOSE, _PING, _PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_OPCODES = frozenset({_CONTINUATION, _TEXT, _BINARY, _CLOSE, _PING, _PONG})


def provider_of_path(path: str) -> tuple[str, str | None] | None:
    """``/ws/{provider}`` -> ``(provider, None)``; ``/ws/{provider}/{token}`` -> ``(provider,
    token)`` with the token percent-decoded; any other path (or an empty or undecodable token
    segment) -> None.
    """
    if not path.startswith("/ws/"):
        return None
    segments = path[len("/ws/") :].split("/")
    if segments[0] not in PROVIDERS or len(segments) > 2:
        return None
    if len(segments) == 1:
        return segments[0], None
    if not segments[1]:
        return None
    try:
        token = unquote(segments[1], errors="strict")
    except UnicodeDecodeError:
        return None
    return segments[0], token


def close_for(error: HttpError) -> tuple[int, str]:
    """The close frame that answers, after the upgrade, a refusal that would have been an HTTP
    status before it (Twilio's route is known only then): 1013 for capacity (429, 503), 1011
    when the bot cannot be reached (502, 504) or for any other 5xx, 1008 for the rest (a
    missing, malformed or unknown service host, a bad token or body)."""
    if error.status in (429, 503):
        return 1013, error.reason
    if error.status >= 500:
        return 1011, error.reason
    return 1008, error.reason


@dataclass(frozen=True)
class Opening:
    """What the gateway needs from a provider's opening messages."""

    provider: str
    #: Twilio: ``start.customParameters._pipecatCloudServiceHost`` when a string, else None (it
    #: is a custom parameter, and those may hold tokens: not in the repr). Other providers: None,
    #: their service host is in the URL.
    service_host: str | None = field(repr=False)
    #: The provider's call id, when present, at most 128 visible ASCII characters; else None.
    call_id: str | None
    #: The provider's stream id, bounded like ``call_id``.
    stream_id: str | None


def _fixed_id(value: object) -> str | None:
    if isinstance(value, str) and _ID.fullmatch(value):
        return value
    return None


def _object(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _opening_of(provider: str, message: dict[str, Any]) -> Opening:
    """Read the ids (and Twilio's service host) from a ``start`` message, as Pipecat's
    ``parse_telephony_websocket`` does; a field that is missing or malformed is None.
    """
    start = _object(message.get("start"))
    service_host: str | None = None
    if provider == "twilio":
        host = _object(start.get("customParameters")).get("_pipecatCloudServiceHost")
        service_host = host if isinstance(host, str) else None
        call_id = _fixed_id(start.get("callSid"))
        stream_id = _fixed_id(start.get("streamSid")) or _fixed_id(message.get("streamSid"))
    elif provider == "telnyx":
        call_id = _fixed_id(start.get("call_control_id"))
        stream_id = _fixed_id(message.get("stream_id"))
    elif provider == "plivo":
        call_id = _fixed_id(start.get("callId"))
        stream_id = _fixed_id(start.get("streamId")) or _fixed_id(message.get("streamId"))
    else:  # exotel
        call_id = _fixed_id(start.get("call_sid"))
        stream_id = _fixed_id(start.get("stream_sid")) or _fixed_id(message.get("stream_sid"))
    return Opening(provider, service_host, call_id, stream_id)


def _unmask(data: bytes | bytearray, key: bytes) -> bytes:
    # One big-integer XOR: linear, and far faster than a byte loop for a 64 KiB message.
    n = len(data)
    if n == 0:
        return b""
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")


@dataclass
class _Frame:
    """A frame whose header has been read and accepted; its payload may still be arriving."""

    opcode: int
    fin: bool
    key: bytes
    start: int  # offset of the payload in the raw bytes
    length: int


class OpeningReader:
    """Reads a provider's opening from the client's frames (RFC 6455, masked), Sans-I/O.

    Feed it every byte received after the upgrade, in order; :meth:`feed` returns the
    :class:`Opening` once the ``start`` message is complete, None while more bytes are needed,
    and raises :class:`OpeningError` as soon as the bytes cannot be an acceptable opening:

    - 1002: a protocol violation (unmasked frame, reserved bits, unknown opcode, a control frame
      over 125 bytes or fragmented, a continuation without a message, a new message inside a
      fragmented one, a 64-bit length with its top bit set, an invalid close payload);
    - 1008: a binary message, a text message over ``max_message_bytes`` (judged from headers,
      summed over fragments), more than ``max_messages`` messages or ``_MAX_FRAMES`` frames
      without a ``start``, a message that is not UTF-8, not a JSON object or without an
      ``"event"``, or an event the provider does not open with;
    - 1000: the client closed.

    Ping and pong frames may come between messages and fragments; they are kept like every other
    byte. Parsing is incremental: each fed byte is looked at a bounded number of times, and the
    bytes held before ``start`` are bounded by the limits above plus one ``feed``'s worth.
    """

    def __init__(
        self, provider: str, *, max_message_bytes: int = 65536, max_messages: int = 2
    ) -> None:
        if provider not in PROVIDERS:
            raise ValueError(f"unknown provider {provider!r}")
        if max_message_bytes < 1 or max_messages < 1:
            raise ValueError("max_message_bytes and max_messages must be at least 1")
        self._provider = provider
        self._max_message_bytes = max_message_bytes
        self._max_messages = max_messages
        self._raw = bytearray()
        self._pos = 0  # offset of the first byte not yet parsed
        self._frame: _Frame | None = None  # header read, payload pending
        self._frames = 0
        self._messages = 0  # data messages begun
        self._message: bytearray | None = None  # text message being assembled, if any
        self._message_size = 0  # declared so far, over its fragments
        self._connected = False
        self._opening: Opening | None = None
        self._error: OpeningError | None = None

    @property
    def raw(self) -> bytes:
        """Every byte fed so far, unchanged, including any after the ``start`` message."""
        return bytes(self._raw)

    def feed(self, data: bytes) -> Opening | None:
        """Take the next bytes from the client; see the class docstring.

        After an :class:`OpeningError` every further call raises it again; after the opening has
        been returned, feeding more is a caller bug (``RuntimeError``): relay instead.
        """
        if self._error is not None:
            raise self._error
        if self._opening is not None:
            raise RuntimeError("the opening has been read: relay further bytes instead")
        self._raw += data
        try:
            return self._parse()
        except OpeningError as exc:
            self._error = exc
            raise

    def _parse(self) -> Opening | None:
        while True:
            if self._frame is None:
                self._frame = self._read_header()
                if self._frame is None:
                    return None
            frame = self._frame
            end = frame.start + frame.length
            if len(self._raw) < end:
                return None
            self._frame = None
            self._pos = end
            opening = self._complete(frame)
            if opening is not None:
                self._opening = opening
                return opening

    def _read_header(self) -> _Frame | None:
        """Parse and judge the header at ``_pos``; None if it has not fully arrived."""
        buf, pos = self._raw, self._pos
        available = len(buf) - pos
        if available < 2:
            return None
        b0, b1 = buf[pos], buf[pos + 1]
        # Checks in the order the Rust core makes them (rust/frame.rs), so both hops agree.
        if b0 & 0x70:
            raise OpeningError(1002, "reserved bits set")
        opcode, fin = b0 & 0x0F, bool(b0 & 0x80)
        if opcode not in _OPCODES:
            raise OpeningError(1002, "unknown opcode")
        if not b1 & 0x80:
            raise OpeningError(1002, "unmasked client frame")
        length, size = b1 & 0x7F, 2
        if length == 126:
            size = 4
            if available < size:
                return None
            length = int.from_bytes(buf[pos + 2 : pos + 4], "big")
        elif length == 127:
            size = 10
            if available < size:
                return None
            length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
            if length >> 63:
                raise OpeningError(1002, "invalid frame length")
        if opcode >= _CLOSE:
            if not fin:
                raise OpeningError(1002, "fragmented control frame")
            if length > _MAX_CONTROL_PAYLOAD:
                raise OpeningError(1002, "control frame too long")
        elif opcode == _CONTINUATION:
            if self._message is None:
                raise OpeningError(1002, "continuation without a message")
        elif self._message is not None:
            raise OpeningError(1002, "new message inside a fragmented one")
        if available < size + 4:
            return None
        self._judge(opcode, length)
        key = bytes(buf[pos + size : pos + size + 4])
        return _Frame(opcode, fin, key, pos + size + 4, length)

    def _judge(self, opcode: int, length: int) -> None:
        """The policy limits, judged from a complete, well-formed header."""
        self._frames += 1
        if self._frames > _MAX_FRAMES:
            raise OpeningError(1008, "too many frames before the start message")
        if opcode == _BINARY:
            raise OpeningError(1008, "binary message before the start message")
        if opcode == _TEXT:
            self._messages += 1
            if self._messages > self._max_messages:
                raise OpeningError(1008, "no start message within the opening messages")
            self._message = bytearray()
            self._message_size = 0
        if opcode in (_TEXT, _CONTINUATION):
            self._message_size += length
            if self._message_size > self._max_message_bytes:
                raise OpeningError(1008, "opening message too large")

    def _complete(self, frame: _Frame) -> Opening | None:
        """Act on a frame whose payload has fully arrived."""
        if frame.opcode in (_PING, _PONG):
            return None  # kept in the raw bytes, passed on with them
        payload = _unmask(self._raw[frame.start : frame.start + frame.length], frame.key)
        if frame.opcode == _CLOSE:
            _check_close(payload)
            raise OpeningError(1000, "client closed during the opening")
        assert self._message is not None  # a data frame: _read_header opened the message
        self._message += payload
        if not frame.fin:
            return None
        text, self._message = bytes(self._message), None
        return self._on_message(text)

    def _on_message(self, data: bytes) -> Opening | None:
        try:
            message = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError:
            raise OpeningError(1008, "opening message is not valid UTF-8") from None
        except (ValueError, RecursionError):
            # RecursionError: json.loads on nesting deeper than the interpreter's limit.
            raise OpeningError(1008, "opening message is not JSON") from None
        if not isinstance(message, dict):
            raise OpeningError(1008, "opening message is not a JSON object")
        event = message.get("event")
        if not isinstance(event, str):
            raise OpeningError(1008, "opening message has no event")
        if event == "start":
            return _opening_of(self._provider, message)
        if event == "connected" and self._provider in _SENDS_CONNECTED and not self._connected:
            self._connected = True
            return None
        raise OpeningError(1008, f"unexpected message in a {self._provider} opening")


def _check_close(payload: bytes) -> None:
    """RFC 6455 §5.5.1, §7.4: empty, or a valid code and a UTF-8 reason (as rust/frame.rs)."""
    if not payload:
        return
    if len(payload) == 1:
        raise OpeningError(1002, "invalid close frame")
    code = int.from_bytes(payload[:2], "big")
    if not (1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999):
        raise OpeningError(1002, "invalid close frame")
    try:
        payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise OpeningError(1002, "invalid close frame") from None
