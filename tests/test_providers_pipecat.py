"""A real Pipecat telephony bot behind the provider endpoints (SPEC §6b): ``/ws/twilio`` and
``/ws/telnyx``, the bot hosted two ways — upstream, by Pipecat's own FastAPI/uvicorn path, and
in-process (``@gateway.bot``).

The bot is what Pipecat's telephony examples are: it reads the provider's opening itself with
Pipecat's ``parse_telephony_websocket`` (so the gateway must have forwarded it unchanged), picks
the provider's serializer from ``pipecat-ai`` (``TwilioFrameSerializer``,
``TelnyxFrameSerializer``; no auto hang-up, so no REST call is attempted) and runs a pipeline
that plays the caller's audio back. The caller sends the provider's real opening
(:mod:`tests.telephony`), then 20 ms μ-law media messages of a tone, and checks that the same
audio comes back in the provider's media messages. The pipeline runs at 8 kHz, the providers'
rate, so nothing is resampled: μ-law decoded to PCM and encoded again is the identity (but for
μ-law's "negative zero", which comes back as zero).

Pipecat runs on asyncio only, so these tests do too. Skipped unless the ``pipecat`` test extra
is installed.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest
from websockets.asyncio.client import connect

pytest.importorskip("pipecat.transports.websocket.fastapi", reason="needs the pipecat extra")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from pipecat.frames.frames import Frame, InputAudioRawFrame, OutputAudioRawFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.runner.utils import parse_telephony_websocket
from pipecat.serializers.base_serializer import FrameSerializer
from pipecat.serializers.telnyx import TelnyxFrameSerializer
from pipecat.serializers.twilio import TwilioFrameSerializer
from pipecat.transports.websocket.fastapi import (
    FastAPIWebsocketParams,
    FastAPIWebsocketTransport,
)

from wsgate import AgentConfig, Config, Gateway, GatewaySettings, OrgConfig

from .helpers import asyncio_only, run_pipeline, under_uvicorn
from .telephony import (
    CALL_IDS,
    STREAM_IDS,
    media_message,
    opening_messages,
    provider_target,
)

pytestmark = [pytest.mark.anyio, asyncio_only]  # Pipecat is built on asyncio

SERVICE_HOST = "phone.test"
RATE = 8000  # Twilio's and Telnyx's (PCMU) rate; the pipeline's too, so nothing is resampled
CHUNK = 160  # bytes of μ-law per media message: 20 ms at 8 kHz, as the providers send
MESSAGES = 24  # 480 ms of audio: whole 40 ms output chunks, so all of it comes back


# The bot.


class PlayBack(FrameProcessor):  # type: ignore[misc]
    """Plays the caller's audio back: each input audio frame becomes an output audio frame."""

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, InputAudioRawFrame):
            await self.push_frame(
                OutputAudioRawFrame(
                    audio=frame.audio,
                    sample_rate=frame.sample_rate,
                    num_channels=frame.num_channels,
                )
            )
        else:
            await self.push_frame(frame, direction)


@dataclass
class Calls:
    """What the bot saw: per call, ``(transport type, call id, stream id)`` as
    ``parse_telephony_websocket`` parsed them; and how many bot runs have ended."""

    parsed: list[tuple[str, str | None, str | None]] = field(default_factory=list)
    ended: int = 0
    changed: anyio.Event = field(default_factory=anyio.Event)

    def end(self) -> None:
        self.ended += 1
        self.changed.set()
        self.changed = anyio.Event()


def serializer_for(transport_type: str, call_data: Any) -> FrameSerializer:
    """The provider's serializer, as Pipecat's ``create_transport`` builds it, with auto hang-up
    off (it would call the provider's REST API) and dummy credentials."""
    if transport_type == "twilio":
        return TwilioFrameSerializer(
            stream_sid=call_data.stream_id,
            call_sid=call_data.call_id,
            account_sid="AC00000000000000000000000000000000",
            auth_token="not-a-real-token",
            params=TwilioFrameSerializer.InputParams(auto_hang_up=False),
        )
    if transport_type == "telnyx":
        return TelnyxFrameSerializer(
            stream_id=call_data.stream_id,
            call_control_id=call_data.call_id,
            outbound_encoding=call_data.outbound_encoding,
            inbound_encoding="PCMU",
            api_key="not-a-real-key",
            params=TelnyxFrameSerializer.InputParams(auto_hang_up=False),
        )
    raise AssertionError(f"unexpected transport type {transport_type!r}")


def telephony_bot(calls: Calls) -> Callable[[Any], Awaitable[None]]:
    """A Pipecat telephony bot, called as Pipecat's runner calls it (``runner_args.websocket``);
    records what it parsed in ``calls``."""

    async def bot(runner_args: Any) -> None:
        try:
            websocket = runner_args.websocket
            transport_type, call_data = await parse_telephony_websocket(websocket)
            calls.parsed.append((transport_type, call_data.call_id, call_data.stream_id))
            transport = FastAPIWebsocketTransport(
                websocket=websocket,
                params=FastAPIWebsocketParams(
                    audio_in_enabled=True,
                    audio_out_enabled=True,
                    add_wav_header=False,
                    # Only the caller's audio goes out: no silence in the gaps, none at the end.
                    audio_out_auto_silence=False,
                    audio_out_end_silence_secs=0,
                    serializer=serializer_for(transport_type, call_data),
                    allowed_origins=[],
                ),
            )
            task = PipelineWorker(
                Pipeline([transport.input(), PlayBack(), transport.output()]),
                params=PipelineParams(audio_in_sample_rate=RATE, audio_out_sample_rate=RATE),
                enable_rtvi=False,
            )
            await run_pipeline(transport, task, runner_args.handle_sigint)
        finally:
            calls.end()

    return bot


# Where the bot runs.


@asynccontextmanager
async def gateway_for(hosting: str, calls: Calls) -> AsyncIterator[Gateway]:
    """A gateway serving ``phone.test`` with the telephony bot: ``upstream`` (the bot under
    uvicorn, dialled by the gateway) or ``inprocess`` (``@gateway.bot``)."""
    bot = telephony_bot(calls)
    settings = GatewaySettings(port=0, bot_grace_period=10)
    if hosting == "inprocess":
        gateway = Gateway(Config(gateway=settings))
        gateway.bot(SERVICE_HOST)(bot)
        async with gateway.running() as gw:
            yield gw
        return
    async with under_uvicorn(bot) as upstream:
        config = Config(
            gateway=settings,
            orgs=[OrgConfig("test")],
            agents=[AgentConfig("phone", "test", upstream=upstream)],
        )
        async with Gateway(config).running() as gw:
            yield gw


# The caller.


def mulaw(sample: int) -> int:
    """G.711 μ-law code of a 16-bit linear sample."""
    sign = 0x80 if sample < 0 else 0
    magnitude = min(abs(sample), 32635) + 0x84
    exponent = magnitude.bit_length() - 8
    mantissa = (magnitude >> (exponent + 3)) & 0x0F
    return ~(sign | exponent << 4 | mantissa) & 0xFF


def tone(n_bytes: int, hz: float = 440.0) -> bytes:
    """A 440 Hz sine swelling from quiet to loud, as 8 kHz μ-law: no two 20 ms chunks of it are
    alike, so the order of what comes back is checked too."""
    return bytes(
        mulaw(round((1000 + 15000 * i / n_bytes) * math.sin(2 * math.pi * hz * i / RATE)))
        for i in range(n_bytes)
    )


@dataclass
class Call:
    """What the caller got back."""

    replies: list[dict[str, Any]]
    audio: bytes
    close_code: int | None


async def place_call(gw: Gateway, provider: str, audio: bytes) -> Call:
    """Dial the gateway as ``provider`` does: its opening, then ``audio`` in 20 ms media
    messages; read replies until as much audio came back as was sent, then hang up."""
    # Twilio's has no query (its host is in start.customParameters); the others' ?serviceHost=.
    target = provider_target(provider, SERVICE_HOST)
    replies: list[dict[str, Any]] = []
    returned = b""
    async with connect(
        gw.url + target, compression=None, max_size=None, open_timeout=10, close_timeout=10
    ) as ws:
        for message in opening_messages(provider, service_host=SERVICE_HOST):
            await ws.send(message)
        for i in range(0, len(audio), CHUNK):
            n = i // CHUNK
            chunk = audio[i : i + CHUNK]
            await ws.send(media_message(provider, audio=chunk, sequence=n + 3, chunk=n + 1))
        with anyio.fail_after(20):
            while len(returned) < len(audio):
                reply = json.loads(await ws.recv())
                replies.append(reply)
                if reply.get("event") == "media":
                    returned += base64.b64decode(reply["media"]["payload"], validate=True)
    return Call(replies, returned, ws.close_code)


# The tests.


@pytest.mark.parametrize("hosting", ["upstream", "inprocess"])
@pytest.mark.parametrize("provider", ["twilio", "telnyx"])
async def test_a_pipecat_telephony_bot_plays_the_callers_audio_back(
    provider: str, hosting: str
) -> None:
    calls = Calls()
    sent = tone(MESSAGES * CHUNK)
    assert len({sent[i : i + CHUNK] for i in range(0, len(sent), CHUNK)}) == MESSAGES
    async with gateway_for(hosting, calls) as gw:
        call = await place_call(gw, provider, sent)
        # The caller hung up: Pipecat sees the disconnect and its pipeline ends.
        with anyio.fail_after(20):
            while calls.ended < 1:
                await calls.changed.wait()

    # The bot parsed the provider's own opening, forwarded unchanged by the gateway.
    assert calls.parsed == [(provider, CALL_IDS[provider], STREAM_IDS[provider])]

    # Only media came back, in the provider's shape: Twilio names the stream, Telnyx does not.
    media = [r for r in call.replies if r.get("event") == "media"]
    assert media == call.replies
    assert len(media) >= 2  # the bot's 40 ms chunks, not one blob
    for reply in media:
        if provider == "twilio":
            assert set(reply) == {"event", "streamSid", "media"}
            assert reply["streamSid"] == STREAM_IDS["twilio"]
        else:
            assert set(reply) == {"event", "media"}
        assert set(reply["media"]) == {"payload"}
        assert reply["media"]["payload"]  # never an empty payload

    # The caller's own audio, in order: 8 kHz μ-law throughout, so nothing was resampled;
    # μ-law's negative zero (0x7f) decodes to 0 and comes back as 0xff.
    assert call.audio == sent.replace(b"\x7f", b"\xff")
    assert call.close_code == 1000
