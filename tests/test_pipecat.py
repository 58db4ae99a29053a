"""A stock Pipecat pipeline, unchanged, served two ways: in-process behind wsgate, and by Pipecat's
own FastAPI/uvicorn path. The same client gets the same answers and the same close from both.

The bot is Pipecat's ``FastAPIWebsocketTransport`` with Pipecat's ``ProtobufFrameSerializer``:
the client sends transport messages as protobuf frames, a processor answers each one, and
``{"say": "bye"}`` ends the pipeline (Pipecat then closes the WebSocket). Pipecat runs on asyncio
only, so these tests do too. Skipped unless the ``pipecat`` test extra is installed.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from websockets.exceptions import ConnectionClosed

pytest.importorskip("pipecat.transports.websocket.fastapi", reason="needs the pipecat extra")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from pipecat.frames.frames import (
    EndWorkerFrame,
    Frame,
    InputTransportMessageFrame,
    OutputTransportMessageUrgentFrame,
)
from pipecat.frames.protobufs import frames_pb2
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.serializers.protobuf import ProtobufFrameSerializer
from pipecat.transports.websocket.fastapi import (
    FastAPIWebsocketParams,
    FastAPIWebsocketTransport,
)

from .helpers import asyncio_only, connect, in_thread, run_pipeline, serving_bot, under_uvicorn

pytestmark = [pytest.mark.anyio, asyncio_only]  # Pipecat is built on asyncio


class Answerer(FrameProcessor):  # type: ignore[misc]
    """Answers each client message ``{"say": x}`` with ``{"heard": x, "n": count}``; "bye"
    ends the pipeline once the answer is out."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, InputTransportMessageFrame):
            self.count += 1
            said = frame.message["say"]
            answer = {"heard": said, "n": self.count}
            await self.push_frame(OutputTransportMessageUrgentFrame(message=answer))
            if said == "bye":
                await self.push_frame(EndWorkerFrame(), FrameDirection.UPSTREAM)
        else:
            await self.push_frame(frame, direction)


async def pipecat_bot(runner_args: Any) -> None:
    """A Pipecat bot as Pipecat's runner calls it: with ``runner_args.websocket``."""
    transport = FastAPIWebsocketTransport(
        websocket=runner_args.websocket,
        params=FastAPIWebsocketParams(serializer=ProtobufFrameSerializer(), allowed_origins=[]),
    )
    task = PipelineWorker(
        Pipeline([transport.input(), Answerer(), transport.output()]), enable_rtvi=False
    )
    await run_pipeline(transport, task, runner_args.handle_sigint)


def message_frame(payload: dict[str, Any]) -> bytes:
    frame = frames_pb2.Frame()
    frame.message.data = json.dumps(payload)
    return bytes(frame.SerializeToString())


def conversation(url: str) -> tuple[list[Any], int]:
    """The client: says three things, the last being "bye"; returns the answers and the close
    code it received."""
    answers: list[Any] = []
    with connect(url) as ws:
        for said in ["hello", "wsgate", "bye"]:
            ws.send(message_frame({"say": said}))
        try:
            while True:
                frame = frames_pb2.Frame.FromString(ws.recv(timeout=30))
                if frame.WhichOneof("frame") == "message":  # the transport may send audio too
                    answers.append(json.loads(frame.message.data))
        except ConnectionClosed as exc:
            assert exc.rcvd is not None
            return answers, exc.rcvd.code


EXPECTED = (
    [
        {"heard": "hello", "n": 1},
        {"heard": "wsgate", "n": 2},
        {"heard": "bye", "n": 3},
    ],
    1000,
)


@asynccontextmanager
async def pipecat_behind_wsgate() -> AsyncIterator[str]:
    """The bot in-process behind wsgate; yields its URL."""
    async with serving_bot(pipecat_bot) as gw:
        yield f"{gw.url}/ws/generic/bot.test"


async def test_a_pipecat_pipeline_answers_in_process_behind_wsgate() -> None:
    async with pipecat_behind_wsgate() as url:
        assert await in_thread(conversation, url) == EXPECTED


async def test_the_same_pipeline_under_fastapi_and_uvicorn_behaves_alike() -> None:
    async with under_uvicorn(pipecat_bot) as url:  # Pipecat's own FastAPI/uvicorn path
        via_uvicorn = await in_thread(conversation, url)
    async with pipecat_behind_wsgate() as url:
        behind_wsgate = await in_thread(conversation, url)
    assert via_uvicorn == behind_wsgate == EXPECTED


async def test_a_client_leaving_ends_the_pipecat_pipeline_in_process() -> None:
    ended = anyio.Event()

    async def bot(runner_args: Any) -> None:
        try:
            await pipecat_bot(runner_args)
        finally:
            ended.set()

    async with serving_bot(bot, bot_grace_period=30) as gw:

        def client() -> Any:
            with connect(f"{gw.url}/ws/generic/bot.test") as ws:
                ws.send(message_frame({"say": "hi"}))
                while True:
                    frame = frames_pb2.Frame.FromString(ws.recv(timeout=30))
                    if frame.WhichOneof("frame") == "message":
                        return json.loads(frame.message.data)

        assert await in_thread(client) == {"heard": "hi", "n": 1}
        # Pipecat sees the disconnect and cancels its task well within the grace period.
        with anyio.fail_after(20):
            await ended.wait()
