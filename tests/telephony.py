"""What telephony providers send on their media-stream WebSockets, as test material: the opening
messages of Twilio, Telnyx, Plivo and Exotel exactly as each sends them (compact JSON text), a
media message in each one's shape, and the masked client frames that carry them
(:func:`tests.helpers.frame` encodes them).

Field sets follow the providers' documentation and what Pipecat reads
(``pipecat/runner/utils.py``, ``parse_telephony_websocket``):

- Twilio: ``connected`` (``protocol``, ``version``), then ``start`` with ``start.streamSid``,
  ``start.callSid``, ``start.customParameters`` (the service host as ``_pipecatCloudServiceHost``,
  since Twilio drops the stream URL's query) and a top-level ``streamSid``.
- Telnyx: ``connected``, then ``start`` with a top-level ``stream_id`` and
  ``start.call_control_id``, ``start.media_format``.
- Plivo: ``start`` alone, with ``start.streamId`` and ``start.callId``.
- Exotel: ``connected``, then ``start`` with ``start.stream_sid``, ``start.call_sid``,
  ``start.account_sid`` (and a top-level ``stream_sid``).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from .helpers import frame

__all__ = [
    "CALL_IDS",
    "MULAW_SILENCE",
    "OP_BINARY",
    "OP_CLOSE",
    "OP_CONTINUATION",
    "OP_PING",
    "OP_PONG",
    "OP_TEXT",
    "PROVIDERS",
    "SLIN_SILENCE",
    "STREAM_IDS",
    "media_frame",
    "media_message",
    "opening_frames",
    "opening_messages",
    "provider_target",
]

PROVIDERS = ("twilio", "telnyx", "plivo", "exotel")
OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

# Each provider's ids, in its own format.
CALL_IDS = {
    "twilio": "CA5f9e8d7c6b5a49382716f5e4d3c2b1a0",
    "telnyx": "v3:MdI91X4lWFEs7IgbBEOT9M4AigoY08M0WWZFISt1Yw2axZ_IiE4pqg",
    "plivo": "12345678-1234-1234-1234-123456789abc",
    "exotel": "b6a1e6c0f2d94bd0a9a5c2f1e8d7c6b5",
}
STREAM_IDS = {
    "twilio": "MZ18ad3ab5a668481ce02b83e7395059f0",
    "telnyx": "32de0dea-53cb-4b21-89a4-9e1819c043bc",
    "plivo": "87654321-4321-4321-4321-cba987654321",
    "exotel": "c3e1b0f6a9d84f7e8b2d1c0a9f8e7d6c",
}
_ACCOUNTS = {
    "twilio": "AC0123456789abcdef0123456789abcdef",
    "telnyx": "3e6f995f-85f7-4705-9741-53b116d28237",
    "plivo": "MAXXXXXXXXXXXXXXXXXX",
    "exotel": "exotel-demo-account",
}
_FROM, _TO = "+15551230001", "+15559870002"

#: 20 ms of 8 kHz μ-law silence: what Twilio, Telnyx (PCMU) and Plivo send per media message.
MULAW_SILENCE = b"\xff" * 160
#: 20 ms of 8 kHz 16-bit little-endian PCM silence: Exotel streams raw/slin, not μ-law.
SLIN_SILENCE = b"\0" * 320


def _json(message: Mapping[str, Any]) -> str:
    return json.dumps(message, separators=(",", ":"))


def opening_messages(
    provider: str,
    *,
    service_host: str | None = None,
    call_id: str | None = None,
    stream_id: str | None = None,
    custom_parameters: Mapping[str, str] | None = None,
) -> list[str]:
    """The text messages ``provider`` sends first, in order: ``connected`` then ``start``
    (Plivo: ``start`` alone).

    ``call_id``/``stream_id`` default to :data:`CALL_IDS`/:data:`STREAM_IDS`. ``service_host``
    and ``custom_parameters`` become Twilio's ``start.customParameters`` (with the host as
    ``_pipecatCloudServiceHost``); the other providers name the host in the URL
    (:func:`provider_target`) and ignore it here. Exotel's custom parameters go into
    ``start.custom_parameters``, Telnyx's into ``start.custom_parameters`` too.
    """
    call = CALL_IDS[provider] if call_id is None else call_id
    stream = STREAM_IDS[provider] if stream_id is None else stream_id
    params = dict(custom_parameters or {})
    account = _ACCOUNTS[provider]
    if provider == "twilio":
        if service_host is not None:
            params["_pipecatCloudServiceHost"] = service_host
        return [
            _json({"event": "connected", "protocol": "Call", "version": "1.0.0"}),
            _json(
                {
                    "event": "start",
                    "sequenceNumber": "1",
                    "start": {
                        "accountSid": account,
                        "streamSid": stream,
                        "callSid": call,
                        "tracks": ["inbound"],
                        "mediaFormat": {
                            "encoding": "audio/x-mulaw",
                            "sampleRate": 8000,
                            "channels": 1,
                        },
                        "customParameters": params,
                    },
                    "streamSid": stream,
                }
            ),
        ]
    if provider == "telnyx":
        return [
            _json({"event": "connected", "version": "1.0.0"}),
            _json(
                {
                    "event": "start",
                    "sequence_number": "1",
                    "start": {
                        "user_id": account,
                        "call_control_id": call,
                        "call_session_id": "ff55a038-6f5d-11ef-9692-02420aeffb1f",
                        "from": _FROM,
                        "to": _TO,
                        "tags": [],
                        "client_state": "aGF2ZSBhIG5pY2UgZGF5ID1d",
                        "custom_parameters": params,
                        "media_format": {"encoding": "PCMU", "sample_rate": 8000, "channels": 1},
                    },
                    "stream_id": stream,
                }
            ),
        ]
    if provider == "plivo":
        return [
            _json(
                {
                    "event": "start",
                    "sequenceNumber": 1,
                    "start": {
                        "callId": call,
                        "streamId": stream,
                        "accountId": account,
                        "tracks": ["inbound"],
                        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000},
                    },
                    "extra_headers": "",
                }
            )
        ]
    if provider == "exotel":
        return [
            _json({"event": "connected"}),
            _json(
                {
                    "event": "start",
                    "sequence_number": 1,
                    "stream_sid": stream,
                    "start": {
                        "stream_sid": stream,
                        "call_sid": call,
                        "account_sid": account,
                        "from": _FROM,
                        "to": _TO,
                        "custom_parameters": params,
                        "media_format": {
                            "encoding": "base64",
                            "sample_rate": "8000",
                            "bit_rate": "128kbps",
                        },
                    },
                }
            ),
        ]
    raise ValueError(f"unknown provider {provider!r}")


def media_message(
    provider: str,
    *,
    audio: bytes | None = None,
    stream_id: str | None = None,
    sequence: int = 3,
    chunk: int = 1,
) -> str:
    """One inbound media message in ``provider``'s shape, carrying ``audio`` as base64
    (default: 20 ms of silence in the provider's encoding, :data:`MULAW_SILENCE` or, for Exotel,
    :data:`SLIN_SILENCE`)."""
    stream = STREAM_IDS[provider] if stream_id is None else stream_id
    if audio is None:
        audio = SLIN_SILENCE if provider == "exotel" else MULAW_SILENCE
    payload = base64.b64encode(audio).decode("ascii")
    timestamp = str((chunk - 1) * 20)
    # Twilio and Telnyx send the chunk number and timestamp as strings.
    media = {"track": "inbound", "chunk": str(chunk), "timestamp": timestamp, "payload": payload}
    if provider == "twilio":
        return _json(
            {"event": "media", "sequenceNumber": str(sequence), "media": media, "streamSid": stream}
        )
    if provider == "telnyx":
        return _json(
            {
                "event": "media",
                "sequence_number": str(sequence),
                "media": media,
                "stream_id": stream,
            }
        )
    if provider == "plivo":
        return _json(
            {
                "event": "media",
                "sequenceNumber": sequence,
                "streamId": stream,
                "media": {
                    "track": "inbound",
                    "timestamp": timestamp,
                    "chunk": chunk,
                    "payload": payload,
                },
                "extra_headers": "",
            }
        )
    if provider == "exotel":
        return _json(
            {
                "event": "media",
                "sequence_number": sequence,
                "stream_sid": stream,
                "media": {"chunk": chunk, "timestamp": timestamp, "payload": payload},
            }
        )
    raise ValueError(f"unknown provider {provider!r}")


def opening_frames(provider: str, **kwargs: Any) -> bytes:
    """:func:`opening_messages` as the client's frame bytes, one text frame per message."""
    return b"".join(frame(OP_TEXT, m.encode()) for m in opening_messages(provider, **kwargs))


def media_frame(provider: str, **kwargs: Any) -> bytes:
    """:func:`media_message` as one masked text frame."""
    return frame(OP_TEXT, media_message(provider, **kwargs).encode())


def provider_target(provider: str, service_host: str, token: str | None = None) -> str:
    """The request target a provider dials: ``/ws/{provider}[/{token}]``, plus
    ``?serviceHost=`` for every provider but Twilio (which drops a stream URL's query, so the
    host travels in ``start.customParameters`` instead)."""
    target = f"/ws/{provider}"
    if token is not None:
        target += "/" + quote(token, safe="")
    if provider != "twilio":
        target += "?serviceHost=" + quote(service_host, safe="")
    return target
