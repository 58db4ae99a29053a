"""Native TLS (README "TLS"): wss:// clients and wss:// bots through the Rust data plane, with a
test CA made per run (trustme). Every kind of session over TLS, both hops at once, the size
limit, the refusals a TLS port owes (plain text, a bad handshake, a bot with a bad certificate),
certificates refused at start, and a reload under 200 live sessions."""

from __future__ import annotations

import contextlib
import datetime
import http.client
import io
import json
import signal
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
import websockets.sync.server as ws_server
from websockets.exceptions import ConnectionClosedError
from websockets.sync.server import ServerConnection

import wsgate
from wsgate import AgentConfig, Config, Gateway, GatewaySettings, OrgConfig
from wsgate.cli import main as cli_main
from wsgate.client import connect as client_connect

from .helpers import Bot, Reader, connect, frame, in_thread, upgrade_request
from .processes import Wsgate

pytestmark = pytest.mark.anyio

MIB = 1 << 20


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def pems(ca: trustme.CA, tmp_path: Path) -> dict[str, str]:
    """The gateway's certificate (for 127.0.0.1 and localhost) and key, and the CA, as files."""
    return write_cert(ca, tmp_path, "gateway", "127.0.0.1", "localhost")


def write_cert(
    ca: trustme.CA, where: Path, name: str, *identities: str, **options: Any
) -> dict[str, str]:
    leaf = ca.issue_cert(*identities, **options)
    paths = {"cert": where / f"{name}.pem", "key": where / f"{name}.key", "ca": where / "ca.pem"}
    leaf.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    for extra in leaf.cert_chain_pems[1:]:
        extra.write_to_path(str(paths["cert"]), append=True)
    leaf.private_key_pem.write_to_path(str(paths["key"]))
    ca.cert_pem.write_to_path(str(paths["ca"]))
    return {k: str(v) for k, v in paths.items()}


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def config(pems: dict[str, str], upstream: str | None = None, **settings: Any) -> Config:
    agents = [
        AgentConfig("echo", "tls", builtin="echo", max_sessions=500),
        AgentConfig("bot", "tls", upstream=upstream or "ws://127.0.0.1:9/ws"),
    ]
    return Config(
        gateway=GatewaySettings(port=0, tls_cert=pems["cert"], tls_key=pems["key"], **settings),
        orgs=[OrgConfig("tls", public_keys=["pk_tls"])],
        agents=agents,
    )


class TlsBot(Bot):
    """The tests' echo bot, behind TLS with a certificate of the test CA."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.subprotocols = []
        self.sessions = []
        self.ended = threading.Semaphore(0)
        from .helpers import echo

        self.behaviour = echo
        self._server = ws_server.serve(
            self._handle, "127.0.0.1", 0, ssl=context, max_size=None, compression=None
        )
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"wss://localhost:{self._server.socket.getsockname()[1]}/ws"


@pytest.fixture
def tls_bot(ca: trustme.CA) -> Iterator[TlsBot]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("localhost").configure_cert(context)
    bot = TlsBot(context)
    yield bot
    bot.close()


def exchange(url: str, context: ssl.SSLContext, messages: list[str | bytes]) -> list[Any]:
    with connect(url, ssl=context) as ws:
        answers = []
        for message in messages:
            ws.send(message)
            answers.append(ws.recv())
        return answers


MESSAGES: list[str | bytes] = ["hello", b"\x00\xff" * 10, "é" * 5000, b"z" * MIB]


async def test_the_echo_bot_over_wss_returns_every_message(
    pems: dict[str, str], ca: trustme.CA
) -> None:
    async with Gateway(config(pems)).running() as gw:
        assert gw.url.startswith("wss://")
        url = f"{gw.url}/ws/generic/echo.tls"
        assert await in_thread(exchange, url, client_context(ca), MESSAGES) == MESSAGES


async def test_a_wss_client_is_relayed_to_a_plain_bot(
    pems: dict[str, str], ca: trustme.CA, bot: Bot
) -> None:
    async with Gateway(config(pems, bot.url)).running() as gw:
        url = f"{gw.url}/ws/generic/bot.tls"
        assert await in_thread(exchange, url, client_context(ca), MESSAGES) == MESSAGES
        bot.wait_ended()
    assert bot.sessions[0].messages == MESSAGES


async def test_both_hops_over_tls_with_a_private_ca_for_the_bot(
    pems: dict[str, str], ca: trustme.CA, tls_bot: TlsBot
) -> None:
    settings = config(pems, tls_bot.url, upstream_ca_file=pems["ca"])
    async with Gateway(settings).running() as gw:
        url = f"{gw.url}/ws/generic/bot.tls"
        assert await in_thread(exchange, url, client_context(ca), MESSAGES) == MESSAGES

        def closes() -> tuple[int, str]:
            with connect(url, ssl=client_context(ca)) as ws:
                ws.send("bye")
                assert ws.recv() == "bye"
                ws.close(4001, "done here")
            assert ws.close_code is not None
            return ws.close_code, ws.close_reason or ""

        assert await in_thread(closes) == (4001, "done here")
        tls_bot.wait_ended(2)
    assert tls_bot.sessions[0].messages == MESSAGES
    assert tls_bot.sessions[1].close == (4001, "done here")


async def test_a_message_over_the_size_limit_is_closed_1009_over_tls(
    pems: dict[str, str], ca: trustme.CA
) -> None:
    async with Gateway(config(pems, max_message_size=1000)).running() as gw:

        def oversized() -> int:
            with connect(f"{gw.url}/ws/generic/echo.tls", ssl=client_context(ca)) as ws:
                ws.send("x" * 1001)
                with pytest.raises(ConnectionClosedError) as closed:
                    ws.recv()
                assert closed.value.rcvd is not None
                return closed.value.rcvd.code

        assert await in_thread(oversized) == 1009


@pytest.mark.parametrize("problem", ["unknown CA", "wrong host name"])
async def test_a_bot_whose_certificate_does_not_verify_is_502_before_the_upgrade(
    pems: dict[str, str], ca: trustme.CA, tls_bot: TlsBot, problem: str
) -> None:
    port = tls_bot.url.rsplit(":", 1)[1]
    if problem == "unknown CA":  # the system's roots do not know the test CA
        settings = config(pems, tls_bot.url)
    else:  # the bot's certificate names localhost, not 127.0.0.1
        settings = config(pems, f"wss://127.0.0.1:{port}", upstream_ca_file=pems["ca"])
    async with Gateway(settings).running() as gw:
        status, body = await in_thread(https_get, gw.port, "/ws/generic/bot.tls", ca, True)
    assert status == 502
    assert body.startswith(b"bot unreachable: TLS: invalid peer certificate")
    assert tls_bot.sessions == []


def https_get(port: int, path: str, ca: trustme.CA, upgrade: bool = False) -> tuple[int, bytes]:
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=client_context(ca))
    headers = {}
    if upgrade:
        headers = {
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        }
    connection.request("GET", path, headers=headers)
    response = connection.getresponse()
    return response.status, response.read()


async def test_health_and_start_are_served_over_https(pems: dict[str, str], ca: trustme.CA) -> None:
    async with Gateway(config(pems)).running() as gw:
        assert await in_thread(https_get, gw.port, "/livez", ca) == (200, b"ok\n")

        def start() -> tuple[int, Any]:
            connection = http.client.HTTPSConnection(
                "127.0.0.1", gw.port, context=client_context(ca)
            )
            connection.request(
                "POST",
                "/v1/public/echo/start",
                body=json.dumps({"transport": "websocket"}),
                headers={"Authorization": "Bearer pk_tls"},
            )
            response = connection.getresponse()
            return response.status, json.loads(response.read())

        status, answer = await in_thread(start)
    assert status == 200
    # Without a public_url, the wsUrl names this gateway as wss://.
    assert answer["wsUrl"] == f"wss://127.0.0.1:{gw.port}/ws/generic/echo.tls"


async def test_plain_text_and_a_stalled_handshake_cost_nothing_else(
    pems: dict[str, str], ca: trustme.CA
) -> None:
    async with Gateway(config(pems)).running() as gw:
        # A client that starts a TLS handshake and stalls: it holds nothing but a pending slot.
        stalled = socket.create_connection(("127.0.0.1", gw.port))
        stalled.sendall(b"\x16\x03\x01")

        def plain() -> bytes:
            with socket.create_connection(("127.0.0.1", gw.port)) as s:
                s.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
                s.settimeout(10)
                data = b""
                while chunk := s.recv(4096):
                    data += chunk
                return data

        answer = await in_thread(plain)
        assert b"HTTP/1.1 200" not in answer  # closed (with a TLS alert at most)
        assert gw.sessions() == 0  # neither the stalled nor the plain one holds a session
        assert await in_thread(exchange, f"{gw.url}/ws/generic/echo.tls", client_context(ca),
                               ["still serving"]) == ["still serving"]  # fmt: skip
        stalled.close()


async def test_an_in_process_bot_serves_a_wss_client(pems: dict[str, str], ca: trustme.CA) -> None:
    gateway = Gateway(config(pems))

    @gateway.bot("inproc.tls")
    async def shout(args: wsgate.BotArguments) -> None:
        async for message in args.websocket.iter_text():
            await args.websocket.send_text(message.upper())

    async with gateway.running() as gw:
        url = f"{gw.url}/ws/generic/inproc.tls"
        assert await in_thread(exchange, url, client_context(ca), ["hi", "é" * 4000]) == [
            "HI",
            "É" * 4000,
        ]


@pytest.mark.parametrize(
    ("problem", "message"),
    [
        ("missing", "tls_cert: cannot read"),
        ("expired", "tls_cert has expired"),
        ("other key", "tls_key does not go with tls_cert"),
        ("not pem", "tls_cert holds no certificate"),
    ],
)
def test_a_certificate_that_cannot_serve_is_refused_at_start(
    pems: dict[str, str], ca: trustme.CA, tmp_path: Path, problem: str, message: str
) -> None:
    if problem == "missing":
        pems = {**pems, "cert": str(tmp_path / "nope.pem")}
    elif problem == "expired":
        past = datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)
        pems = write_cert(ca, tmp_path, "old", "127.0.0.1", not_before=past,
                          not_after=past + datetime.timedelta(days=1))  # fmt: skip
    elif problem == "other key":
        other = write_cert(ca, tmp_path, "other", "127.0.0.1")
        pems = {**pems, "key": other["key"]}
    else:
        Path(pems["cert"]).write_text("not a certificate\n")
    with pytest.raises(wsgate.ConfigError, match=message):
        Gateway(config(pems))


def test_tls_cert_and_tls_key_go_together(pems: dict[str, str]) -> None:
    with pytest.raises(wsgate.ConfigError, match="tls_cert and tls_key go together"):
        GatewaySettings(tls_cert=pems["cert"])


async def test_a_reload_serves_the_new_certificate_and_keeps_live_sessions(
    pems: dict[str, str], ca: trustme.CA, tmp_path: Path
) -> None:
    async with Gateway(config(pems)).running() as gw:
        url = f"{gw.url}/ws/generic/echo.tls"
        live = []
        for _ in range(200):
            live.append(await in_thread(lambda: connect(url, ssl=client_context(ca)).__enter__()))

        def serial() -> int:
            with socket.create_connection(("127.0.0.1", gw.port)) as raw:
                with client_context(ca).wrap_socket(raw, server_hostname="127.0.0.1") as s:
                    der = s.getpeercert(binary_form=True)
            assert der is not None
            return hash(der)

        before = await in_thread(serial)
        # A bad file keeps the old certificate.
        Path(pems["cert"]).write_text("broken\n")
        assert not gw.reload_tls()
        assert await in_thread(serial) == before
        fresh = write_cert(ca, tmp_path, "fresh", "127.0.0.1")
        Path(pems["cert"]).write_bytes(Path(fresh["cert"]).read_bytes())
        Path(pems["key"]).write_bytes(Path(fresh["key"]).read_bytes())
        assert gw.reload_tls()
        assert await in_thread(serial) != before
        for ws in live:  # every session opened before the reload goes on
            await in_thread(ws.send, "still here")
            assert await in_thread(ws.recv) == "still here"
            await in_thread(ws.close)


def test_the_cli_serves_tls_and_rereads_the_certificate_on_sighup(
    pems: dict[str, str], ca: trustme.CA, tmp_path: Path
) -> None:
    settings = tmp_path / "wsgate.toml"
    settings.write_text(
        f"[gateway]\nport = 0\ntls_cert = {pems['cert']!r}\ntls_key = {pems['key']!r}\n"
        "[[org]]\nname = 'tls'\npublic_keys = ['pk_tls']\n"
        "[[agent]]\nname = 'echo'\norg = 'tls'\nbuiltin = 'echo'\n"
    )
    process = Wsgate("serve", "--config", str(settings))
    try:
        url = process.url()
        assert url.startswith("wss://127.0.0.1:")
        port = int(url.rsplit(":", 1)[1])
        before = peer_certificate(port, ca)
        fresh = write_cert(ca, tmp_path, "fresh", "127.0.0.1")
        Path(pems["cert"]).write_bytes(Path(fresh["cert"]).read_bytes())
        Path(pems["key"]).write_bytes(Path(fresh["key"]).read_bytes())
        process.proc.send_signal(signal.SIGHUP)
        process.expect("TLS certificate reloaded", stream="stderr")
        assert peer_certificate(port, ca) != before
        # wsgate start against the https:// gateway, with the private CA.
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = cli_main(["start", "--url", f"https://127.0.0.1:{port}", "--agent", "echo",
                             "--key", "pk_tls", "--ca-file", pems["ca"]])  # fmt: skip
        assert code == 0
        started = json.loads(out.getvalue())
        assert started["wsUrl"] == f"wss://127.0.0.1:{port}/ws/generic/echo.tls"
        assert exchange(started["wsUrl"], client_context(ca), ["ok"]) == ["ok"]
        process.proc.send_signal(signal.SIGTERM)
        assert process.finish()[0] == 0
    finally:
        process.kill()


def peer_certificate(port: int, ca: trustme.CA) -> bytes:
    with socket.create_connection(("127.0.0.1", port)) as raw:
        with client_context(ca).wrap_socket(raw, server_hostname="127.0.0.1") as s:
            der = s.getpeercert(binary_form=True)
    assert der is not None
    return der


async def test_the_python_client_connects_to_a_wss_gateway(
    pems: dict[str, str], ca: trustme.CA, anyio_backend: str
) -> None:
    if anyio_backend != "asyncio":
        pytest.skip("wsgate.client.connect runs on asyncio (the websockets client)")
    async with Gateway(config(pems)).running() as gw:
        base = f"https://127.0.0.1:{gw.port}"
        async with client_connect(base, "echo", public_key="pk_tls",
                                  ssl_context=client_context(ca)) as ws:  # fmt: skip
            await ws.send("through TLS")
            assert await ws.recv() == "through TLS"


async def test_fragments_and_drops_over_tls_on_both_hops(
    pems: dict[str, str], ca: trustme.CA, tls_bot: TlsBot
) -> None:
    settings = config(pems, tls_bot.url, upstream_ca_file=pems["ca"])
    async with Gateway(settings).running() as gw:
        url = f"{gw.url}/ws/generic/bot.tls"

        def fragmented() -> Any:
            with connect(url, ssl=client_context(ca)) as ws:
                ws.send(["frag", "mented ", "é" * 3000])  # one message in three frames
                return ws.recv()

        assert await in_thread(fragmented) == "fragmented " + "é" * 3000

        def dropped() -> None:
            # Past the 101, the client's TCP connection goes without a close frame (or
            # close_notify): the bot must still hear of it.
            with socket.create_connection(("127.0.0.1", gw.port)) as raw:
                with client_context(ca).wrap_socket(raw, server_hostname="127.0.0.1") as s:
                    s.sendall(
                        b"GET /ws/generic/bot.tls HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                        b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
                    )
                    assert s.recv(12) == b"HTTP/1.1 101"
                    s.shutdown(socket.SHUT_RDWR)  # TCP only: no close_notify

        await in_thread(dropped)
        tls_bot.wait_ended(2)
        # The bot that drops its connection: the client gets 1011 through TLS.

        def bot_drops(ws: ServerConnection, seen: Any) -> None:
            ws.recv()
            ws.socket.shutdown(socket.SHUT_RDWR)

        tls_bot.behaviour = bot_drops

        def lost() -> tuple[int, str]:
            with connect(url, ssl=client_context(ca)) as ws:
                ws.send("bye")
                with pytest.raises(ConnectionClosedError) as closed:
                    ws.recv()
                assert closed.value.rcvd is not None
                return closed.value.rcvd.code, closed.value.rcvd.reason

        assert await in_thread(lost) == (1011, "bot lost")
    assert tls_bot.sessions[1].close == (1001, "client gone")


async def test_frames_sent_with_the_upgrade_request_in_one_burst_are_all_relayed(
    pems: dict[str, str], ca: trustme.CA
) -> None:
    """A client that sends its first messages right behind its request, before the 101, in
    more TLS records than the connection holds decrypted at once: none is lost at the
    handover."""
    big = [bytes([i]) * 20_000 for i in range(1, 6)]  # 100 kB of frames behind the request
    frames = b"".join(frame(2, payload) for payload in big)
    async with Gateway(config(pems)).running() as gw:

        def burst() -> list[bytes]:
            with socket.create_connection(("127.0.0.1", gw.port)) as raw:
                with client_context(ca).wrap_socket(raw, server_hostname="127.0.0.1") as s:
                    s.sendall(upgrade_request("/ws/generic/echo.tls") + frames)
                    reader = Reader(lambda: s.recv(65536))
                    head = b""
                    while b"\r\n\r\n" not in head:
                        head += s.recv(1)
                    assert head.startswith(b"HTTP/1.1 101")
                    echoed = []
                    for _ in big:
                        answer = reader.next()
                        assert answer is not None
                        echoed.append(answer[1])
                    return echoed

        assert await in_thread(burst) == big


def test_an_upstream_ca_file_that_cannot_serve_is_refused_at_start(
    pems: dict[str, str], tmp_path: Path
) -> None:
    missing = config(pems, "wss://bot.internal/ws", upstream_ca_file=str(tmp_path / "no.pem"))
    with pytest.raises(wsgate.ConfigError, match=r"^upstream_ca_file: cannot read"):
        Gateway(missing)
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(wsgate.ConfigError, match="upstream_ca_file holds no certificate"):
        Gateway(config(pems, "wss://bot.internal/ws", upstream_ca_file=str(junk)))


def test_wsgate_start_with_an_unreadable_ca_file_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli_main(["start", "--url", "https://127.0.0.1:9", "--agent", "echo",
                     "--key", "pk_tls", "--ca-file", str(tmp_path / "no.pem")])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("wsgate: --ca-file:") and err.count("\n") == 1
