"""Unit tests of ``wsgate.providers``: provider paths, and the reader of a provider's opening
messages fed raw client frames, without sockets."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable

import pytest

from wsgate import providers
from wsgate.providers import PROVIDERS, Opening, OpeningError, OpeningReader, provider_of_path

from .helpers import frame
from .telephony import (
    CALL_IDS,
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    STREAM_IDS,
    media_frame,
    media_message,
    opening_frames,
    opening_messages,
)

HOST = "my-agent.my-org"
SENDS_CONNECTED = ["twilio", "telnyx", "exotel"]


def text(message: str | bytes, fin: bool = True) -> bytes:
    return frame(OP_TEXT, message.encode() if isinstance(message, str) else message, fin=fin)


def read_all(provider: str, data: bytes, **kwargs: int) -> Opening | None:
    return OpeningReader(provider, **kwargs).feed(data)


def refused(provider: str, data: bytes, **kwargs: int) -> OpeningError:
    with pytest.raises(OpeningError) as info:
        read_all(provider, data, **kwargs)
    return info.value


def feed_bytewise(reader: OpeningReader, data: bytes) -> tuple[Opening | None, int]:
    """Feed one byte at a time; the result and how many bytes were fed when it came."""
    for i in range(len(data)):
        result = reader.feed(data[i : i + 1])
        if result is not None:
            return result, i + 1
    return None, len(data)


# --------------------------------------------------------------------------------------------
# Paths


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/ws/twilio", ("twilio", None)),
        ("/ws/telnyx", ("telnyx", None)),
        ("/ws/plivo", ("plivo", None)),
        ("/ws/exotel", ("exotel", None)),
        ("/ws/twilio/abc.def", ("twilio", "abc.def")),
        ("/ws/plivo/a%2Fb%20c", ("plivo", "a/b c")),
    ],
)
def test_a_provider_path_names_its_provider_and_an_optional_decoded_token(
    path: str, expected: tuple[str, str | None]
) -> None:
    assert provider_of_path(path) == expected


@pytest.mark.parametrize(
    "path",
    [
        "/ws/generic",
        "/ws/generic/my-agent.my-org",
        "/ws",
        "/ws/",
        "/ws/twilio/",
        "/ws/twilio/tok/extra",
        "/ws/twilio//",
        "/ws/Twilio",
        "/ws/twili%6f",
        "/wsx/twilio",
        "/ws/twilio/%ff",
        "/other/ws/twilio",
    ],
)
def test_any_other_path_names_no_provider(path: str) -> None:
    assert provider_of_path(path) is None


def test_the_providers_are_the_four_of_pipecat_cloud() -> None:
    assert frozenset({"twilio", "telnyx", "plivo", "exotel"}) == PROVIDERS


# --------------------------------------------------------------------------------------------
# Real openings


@pytest.mark.parametrize("provider", sorted(PROVIDERS))
def test_each_providers_real_opening_gives_its_call_id_and_stream_id(provider: str) -> None:
    data = opening_frames(provider, service_host=HOST)
    opening = read_all(provider, data)
    assert opening == Opening(
        provider=provider,
        service_host=HOST if provider == "twilio" else None,
        call_id=CALL_IDS[provider],
        stream_id=STREAM_IDS[provider],
    )


def test_twilio_carries_the_service_host_among_its_custom_parameters() -> None:
    data = opening_frames("twilio", service_host=HOST, custom_parameters={"user": "u1"})
    opening = read_all("twilio", data)
    assert opening is not None
    assert opening.service_host == HOST


def test_a_twilio_start_without_the_service_host_parameter_gives_none() -> None:
    assert (opening := read_all("twilio", opening_frames("twilio"))) is not None
    assert opening.service_host is None


@pytest.mark.parametrize("value", [123, None, ["my-agent.my-org"], {"a": "b"}])
def test_a_twilio_service_host_that_is_not_a_string_gives_none(value: object) -> None:
    connected, start = opening_messages("twilio")
    message = json.loads(start)
    message["start"]["customParameters"]["_pipecatCloudServiceHost"] = value
    assert (opening := read_all("twilio", text(connected) + text(json.dumps(message))))
    assert opening.service_host is None


@pytest.mark.parametrize("provider", sorted(PROVIDERS))
def test_raw_is_exactly_what_was_fed_with_a_media_frame_after_the_start(provider: str) -> None:
    opening = opening_frames(provider, service_host=HOST)
    data = opening + media_frame(provider) + media_frame(provider, chunk=2)[:7]
    reader = OpeningReader(provider)
    assert reader.feed(data) is not None
    assert reader.raw == data


@pytest.mark.parametrize("provider", sorted(PROVIDERS))
def test_fed_one_byte_at_a_time_the_opening_comes_with_the_last_byte_of_start(
    provider: str,
) -> None:
    data = opening_frames(provider, service_host=HOST)
    reader = OpeningReader(provider)
    opening, fed = feed_bytewise(reader, data + media_frame(provider))
    assert opening == read_all(provider, data)
    assert fed == len(data)
    assert reader.raw == data


def test_plivo_opens_with_start_alone() -> None:
    messages = opening_messages("plivo")
    assert [json.loads(m)["event"] for m in messages] == ["start"]
    assert read_all("plivo", text(messages[0])) is not None


@pytest.mark.parametrize("provider", SENDS_CONNECTED)
def test_a_start_without_connected_is_accepted_too(provider: str) -> None:
    start = opening_messages(provider)[-1]
    opening = read_all(provider, text(start))
    assert opening is not None
    assert opening.call_id == CALL_IDS[provider]


@pytest.mark.parametrize("provider", SENDS_CONNECTED)
def test_connected_alone_needs_more_bytes(provider: str) -> None:
    reader = OpeningReader(provider)
    connected = text(opening_messages(provider)[0])
    assert reader.feed(connected) is None
    assert reader.raw == connected


def test_fragments_with_pings_and_pongs_between_them_are_accepted() -> None:
    connected, start = (m.encode() for m in opening_messages("twilio", service_host=HOST))
    data = (
        frame(OP_PING, b"keepalive")
        + text(connected)
        + frame(OP_PONG, b"")
        + frame(OP_TEXT, start[:10], fin=False)
        + frame(OP_PING, b"x" * 125)
        + frame(OP_CONTINUATION, b"", fin=False)
        + frame(OP_CONTINUATION, start[10:200], fin=False)
        + frame(OP_PONG, b"p")
        + frame(OP_CONTINUATION, start[200:], fin=True)
    )
    reader = OpeningReader("twilio")
    assert reader.feed(data) == read_all("twilio", text(connected) + text(start))
    assert reader.raw == data


def test_a_message_of_exactly_the_size_limit_is_accepted() -> None:
    start = opening_messages("plivo")[0]
    padded = start[:-1] + "," + '"pad":"' + "x" * (1000 - len(start) - 9) + '"}'
    assert len(padded.encode()) == 1000
    assert read_all("plivo", text(padded), max_message_bytes=1000) is not None
    error = refused("plivo", text(padded), max_message_bytes=999)
    assert (error.code, error.reason) == (1008, "opening message too large")


@pytest.mark.parametrize("length", [125, 126, 65535, 65536])
def test_every_payload_length_encoding_is_read(length: int) -> None:
    start = '{"event":"start","pad":""}'
    padded = start[:-2] + "x" * (length - len(start)) + '"}'
    assert len(padded) == length
    assert read_all("plivo", text(padded)) == Opening("plivo", None, None, None)


# --------------------------------------------------------------------------------------------
# Refusals

CONNECTED = opening_messages("twilio")[0]
START = opening_messages("twilio", service_host=HOST)[1]

CASES: list[tuple[str, str, Callable[[], bytes], int]] = [
    # 1008: policy
    ("binary message", "twilio", lambda: frame(OP_BINARY, b"\x00\x01"), 1008),
    (
        "binary message after connected",
        "twilio",
        lambda: text(CONNECTED) + frame(OP_BINARY, b"x"),
        1008,
    ),
    ("text message over the limit", "twilio", lambda: frame(OP_TEXT, b"", length=65537), 1008),
    (
        "fragments over the limit",
        "twilio",
        lambda: frame(OP_TEXT, b"{", fin=False) + frame(OP_CONTINUATION, b"", length=65536),
        1008,
    ),
    ("not JSON", "twilio", lambda: text("hello"), 1008),
    ("empty message", "twilio", lambda: text(""), 1008),
    ("JSON array", "twilio", lambda: text('[{"event": "start"}]'), 1008),
    ("JSON string", "twilio", lambda: text('"start"'), 1008),
    ("no event", "twilio", lambda: text('{"start": {}}'), 1008),
    ("event not a string", "twilio", lambda: text('{"event": 1}'), 1008),
    ("media first", "twilio", lambda: text('{"event": "media"}'), 1008),
    ("connected then media", "telnyx", lambda: text(CONNECTED) + text('{"event":"media"}'), 1008),
    ("connected twice", "exotel", lambda: text(CONNECTED) * 2, 1008),
    ("connected from plivo", "plivo", lambda: text(CONNECTED), 1008),
    ("invalid UTF-8", "twilio", lambda: text(b'{"event": "start", "x": "\xff"}'), 1008),
    ("UTF-8 surrogate", "twilio", lambda: text(b'{"event": "\xed\xa0\x80"}'), 1008),
    ("nesting deeper than Python parses", "twilio", lambda: text("[" * 50_000), 1008),
    # 1002: protocol
    ("unmasked frame", "twilio", lambda: frame(OP_TEXT, CONNECTED.encode(), mask=False), 1002),
    ("reserved bit 1", "twilio", lambda: frame(OP_TEXT, CONNECTED.encode(), rsv=4), 1002),
    ("reserved bit 3", "twilio", lambda: frame(OP_TEXT, CONNECTED.encode(), rsv=1), 1002),
    ("unknown data opcode", "twilio", lambda: frame(0x3, b"x"), 1002),
    ("unknown control opcode", "twilio", lambda: frame(0xB, b""), 1002),
    ("control frame over 125 bytes", "twilio", lambda: frame(OP_PING, b"", length=126), 1002),
    ("fragmented control frame", "twilio", lambda: frame(OP_PING, b"x", fin=False), 1002),
    ("continuation first", "twilio", lambda: frame(OP_CONTINUATION, b"{}"), 1002),
    (
        "new text frame inside a fragmented message",
        "twilio",
        lambda: frame(OP_TEXT, b"{", fin=False) + frame(OP_TEXT, b"}"),
        1002,
    ),
    (
        "binary frame inside a fragmented message",
        "twilio",
        lambda: frame(OP_TEXT, b"{", fin=False) + frame(OP_BINARY, b"}"),
        1002,
    ),
    ("64-bit length with its top bit set", "twilio", lambda: frame(1, b"", length=1 << 63), 1002),
    ("close with a 1-byte payload", "twilio", lambda: frame(OP_CLOSE, b"\x03"), 1002),
    ("close with a reserved code", "twilio", lambda: frame(OP_CLOSE, b"\x03\xed"), 1002),
    ("close with a non-UTF-8 reason", "twilio", lambda: frame(OP_CLOSE, b"\x03\xe8\xff"), 1002),
    # 1000: the client went away
    ("close", "twilio", lambda: frame(OP_CLOSE, b"\x03\xe8"), 1000),
    ("close without a code", "plivo", lambda: frame(OP_CLOSE, b""), 1000),
    ("close after connected", "telnyx", lambda: text(CONNECTED) + frame(OP_CLOSE, b""), 1000),
    (
        "close between fragments",
        "twilio",
        lambda: frame(OP_TEXT, b"{", fin=False) + frame(OP_CLOSE, b"\x03\xe9bye"),
        1000,
    ),
]


@pytest.mark.parametrize(
    ("provider", "make", "code"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_an_unacceptable_opening_is_refused_with_its_close_code(
    provider: str, make: Callable[[], bytes], code: int
) -> None:
    data = make()
    error = refused(provider, data)
    assert error.code == code
    assert error.reason and "\n" not in error.reason
    assert len(error.reason.encode()) <= 123  # fits a close frame with its code
    # The same verdict however the bytes are cut.
    with pytest.raises(OpeningError) as info:
        feed_bytewise(OpeningReader(provider), data)
    assert (info.value.code, info.value.reason) == (code, error.reason)


def test_more_messages_than_allowed_without_a_start_are_refused() -> None:
    data = opening_frames("twilio", service_host=HOST)
    error = refused("twilio", data, max_messages=1)
    assert (error.code, error.reason) == (1008, "no start message within the opening messages")
    assert read_all("twilio", data, max_messages=2) is not None


def test_an_oversized_message_is_refused_from_its_header_alone() -> None:
    header = frame(OP_TEXT, b"", length=70_000)
    reader = OpeningReader("twilio")
    with pytest.raises(OpeningError) as info:
        reader.feed(header)
    assert (info.value.code, info.value.reason) == (1008, "opening message too large")


def test_an_endless_message_is_refused_from_its_header() -> None:
    # Declares 4 EiB; nothing of the payload is ever sent.
    error = refused("twilio", frame(OP_TEXT, b"", length=1 << 62))
    assert (error.code, error.reason) == (1008, "opening message too large")


def test_an_endless_stream_of_fragments_is_refused_with_flat_memory() -> None:
    reader = OpeningReader("twilio", max_message_bytes=65536)
    chunk = frame(OP_CONTINUATION, b"x" * 1000, fin=False)
    with pytest.raises(OpeningError) as info:
        reader.feed(frame(OP_TEXT, b"{", fin=False))
        for _ in range(1_000_000):
            reader.feed(chunk)
    assert (info.value.code, info.value.reason) == (
        1008,
        "too many frames before the start message",
    )
    assert len(reader.raw) < 70_000 + len(chunk)


def test_ten_thousand_connected_messages_are_refused_early() -> None:
    data = text(CONNECTED) * 10_000
    reader = OpeningReader("twilio")
    fed = 0
    with pytest.raises(OpeningError) as info:
        for i in range(0, len(data), 4096):
            fed += 1
            reader.feed(data[i : i + 4096])
    assert (info.value.code, info.value.reason) == (1008, "unexpected message in a twilio opening")
    assert fed == 1
    assert len(reader.raw) <= 4096


def test_an_endless_stream_of_pings_is_refused_early() -> None:
    ping = frame(OP_PING, b"x" * 125)
    reader = OpeningReader("twilio")
    with pytest.raises(OpeningError) as info:
        for _ in range(10_000):
            reader.feed(ping)
    assert (info.value.code, info.value.reason) == (
        1008,
        "too many frames before the start message",
    )
    assert len(reader.raw) < 100 * len(ping)


def test_an_error_is_raised_again_on_every_later_feed() -> None:
    reader = OpeningReader("twilio")
    with pytest.raises(OpeningError) as first:
        reader.feed(frame(OP_BINARY, b"x"))
    with pytest.raises(OpeningError) as again:
        reader.feed(text(START))
    assert again.value is first.value


def test_feeding_after_the_opening_is_a_caller_bug() -> None:
    reader = OpeningReader("plivo")
    assert reader.feed(opening_frames("plivo")) is not None
    with pytest.raises(RuntimeError, match="the opening has been read: relay further bytes"):
        reader.feed(media_frame("plivo"))


def test_a_reason_never_echoes_what_the_client_sent() -> None:
    secret = "tok_SECRET_abc123"
    for data in (
        text(json.dumps({"event": secret})),
        text(json.dumps({"event": "connected", secret: secret})) * 2,
        frame(OP_CLOSE, b"\x03\xe8" + secret.encode()),
    ):
        error = refused("twilio", data)
        assert secret not in error.reason
        assert secret not in str(error)


def test_an_unknown_provider_or_a_zero_limit_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown provider 'generic'"):
        OpeningReader("generic")
    at_least_1 = "max_message_bytes and max_messages must be at least 1"
    with pytest.raises(ValueError, match=at_least_1):
        OpeningReader("twilio", max_messages=0)
    with pytest.raises(ValueError, match=at_least_1):
        OpeningReader("twilio", max_message_bytes=0)


# --------------------------------------------------------------------------------------------
# Ids and the repr


@pytest.mark.parametrize(
    ("value", "kept"),
    [
        ("CA" + "a" * 126, True),
        ("CA" + "a" * 127, False),
        ("", False),
        ("CA 123", False),
        ("CA\n123", False),
        ("CA\x1b[31m", False),
        ("CAé", False),
        (12345, False),
        (None, False),
    ],
)
def test_call_and_stream_ids_are_kept_only_when_short_visible_ascii(
    value: object, kept: bool
) -> None:
    connected, start = opening_messages("twilio")
    message = json.loads(start)
    message["start"]["callSid"] = value
    message["start"]["streamSid"] = value
    message["streamSid"] = value
    opening = read_all("twilio", text(connected) + text(json.dumps(message)))
    assert opening is not None
    assert opening.call_id == (value if kept else None)
    assert opening.stream_id == (value if kept else None)


def test_a_twilio_stream_id_falls_back_to_the_top_level_stream_sid() -> None:
    message = json.loads(opening_messages("twilio")[1])
    del message["start"]["streamSid"]
    assert (opening := read_all("twilio", text(json.dumps(message))))
    assert opening.stream_id == STREAM_IDS["twilio"]


def test_a_start_without_ids_still_opens_with_none() -> None:
    for provider in sorted(PROVIDERS):
        opening = read_all(provider, text('{"event": "start"}'))
        assert opening == Opening(provider, None, None, None)
        opening = read_all(provider, text('{"event": "start", "start": "not an object"}'))
        assert opening == Opening(provider, None, None, None)


def test_the_repr_of_an_opening_hides_custom_parameters() -> None:
    secret = "tok_SECRET_abc123"
    data = opening_frames("twilio", service_host=HOST, custom_parameters={"token": secret})
    opening = read_all("twilio", data)
    assert opening is not None
    assert opening.service_host == HOST
    shown = repr(opening) + str(opening)
    assert secret not in shown
    assert HOST not in shown
    assert CALL_IDS["twilio"] in shown


# --------------------------------------------------------------------------------------------
# Incremental parsing


def test_each_byte_is_unmasked_once_and_each_message_parsed_once_however_it_is_fed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A 60 KiB start: re-parsing on every 1-byte feed would unmask ~1.8 GB here.
    unmasked: list[int] = []
    parsed: list[int] = []
    unmask, loads = providers._unmask, json.loads

    def counting_unmask(data: bytes | bytearray, key: bytes) -> bytes:
        unmasked.append(len(data))
        return unmask(data, key)

    def counting_loads(s: str) -> object:
        parsed.append(len(s))
        return loads(s)

    monkeypatch.setattr(providers, "_unmask", counting_unmask)
    monkeypatch.setattr(json, "loads", counting_loads)
    connected, start = opening_messages("twilio", custom_parameters={"pad": "x" * 60_000})
    data = text(connected) + text(start)
    opening, fed = feed_bytewise(OpeningReader("twilio"), data)
    assert opening is not None
    assert fed == len(data)
    assert sum(unmasked) == len(connected) + len(start)
    assert parsed == [len(connected), len(start)]


# --------------------------------------------------------------------------------------------
# The test material against Pipecat's own parser


@pytest.mark.parametrize("provider", sorted(PROVIDERS))
def test_pipecat_reads_the_same_ids_from_these_openings(provider: str) -> None:
    utils = pytest.importorskip("pipecat.runner.utils", reason="needs the pipecat extra")

    class Socket:
        """What ``parse_telephony_websocket`` uses of a Starlette WebSocket."""

        def iter_text(self) -> AsyncIterator[str]:
            async def messages() -> AsyncIterator[str]:
                for message in [*opening_messages(provider), media_message(provider)]:
                    yield message

            return messages()

    kind, call_data = asyncio.run(utils.parse_telephony_websocket(Socket()))
    opening = read_all(provider, opening_frames(provider))
    assert opening is not None
    assert kind == provider
    assert (call_data["call_id"], call_data["stream_id"]) == (opening.call_id, opening.stream_id)
