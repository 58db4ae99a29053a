"""In-process bots on real sockets, under asyncio and trio: what the bot sees (a Starlette-like
WebSocket, the body, headers), how sessions end on each side, and backpressure both ways."""

from __future__ import annotations

import base64
import json
import logging
import select
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.from_thread
import pytest

from wsgate import (
    AgentConfig,
    BotArguments,
    Config,
    ConfigError,
    Gateway,
    GatewaySettings,
    OrgConfig,
    WebSocketDisconnect,
    WebSocketState,
    loads_config,
)
from wsgate.inprocess import Headers, QueryParams

from .helpers import (
    bot_config,
    close_payload,
    closed_with,
    connect,
    frame,
    in_thread,
    raw_socket,
    send_all_past_the_limit,
    serving_bot,
)

pytestmark = pytest.mark.anyio

BOT_PATH = "/ws/generic/bot.test"


async def echo_bot(args: BotArguments) -> None:
    """Every message back, unchanged (named in a TOML test as tests.test_inprocess:echo_bot)."""
    async for message in args.websocket:
        if isinstance(message, str):
            await args.websocket.send_text(message)
        else:
            await args.websocket.send_bytes(message)


@dataclass
class Probe:
    """What a test's bot did, with events the test can wait on (made in the test's loop)."""

    started: anyio.Event = field(default_factory=anyio.Event)
    finished: anyio.Event = field(default_factory=anyio.Event)
    cancelled: bool = False
    returned: bool = False
    seen: list[Any] = field(default_factory=list)

    async def wait_finished(self, timeout: float = 20) -> None:
        with anyio.fail_after(timeout):
            await self.finished.wait()

    async def endless_bot(self, args: BotArguments) -> None:
        """A bot that echoes every text and never stops on its own, not even when its client
        has left: notes its start, its end, and whether it was cancelled."""
        self.started.set()
        try:
            async for message in args.websocket:
                await args.websocket.send_text(str(message))
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            self.cancelled = True
            raise
        finally:
            self.finished.set()


# What the bot sees


async def test_an_echo_bot_returns_text_and_binary_of_every_size_unchanged() -> None:
    sizes = [0, 1, 125, 126, 65535, 65536, 250_000, 1024 * 1024]  # up to max_message_size
    async with serving_bot(echo_bot) as gw:

        def client() -> None:
            with connect(f"{gw.url}{BOT_PATH}") as ws:
                for n in sizes:
                    ws.send(b"\x00\xff" * (n // 2))
                    assert ws.recv() == b"\x00\xff" * (n // 2)
                    # Multi-byte UTF-8 (2.5 bytes a character): credit is counted in bytes.
                    text = ("é€𝄞a" * n)[: n // 3]
                    ws.send(text)
                    assert ws.recv() == text
                ws.send(["frag", "mented", " é"])
                assert ws.recv() == "fragmented é"

        await in_thread(client)


async def test_the_bot_gets_the_session_id_body_headers_and_query_of_the_client() -> None:
    probe = Probe()

    async def bot(args: BotArguments) -> None:
        ws = args.websocket
        probe.seen = [
            args.session_id,
            args.body,
            ws.headers["X-Custom"],
            ws.headers.get("x-custom"),
            ws.headers.getlist("x-twice"),
            ws.query_params["lang"],
            ws.query_params.getlist("lang"),
            ws.path,
            args.handle_sigint,
            ws.client_state,
            ws.application_state,
        ]
        await ws.accept()  # a no-op: FastAPI-style code calls it
        ws.cached = "Pipecat caches data on the websocket"  # type: ignore[attr-defined]
        await ws.send_json({"ok": ws.cached})  # type: ignore[attr-defined]

    document = {"user": "u-1", "lang": "fr"}
    body = base64.urlsafe_b64encode(json.dumps(document).encode()).decode().rstrip("=")
    async with serving_bot(bot) as gw:

        def client() -> Any:
            url = f"{gw.url}{BOT_PATH}?body={body}&lang=en+GB&lang=fr%2DFR"
            headers = [("X-Custom", "yes"), ("X-Twice", "1"), ("X-Twice", "2")]
            with connect(url, additional_headers=headers) as ws:
                answer = json.loads(ws.recv())
                assert closed_with(ws.recv) == (1000, "")
                return answer

        assert await in_thread(client) == {"ok": "Pipecat caches data on the websocket"}
    session_id, *rest = probe.seen
    assert str(uuid.UUID(session_id)) == session_id
    assert rest == [
        document,
        "yes",
        "yes",
        ["1", "2"],
        "fr-FR",  # the last value of a repeated parameter, as in Starlette
        ["en GB", "fr-FR"],
        BOT_PATH,
        False,
        WebSocketState.CONNECTED,
        WebSocketState.CONNECTED,
    ]


async def test_without_a_body_the_bot_gets_none() -> None:
    bodies: list[Any] = []

    async def bot(args: BotArguments) -> None:
        bodies.append(args.body)

    async with serving_bot(bot) as gw:

        def client() -> tuple[int, str]:
            with connect(f"{gw.url}{BOT_PATH}") as ws:
                return closed_with(ws.recv)

        assert await in_thread(client) == (1000, "")
    assert bodies == [None]


async def test_receive_gives_asgi_messages_and_the_typed_helpers_mirror_starlette() -> None:
    probe = Probe()

    async def bot(args: BotArguments) -> None:
        ws = args.websocket
        probe.seen.append(await ws.receive())
        probe.seen.append(await ws.receive())
        probe.seen.append(await ws.receive_text())
        probe.seen.append(await ws.receive_bytes())
        probe.seen.append(await ws.receive_json())
        probe.seen.append(await ws.receive_json(mode="binary"))
        try:
            await ws.receive_text()  # a binary message: KeyError, as in Starlette
        except KeyError:
            probe.seen.append("KeyError")
        await ws.send_json({"é": 1}, mode="binary")
        await ws.send({"type": "websocket.send", "text": "asgi"})
        probe.seen.append([m async for m in ws.iter_text()])
        probe.seen.append(ws.client_state)
        try:
            await ws.receive()
        except RuntimeError:
            probe.seen.append("RuntimeError")
        probe.finished.set()

    async with serving_bot(bot) as gw:

        def client() -> list[str | bytes]:
            with connect(f"{gw.url}{BOT_PATH}") as ws:
                for m in ["t", b"b", "text", b"bytes", '{"a": [1]}', b'{"b": 2}', b"x"]:
                    ws.send(m)
                got = [ws.recv(), ws.recv()]
                ws.send("last")
                ws.close(4000, "bye")
                return got

        assert await in_thread(client) == [b'{"\xc3\xa9":1}', "asgi"]
        await probe.wait_finished()
    assert probe.seen == [
        {"type": "websocket.receive", "text": "t"},
        {"type": "websocket.receive", "bytes": b"b"},
        "text",
        b"bytes",
        {"a": [1]},
        {"b": 2},
        "KeyError",
        ["last"],
        WebSocketState.DISCONNECTED,
        "RuntimeError",
    ]


# Bot kinds


async def test_a_broadcasting_bot_reaches_every_session_including_the_sender() -> None:
    room: list[BotArguments] = []
    joined = threading.Semaphore(0)

    async def bot(args: BotArguments) -> None:
        room.append(args)
        joined.release()
        try:
            async for message in args.websocket.iter_text():
                for member in list(room):
                    try:
                        await member.websocket.send_text(message)
                    except WebSocketDisconnect:
                        pass  # that member left meanwhile
        finally:
            room.remove(args)

    async with serving_bot(bot) as gw:
        ready = threading.Barrier(3)

        def client(i: int) -> list[str]:
            with connect(f"{gw.url}{BOT_PATH}") as ws:
                joined.acquire(timeout=20)
                ready.wait(20)  # all three are in the room before anyone speaks
                ws.send(f"from {i}")
                got = sorted(str(ws.recv(timeout=20)) for _ in range(3))
                ready.wait(20)  # nobody leaves before everyone heard everyone
                return got

        results: dict[int, list[str]] = {}

        async def run(i: int) -> None:
            results[i] = await in_thread(client, i)

        async with anyio.create_task_group() as tg:
            for i in range(3):
                tg.start_soon(run, i)
    assert results == {i: ["from 0", "from 1", "from 2"] for i in range(3)}


async def test_a_slow_bot_answers_every_message_in_order() -> None:
    async def slow_bot(args: BotArguments) -> None:
        async for message in args.websocket.iter_text():
            await anyio.sleep(0.05)  # the bot's own pace, e.g. a model thinking
            await args.websocket.send_text(message.upper())

    async with serving_bot(slow_bot) as gw:

        def client() -> list[str | bytes]:
            with connect(f"{gw.url}{BOT_PATH}") as ws:
                for i in range(10):
                    ws.send(f"m{i}")
                return [ws.recv(timeout=20) for _ in range(10)]

        assert await in_thread(client) == [f"M{i}" for i in range(10)]


@pytest.mark.slow
async def test_two_hundred_concurrent_sessions_get_only_their_own_answers() -> None:
    async def bot(args: BotArguments) -> None:
        async for message in args.websocket.iter_text():
            await args.websocket.send_text(f"{args.session_id} {message}")

    results: dict[int, set[str]] = {}
    async with serving_bot(bot) as gw:

        def client(i: int) -> None:
            with connect(f"{gw.url}{BOT_PATH}") as ws:
                sessions = set()
                for j in range(10):
                    ws.send(f"{i}/{j}")
                    session, said = str(ws.recv(timeout=30)).split(" ")
                    assert said == f"{i}/{j}"
                    sessions.add(session)
                results[i] = sessions

        async with anyio.create_task_group() as tg:
            for i in range(200):
                tg.start_soon(in_thread, client, i)
    assert sorted(results) == list(range(200))
    assert all(len(s) == 1 for s in results.values())
    assert len({next(iter(s)) for s in results.values()}) == 200


# Lifecycle


async def test_a_bot_that_returns_closes_the_client_with_1000() -> None:
    async def bot(args: BotArguments) -> None:
        await args.websocket.send_text("bye")

    async with serving_bot(bot) as gw:

        def client() -> tuple[list[str | bytes], tuple[int, str]]:
            with connect(f"{gw.url}{BOT_PATH}") as ws:
                got = [ws.recv()]
                return got, closed_with(ws.recv)

        assert await in_thread(client) == (["bye"], (1000, ""))


async def test_a_bot_that_closes_chooses_the_code_and_cannot_send_afterwards() -> None:
    probe = Probe()

    async def bot(args: BotArguments) -> None:
        ws = args.websocket
        await ws.close(4321, "my reason")
        probe.seen.append(ws.application_state)
        for attempt in (ws.send_text("late"), ws.close()):
            try:
                await attempt
            except RuntimeError as exc:
                probe.seen.append(str(exc))
        probe.finished.set()

    async with serving_bot(bot) as gw:

        def client() -> tuple[int, str]:
            with connect(f"{gw.url}{BOT_PATH}") as ws:
                return closed_with(ws.recv)

        assert await in_thread(client) == (4321, "my reason")
        await probe.wait_finished()
    assert probe.seen == [
        WebSocketState.DISCONNECTED,
        'Cannot call "send" once a close message has been sent.',
        'Cannot call "send" once a close message has been sent.',
    ]


async def test_a_bot_that_raises_closes_the_client_with_1011_and_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def bot(args: BotArguments) -> None:
        await args.websocket.receive_text()
        raise ValueError("the bot broke")

    async with serving_bot(bot) as gw:

        def client() -> tuple[int, str]:
            with connect(f"{gw.url}{BOT_PATH}") as ws:
                ws.send("x")
                return closed_with(ws.recv)

        assert await in_thread(client) == (1011, "")
    logged = [r for r in caplog.records if r.exc_info and r.exc_info[0] is ValueError]
    assert len(logged) == 1
    assert logged[0].levelno == logging.ERROR


async def test_a_client_still_sending_past_the_limit_reads_its_1009_and_its_bot_hears_at_once() -> (
    None
):
    # Refused at its header, the rest of the message is still coming when the session ends at
    # the gateway's FIN: its socket is read (and dropped) to its EOF, so that no reset answers
    # the bytes in flight and takes the 1009 with it, while the bot hears of the end at once.
    heard = threading.Event()

    async def bot(args: BotArguments) -> None:
        async for _ in args.websocket:
            pass
        heard.set()

    async with serving_bot(bot, max_message_size=1000) as gw:

        def client() -> tuple[int | None, bool]:
            with raw_socket(gw.port) as sock:
                code = send_all_past_the_limit(sock)
                return code, heard.wait(2.5)  # its socket still open: no FIN from it yet

        assert await in_thread(client) == (1009, True)


async def test_a_client_leaving_gives_the_bot_a_disconnect_with_its_code() -> None:
    probe = Probe()

    async def bot(args: BotArguments) -> None:
        ws = args.websocket
        while True:
            message = await ws.receive()
            probe.seen.append(message)
            if message["type"] == "websocket.disconnect":
                break
        probe.seen.append(ws.client_state)
        try:
            await ws.send_text("too late")
        except WebSocketDisconnect as exc:
            probe.seen.append(exc.code)
        probe.seen.append(ws.application_state)
        probe.finished.set()

    async with serving_bot(bot) as gw:

        def client() -> None:
            with connect(f"{gw.url}{BOT_PATH}") as ws:
                ws.send("hi")
                ws.close(4000, "leaving")

        await in_thread(client)
        await probe.wait_finished()
    assert probe.seen == [
        {"type": "websocket.receive", "text": "hi"},
        {"type": "websocket.disconnect", "code": 4000, "reason": "leaving"},
        WebSocketState.DISCONNECTED,
        1006,  # Starlette's code when uvicorn's send finds the client gone
        WebSocketState.DISCONNECTED,
    ]


async def test_a_bot_still_running_after_its_client_left_is_cancelled_after_the_grace_period() -> (
    None
):
    probe = Probe()

    async with serving_bot(probe.endless_bot, bot_grace_period=0.2) as gw:

        def client() -> None:
            with connect(f"{gw.url}{BOT_PATH}") as ws:
                anyio.from_thread.run(probe.started.wait)
                ws.close()

        await in_thread(client)
        started = anyio.current_time()
        await probe.wait_finished()
        waited = anyio.current_time() - started
    assert probe.cancelled
    assert 0.1 < waited < 10


async def test_a_bot_that_returns_within_the_grace_period_is_not_cancelled() -> None:
    probe = Probe()

    async def tidy_bot(args: BotArguments) -> None:
        async for _ in args.websocket:
            pass
        try:
            await anyio.sleep(0.05)  # tidying up after the client left
            probe.returned = True
        except anyio.get_cancelled_exc_class():
            probe.cancelled = True
            raise
        finally:
            probe.finished.set()

    async with serving_bot(tidy_bot, bot_grace_period=10) as gw:

        def client() -> None:
            with connect(f"{gw.url}{BOT_PATH}") as ws:
                ws.send("x")

        await in_thread(client)
        await probe.wait_finished()
    assert probe.returned and not probe.cancelled


async def test_the_session_time_limit_cancels_the_bot_and_closes_the_client_with_1000() -> None:
    probe = Probe()

    async with serving_bot(probe.endless_bot, session_time_limit=0.5, bot_grace_period=60) as gw:

        def client() -> tuple[int, str]:
            with connect(f"{gw.url}{BOT_PATH}") as ws:
                ws.send("x")
                assert ws.recv() == "x"
                return closed_with(ws.recv)

        assert await in_thread(client) == (1000, "session time limit")
        await probe.wait_finished()
    assert probe.cancelled


async def test_stopping_the_gateway_closes_the_client_with_1001_and_no_bot_outlives_it() -> None:
    probe = Probe()

    gateway = Gateway(bot_config(probe.endless_bot, drain_timeout=0.2, bot_grace_period=0.2))
    async with anyio.create_task_group() as tg:
        await tg.start(gateway.serve)

        def client() -> tuple[int, str]:
            with connect(f"{gateway.url}{BOT_PATH}") as ws:
                anyio.from_thread.run(probe.started.wait)
                anyio.from_thread.run_sync(gateway.stop)
                return closed_with(ws.recv)

        assert await in_thread(client) == (1001, "gateway shutting down")
    # serve() has returned: the bot's task is over.
    assert probe.finished.is_set() and probe.cancelled


async def test_a_bot_that_ends_its_loop_on_websocket_disconnect_is_not_an_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def fastapi_style_bot(args: BotArguments) -> None:
        while True:  # the FastAPI idiom: receive_text until WebSocketDisconnect escapes
            await args.websocket.send_text(await args.websocket.receive_text())

    async with serving_bot(fastapi_style_bot) as gw:

        def client() -> None:
            with connect(f"{gw.url}{BOT_PATH}") as ws:
                ws.send("a")
                assert ws.recv() == "a"

        await in_thread(client)
    # The gateway has stopped, so the session and its bot are over.
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# Protocol errors


async def test_invalid_utf8_text_closes_the_client_with_1007_and_the_bot_is_told() -> None:
    probe = Probe()

    async def bot(args: BotArguments) -> None:
        probe.seen.append(await args.websocket.receive())
        probe.finished.set()

    async with serving_bot(bot) as gw:

        def client() -> tuple[int, str]:
            with connect(f"{gw.url}{BOT_PATH}") as ws:
                ws.send(b"\xff\xfe", text=True)
                return closed_with(ws.recv)

        close = await in_thread(client)
        await probe.wait_finished()
    assert close == (1007, "invalid UTF-8 in a text message")
    assert probe.seen == [
        {"type": "websocket.disconnect", "code": 1007, "reason": "invalid UTF-8 in a text message"}
    ]


# Backpressure

FRAME = 60_000
FLOOD_LIMIT = 400 * 1024 * 1024
# The inbox limit (1 MiB) plus one read, and kernel buffers on one loopback hop (send and
# receive, autotuned up to ~4-6 MiB each): well under this.
PUSHED_BUDGET = 32 * 1024 * 1024


async def test_a_bot_that_does_not_read_holds_a_flooding_client_back() -> None:
    resume = anyio.Event()
    counted: list[int] = []

    async def lazy_bot(args: BotArguments) -> None:
        await resume.wait()
        n = 0
        async for message in args.websocket.iter_bytes():
            assert message == bytes([n % 256]) * FRAME
            n += 1
        counted.append(n)

    async with serving_bot(lazy_bot) as gw:

        def client() -> tuple[int, int]:
            sock = raw_socket(gw.port, BOT_PATH)
            sock.setblocking(False)
            pushed = frames = 0
            rest = b""
            while pushed < FLOOD_LIMIT:
                if not rest:
                    rest = frame(0x2, bytes([frames % 256]) * FRAME)
                    frames += 1
                _, writable, _ = select.select([], [sock], [], 1.0)
                if not writable:
                    break  # held back: nothing writable for a second
                n = sock.send(rest)
                pushed += n
                rest = rest[n:]
            anyio.from_thread.run_sync(resume.set)
            sock.setblocking(True)
            sock.sendall(rest + frame(0x8, close_payload(1000)))
            while sock.recv(65536):
                pass
            sock.close()
            return pushed, frames

        pushed, frames = await in_thread(client)
    # The gateway has stopped, so the bot has counted every message.
    print(f"{pushed} bytes went in before the client was held back")
    assert pushed < PUSHED_BUDGET, f"{pushed} bytes went in while the bot did not read"
    assert counted == [frames]


async def test_a_client_that_does_not_read_holds_a_sending_bot_back() -> None:
    held: list[int] = []
    stalled = threading.Event()

    async def flooding_bot(args: BotArguments) -> None:
        sent = 0
        while sent * FRAME < FLOOD_LIMIT:
            with anyio.move_on_after(1.0) as waited:
                await args.websocket.send_bytes(bytes([sent % 256]) * FRAME)
            sent += 1
            if waited.cancelled_caught:
                break  # held back: a send waited a second for the buffer to drain
        held.append(sent)
        stalled.set()
        await args.websocket.send_text("end")

    async with serving_bot(flooding_bot) as gw:

        def client() -> int:
            with connect(f"{gw.url}{BOT_PATH}", max_queue=1) as ws:
                # max_queue=1: the client library stops reading its socket too, like a slow
                # phone; it reads nothing until the bot is held back (or gave up flooding).
                assert stalled.wait(120)
                n = 0
                while (message := ws.recv(timeout=60)) != "end":
                    assert message == bytes([n % 256]) * FRAME
                    n += 1
                return n

        received = await in_thread(client)
    print(f"{held[0] * FRAME} bytes went out before the bot was held back")
    assert held[0] * FRAME < PUSHED_BUDGET, f"{held} frames went out unread"
    assert received == held[0]


# Registration and settings


async def test_the_bot_decorator_adds_an_agent_and_its_organisation() -> None:
    gateway = Gateway(Config(gateway=GatewaySettings(port=0)))

    @gateway.bot("helper.acme")
    async def helper(args: BotArguments) -> None:
        await args.websocket.send_text("at your service")

    assert gateway.config.agents_by_host()["helper.acme"].bot is helper
    async with gateway.running() as gw:

        def client() -> str | bytes:
            with connect(f"{gw.url}/ws/generic/helper.acme") as ws:
                return ws.recv()

        assert await in_thread(client) == "at your service"


async def test_the_bot_decorator_replaces_an_upstream_and_keeps_the_agents_settings() -> None:
    config = Config(
        gateway=GatewaySettings(port=0),
        orgs=[OrgConfig("test")],
        agents=[AgentConfig("bot", "test", upstream="ws://127.0.0.1:9/ws", max_sessions=1)],
    )
    gateway = Gateway(config)
    gateway.bot("bot.test")(echo_bot)
    agent = gateway.config.agents_by_host()["bot.test"]
    assert (agent.upstream, agent.bot, agent.max_sessions) == (None, echo_bot, 1)
    async with gateway.running() as gw:

        def client() -> str | bytes:
            with connect(f"{gw.url}{BOT_PATH}") as ws:
                ws.send("through the bot, not the upstream")
                return ws.recv()

        assert await in_thread(client) == "through the bot, not the upstream"
    with pytest.raises(RuntimeError, match="before the gateway serves"):
        gateway.bot("bot.test")(echo_bot)


async def test_a_bot_named_in_toml_is_imported_and_served() -> None:
    config = loads_config(
        """
        [gateway]
        port = 0
        inbox_limit = 65536
        send_buffer_limit = 65536
        bot_grace_period = 1.5
        [[org]]
        name = "test"
        [[agent]]
        name = "bot"
        org = "test"
        bot = "tests.test_inprocess:echo_bot"
        """
    )
    assert config.gateway.inbox_limit == config.gateway.send_buffer_limit == 65536
    assert config.gateway.bot_grace_period == 1.5
    async with Gateway(config).running() as gw:

        def client() -> str | bytes:
            with connect(f"{gw.url}{BOT_PATH}") as ws:
                ws.send("x" * 200_000)  # over the inbox limit: credit must come back
                ws.send("y" * 200_000)
                assert ws.recv() == "x" * 200_000
                return ws.recv()

        assert await in_thread(client) == "y" * 200_000


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"upstream": "ws://127.0.0.1:9/ws"}, "exactly one of upstream, builtin or bot"),
        ({"builtin": "echo"}, "exactly one of upstream, builtin or bot"),
        ({"bot": "no_colon"}, "must be written 'package.module:function'"),
        ({"bot": "a.b:"}, "must be written 'package.module:function'"),
        ({"bot": 42}, "async callable or 'package.module:function'"),
    ],
)
def test_an_agent_takes_exactly_one_well_formed_bot(changes: dict[str, Any], message: str) -> None:
    fields: dict[str, Any] = {"bot": "tests.test_inprocess:echo_bot", **changes}
    with pytest.raises(ConfigError, match=message):
        AgentConfig("bot", "test", **fields)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("tests.no_such_module:bot", "cannot import 'tests.no_such_module'"),
        ("tests.test_inprocess:no_such_bot", "has no 'no_such_bot'"),
        ("tests.test_inprocess:FRAME", "is not callable"),
    ],
)
def test_a_bot_that_cannot_be_imported_stops_the_gateway_from_being_built(
    spec: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        Gateway(bot_config(spec))


@pytest.mark.parametrize(
    ("key", "value"),
    [("inbox_limit", 0), ("send_buffer_limit", -1), ("bot_grace_period", 0)],
)
def test_the_in_process_limits_must_be_positive(key: str, value: int) -> None:
    with pytest.raises(ConfigError, match=key):
        GatewaySettings(**{key: value})


def test_headers_are_case_insensitive_and_query_params_decoded_as_starlette_does() -> None:
    headers = Headers([("Origin", "https://a"), ("x-y", "1"), ("X-Y", "2")])
    assert headers["ORIGIN"] == headers.get("origin") == "https://a"
    assert "x-Y" in headers and "z" not in headers
    assert headers.getlist("x-y") == ["1", "2"]
    assert list(headers) == ["origin", "x-y"] and len(headers) == 2
    assert headers.raw[0] == (b"origin", b"https://a")
    assert "https://a" not in repr(headers)
    query = QueryParams("a=1&b=x+y%21&a=2&flag")
    assert (query["a"], query["b"], query["flag"]) == ("2", "x y!", "")
    assert query.getlist("a") == ["1", "2"]
    assert dict(query) == {"a": "2", "b": "x y!", "flag": ""}


def test_websocket_state_and_disconnect_are_starlettes_when_it_is_installed() -> None:
    starlette = pytest.importorskip("starlette.websockets")
    assert WebSocketState is starlette.WebSocketState
    assert WebSocketDisconnect is starlette.WebSocketDisconnect
    assert [(s.name, s.value) for s in WebSocketState] == [
        ("CONNECTING", 0),
        ("CONNECTED", 1),
        ("DISCONNECTED", 2),
        ("RESPONSE", 3),
    ]
