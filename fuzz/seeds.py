"""Writes the seed corpora under fuzz/corpus/ (standard library only): `python fuzz/seeds.py`.

Each seed is one case a reader would pick by hand: valid traffic of every kind and each rule of
RFC 6455, SPEC §3 and SPEC §4 broken once. The fuzzer's own finds go to a scratch directory
(see fuzz/README.md), so what is committed stays these few files.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import struct
from pathlib import Path

CORPUS = Path(__file__).parent / "corpus"

# frame_header: first byte picks max_message_size (choice % 6: 0, 125, 65536, 1 MiB, u64::MAX,
# or the byte itself); the rest is a frame stream, walked with and without the client mask rule.
KEY = b"\x37\xfa\x21\x3d"


def frame(
    first: int,
    payload: bytes = b"",
    *,
    masked: bool = True,
    length: int | None = None,
    ext: int | None = None,
) -> bytes:
    n = len(payload) if length is None else length
    mask_bit = 0x80 if masked else 0
    if ext is None:
        ext = 0 if n < 126 else 2 if n < 1 << 16 else 8
    if ext == 0:
        head = bytes([first, mask_bit | n])
    elif ext == 2:
        head = bytes([first, mask_bit | 126]) + struct.pack(">H", n)
    else:
        head = bytes([first, mask_bit | 127]) + struct.pack(">Q", n)
    if not masked:
        return head + payload
    body = bytes(b ^ KEY[i % 4] for i, b in enumerate(payload))
    return head + KEY + body


def close(code: int, reason: bytes = b"") -> bytes:
    return frame(0x88, struct.pack(">H", code) + reason)


FRAMES = {
    "text_masked": b"\x03" + frame(0x81, b"hello"),
    "text_unmasked": b"\x03" + frame(0x81, b"hello", masked=False),
    "binary_126": b"\x03" + frame(0x82, bytes(300)),
    "binary_127_declared": b"\x03" + frame(0x82, b"", length=1 << 33),
    "non_minimal_lengths": b"\x04" + frame(0x82, b"ab", ext=2) + frame(0x89, b"p", ext=8),
    "fragments_with_ping": b"\x03"
    + frame(0x01, b"he")
    + frame(0x89, b"ping")
    + frame(0x00, b"ll")
    + frame(0x8A, b"")
    + frame(0x80, b"o"),
    "empty_frames": b"\x00" + frame(0x81) + frame(0x02) + frame(0x80),
    "close_normal": b"\x03" + close(1000, b"bye"),
    "close_empty": b"\x03" + frame(0x88),
    "close_one_byte": b"\x03" + frame(0x88, b"\x03"),
    "close_1005": b"\x03" + close(1005),
    "close_999": b"\x03" + close(999),
    "close_4999_utf8": b"\x03" + close(4999, "é ok".encode()),
    "close_bad_utf8": b"\x03" + close(1000, b"\xc3\x28"),
    "reserved_bits": b"\x03" + frame(0xC1, b"x"),
    "unknown_opcode": b"\x03" + frame(0x83, b"x"),
    "control_too_long": b"\x03" + frame(0x89, bytes(126)),
    "control_fragmented": b"\x03" + frame(0x09, b"x"),
    "continuation_first": b"\x03" + frame(0x80, b"x"),
    "data_inside_fragments": b"\x03" + frame(0x01, b"a") + frame(0x82, b"b"),
    "length_top_bit": b"\x03" + bytes([0x82, 0xFF]) + b"\x80" + bytes(7) + KEY,
    "over_limit": b"\x01" + frame(0x82, bytes(126)),
    "fragments_over_limit": b"\x07" + frame(0x02, bytes(5)) + frame(0x80, bytes(5)),
    "truncated_header": b"\x03" + frame(0x82, bytes(300))[:5],
}

# session_stream: max_message_size as for frame_header, the direction (0 bot -> client, 1
# client -> bot, 2 client -> echo), two cuts (byte * len / 256), then the stream.
CLIENT_TRAFFIC = (
    frame(0x01, b"he")
    + frame(0x89, b"ping")
    + frame(0x00, b"ll")
    + frame(0x8A, b"")
    + frame(0x80, "o é".encode())
    + frame(0x82, bytes(range(256)) * 2)
    + frame(0x81)
)


def session(limit: int, direction: int, cuts: tuple[int, int], stream: bytes) -> bytes:
    return bytes([limit, direction, *cuts]) + stream


SESSIONS = {
    "client_to_bot": session(3, 1, (3, 200), CLIENT_TRAFFIC + close(1000, b"bye")),
    "client_to_echo": session(3, 2, (1, 128), CLIENT_TRAFFIC + close(4000) + frame(0x81, b"late")),
    "bot_to_client": session(
        3,
        0,
        (2, 250),
        frame(0x81, b"hi", masked=False)
        + frame(0x02, bytes(300), masked=False)
        + frame(0x89, b"", masked=False)
        + frame(0x80, b"!", masked=False)
        + frame(0x88, struct.pack(">H", 1001), masked=False),
    ),
    "header_cut_by_reads": session(3, 1, (1, 2), frame(0x82, bytes(300))),
    "text_not_utf8": session(3, 1, (100, 100), frame(0x81, b"ok") + frame(0x81, b"\xff\xfe")),
    "over_limit_in_fragments": session(
        7, 1, (50, 60), frame(0x02, bytes(5)) + frame(0x80, bytes(5))
    ),
    "bad_close": session(3, 2, (0, 0), frame(0x81, b"a") + frame(0x88, b"\x03")),
    "unmasked_client": session(3, 1, (0, 0), frame(0x81, b"a") + frame(0x81, b"b", masked=False)),
    "masked_server": session(3, 0, (0, 0), frame(0x81, b"a")),
    "stream_ends_mid_payload": session(4, 1, (128, 128), frame(0x82, bytes(300))[:100]),
}

# token_verify: the token verbatim, checked for my-agent.my-org at 1,800,000,000 against
# fuzz-secret-new (signs) and fuzz-secret-old.
NEW, OLD = b"fuzz-secret-new", b"fuzz-secret-old"
HOST = "my-agent.my-org"
LATER, EARLIER = 1_900_000_000, 1_700_000_000


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def signed(secret: bytes, payload: bytes) -> str:
    first = b64url(payload)
    return first + "." + b64url(hmac.new(secret, first.encode(), hashlib.sha256).digest())


def mint(secret: bytes, sh: str, exp: int, nonce: str) -> str:
    claims = {"sh": sh, "exp": exp, "nonce": nonce}
    return signed(secret, json.dumps(claims, separators=(",", ":")).encode())


GOOD = mint(NEW, HOST, LATER, "n0nce")
FIRST, MAC = GOOD.split(".")
TOKENS = {
    "valid": GOOD,
    "valid_old_secret": mint(OLD, HOST, LATER, "AAAAAAAAAAAAAAAAAAAAAA"),
    "valid_extra_fields": signed(
        NEW, b' {"iat":1,"sh":"my-agent.my-org","exp":1900000000,"nonce":"x","x":[{}]}'
    ),
    "expired": mint(NEW, HOST, EARLIER, "n"),
    "other_host": mint(NEW, "other.my-org", LATER, "n"),
    "other_secret": mint(b"someone else", HOST, LATER, "n"),
    "empty_nonce": mint(NEW, HOST, LATER, ""),
    "array_payload": signed(NEW, b'["my-agent.my-org",1900000000,"n"]'),
    "duplicate_field": signed(NEW, b'{"sh":"a.b","exp":1,"nonce":"n","sh":"a.b"}'),
    "negative_exp": signed(NEW, b'{"sh":"my-agent.my-org","exp":-1,"nonce":"n"}'),
    "padded": FIRST + "==." + MAC,
    "standard_alphabet": GOOD.replace("-", "+").replace("_", "/"),
    "two_dots": GOOD + "." + MAC,
    "no_dot": FIRST,
    "short_mac": FIRST + "." + MAC[:42],
    "empty": "",
    "overlong": mint(NEW, "h" * 2100, LATER, "n"),
}

# token_claims: the payload's JSON bytes; the harness signs them with fuzz-secret-new.
CLAIMS = {
    "valid": b'{"sh":"my-agent.my-org","exp":1900000000,"nonce":"n0nce"}',
    "valid_spaced_extra": b' { "x" : [1, {"y": null}], "nonce": "\\u00e9", "exp": 1800000001,'
    b' "sh": "my-agent.my-org", "iat": 1.5e3 } ',
    "expired": b'{"sh":"my-agent.my-org","exp":1800000000,"nonce":"n"}',
    "other_host": b'{"sh":"other.my-org","exp":1900000000,"nonce":"n"}',
    "empty_nonce": b'{"sh":"my-agent.my-org","exp":1900000000,"nonce":""}',
    "missing_exp": b'{"sh":"my-agent.my-org","nonce":"n"}',
    "float_exp": b'{"sh":"my-agent.my-org","exp":1.9e9,"nonce":"n"}',
    "negative_exp": b'{"sh":"my-agent.my-org","exp":-1,"nonce":"n"}',
    "huge_exp": b'{"sh":"my-agent.my-org","exp":18446744073709551616,"nonce":"n"}',
    "duplicate": b'{"sh":"my-agent.my-org","exp":1900000000,"nonce":"n","nonce":"m"}',
    "array": b'["my-agent.my-org",1900000000,"n"]',
    "not_utf8": b'{"sh":"my-agent.my-org","exp":1900000000,"nonce":"\xff"}',
}

# body_decode: the ?body= value exactly as in a query string.
DOC = b'{"k":"??>>~~","n":[1,2.5,null,true]} '
STD = base64.b64encode(DOC).decode()
NEAR_LIMIT = b'"' + b"a" * 4094 + b'"'
BODIES = {
    "standard": STD,
    "standard_no_pad": STD.rstrip("="),
    "url_safe": base64.urlsafe_b64encode(DOC).decode().rstrip("="),
    "space_for_plus": STD.replace("+", " "),
    "query_escaped": STD.replace("+", "%2B").replace("/", "%2F").replace("=", "%3d"),
    "every_byte_escaped": "".join(f"%{b:02X}" for b in base64.b64encode(b"[1,{}]")),
    "scalar": base64.b64encode(b"1").decode(),
    "trailing_bits": "MR==",
    "at_limit": base64.b64encode(NEAR_LIMIT).decode(),
    "over_limit": base64.b64encode(NEAR_LIMIT + b" ").decode(),
    "over_raw_bound": "%" * (3 * 5464 + 1),
    "short_padding": "e3=",
    "padding_inside": "e3=0",
    "bad_escape": "e30%zz",
    "not_json": base64.b64encode(b'{"a":1}x').decode(),
    "not_utf8": base64.b64encode(b'"\xff"').decode(),
    "one_symbol": "e",
}


# provider_opening: a cut position, then what a Twilio stream sends after its 101.
_CONNECTED = b'{"event":"connected","protocol":"Call","version":"1.0.0"}'
_START = (
    b'{"event":"start","sequenceNumber":"1","start":{"accountSid":"AC1","streamSid":"MZ1",'
    b'"callSid":"CA1","tracks":["inbound"],"customParameters":'
    b'{"_pipecatCloudServiceHost":"agent.org"}},"streamSid":"MZ1"}'
)
OPENINGS = {
    "connected_start": bytes([40]) + frame(0x81, _CONNECTED) + frame(0x81, _START),
    "start_alone": bytes([3]) + frame(0x81, _START),
    "start_then_media": bytes([90]) + frame(0x81, _START) + frame(0x81, b'{"event":"media"}'),
    "fragmented": bytes([5]) + frame(0x01, _CONNECTED[:10]) + frame(0x80, _CONNECTED[10:]),
    "ping_first": bytes([1]) + frame(0x89, b"p") + frame(0x81, _START),
    "unmasked": bytes([2]) + frame(0x81, _START, masked=False),
    "long_header": bytes([9]) + frame(0x81, _START, ext=2),
    # The top two bits pick the provider: Plivo (start alone), Exotel.
    "plivo_start": bytes([0x80 | 3])
    + frame(0x81, b'{"event":"start","start":{"callId":"1234","streamId":"8765"}}'),
    "exotel_opening": bytes([0xC0 | 10])
    + frame(0x81, b'{"event":"connected"}')
    + frame(0x81, b'{"event":"start","stream_sid":"c3","start":{"call_sid":"b6"}}'),
}


def main() -> None:
    corpora: dict[str, dict[str, bytes]] = {
        "frame_header": FRAMES,
        "session_stream": SESSIONS,
        "token_verify": {k: v.encode() for k, v in TOKENS.items()},
        "token_claims": CLAIMS,
        "body_decode": {k: v.encode() for k, v in BODIES.items()},
        "provider_opening": OPENINGS,
    }
    for target, seeds in corpora.items():
        folder = CORPUS / target
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in seeds.items():
            (folder / name).write_bytes(data)


if __name__ == "__main__":
    main()
