"""Faults on real processes and real sockets: a gateway process sent SIGTERM with 1,000 live
sessions or holding 3,000 idle connections, an upstream bot process killed mid-session, and a
peer that vanishes without a FIN (a veth link taken down under a live session, in a network
namespace).

Redis going away and coming back is in ``test_token_gateway.py``
(``test_two_gateway_processes_sharing_redis_refuse_a_token_used_at_the_other``); an upstream that
accepts TCP and never answers its upgrade is in ``test_bad_requests.py``.

Synchronisation is on events only: a line a process prints, a socket answer, a process exit.
"""

from __future__ import annotations

import os
import re
import resource
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed

from .helpers import (
    Bot,
    RawUpstream,
    accept_upgrade,
    close_payload,
    closed_with,
    connect,
    engine_opens,
    frame,
    in_thread,
    serving,
    upgrade_refused,
    upgrade_request,
)
from .processes import TIMEOUT, Wsgate, port_of

# --------------------------------------------------------------------------------------------
# Raw WebSocket clients, many at once, driven by one selector (no thread per session)


def take_frames(buf: bytearray) -> list[tuple[int, bytes]]:
    """Remove the complete (unmasked, server) frames at the start of ``buf``."""
    frames = []
    while len(buf) >= 2:
        n, at = buf[1] & 0x7F, 2
        if n == 126:
            if len(buf) < 4:
                break
            n, at = struct.unpack("!H", buf[2:4])[0], 4
        elif n == 127:
            if len(buf) < 10:
                break
            n, at = struct.unpack("!Q", buf[2:10])[0], 10
        if len(buf) < at + n:
            break
        frames.append((buf[0] & 0x0F, bytes(buf[at : at + n])))
        del buf[: at + n]
    return frames


@dataclass
class Closed:
    """How a raw session ended: the close frame's code and reason (None: EOF without one),
    and when it arrived."""

    code: int | None
    reason: str
    at: float


def readable(sel: selectors.BaseSelector, awaited: str) -> list[socket.socket]:
    """The sockets of ``sel`` ready to read within ``TIMEOUT``; fails naming what was
    ``awaited`` if none is."""
    events = sel.select(TIMEOUT)
    assert events, f"{awaited} after {TIMEOUT} s"
    ready = [key.fileobj for key, _ in events]
    assert all(isinstance(s, socket.socket) for s in ready)
    return ready  # type: ignore[return-value]


def open_sessions(port: int, n: int, path: str, window: int = 100) -> list[socket.socket]:
    """Open ``n`` WebSocket sessions, at most ``window`` upgrades in flight; fail on any answer
    other than 101."""
    sel = selectors.DefaultSelector()
    heads: dict[socket.socket, bytes] = {}
    opened: list[socket.socket] = []
    todo = n
    while todo or heads:
        while todo and len(heads) < window:
            s = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
            s.sendall(upgrade_request(path))
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ)
            heads[s] = b""
            todo -= 1
        for s in readable(sel, f"{len(heads)} upgrades unanswered"):
            data = s.recv(4096)
            assert data, "the gateway closed a connection during its upgrade"
            heads[s] += data
            if b"\r\n\r\n" in heads[s]:
                head, _, rest = heads.pop(s).partition(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 101"), head
                assert not rest
                sel.unregister(s)
                opened.append(s)
    sel.close()
    return opened


def echo_each(socks: list[socket.socket], tag: str) -> None:
    """Send each session its own text and check that exactly that comes back (no cross-talk)."""
    expected = {s: f"{tag} {i}".encode() for i, s in enumerate(socks)}
    for s, text in expected.items():
        s.sendall(frame(1, text))
    sel = selectors.DefaultSelector()
    bufs = {s: bytearray() for s in socks}
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
    while bufs:
        for s in readable(sel, f"{len(bufs)} echoes missing"):
            data = s.recv(4096)
            assert data, "a session ended while waiting for its echo"
            bufs[s] += data
            frames = take_frames(bufs[s])
            if frames:
                assert frames == [(1, expected[s])]
                del bufs[s]
                sel.unregister(s)
    sel.close()


def await_closes(
    socks: list[socket.socket], timeout: float, *, answer: bool = True
) -> dict[socket.socket, Closed]:
    """Read every session concurrently until the gateway's close frame, then on to its EOF, and
    close the socket, as a client does; data frames are ignored. With ``answer``, the close is
    answered with the same code (the gateway started the close); without, it is the reply to
    ours."""
    sel = selectors.DefaultSelector()
    bufs = {s: bytearray() for s in socks}
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
    ended: dict[socket.socket, Closed] = {}
    deadline = time.monotonic() + timeout
    while sel.get_map() and (left := deadline - time.monotonic()) > 0:
        for key, _ in sel.select(left):
            ready = key.fileobj
            assert isinstance(ready, socket.socket)
            s = ready
            try:
                data = s.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:  # the gateway closed the connection: so do we
                ended.setdefault(s, Closed(None, "", time.monotonic()))
                sel.unregister(s)
                s.close()
                continue
            bufs[s] += data
            for opcode, payload in take_frames(bufs[s]):
                if opcode == 8 and s not in ended:
                    code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                    ended[s] = Closed(code, payload[2:].decode(), time.monotonic())
                    if answer and code is not None:
                        s.sendall(frame(8, close_payload(code)))
    sel.close()
    return ended


# --------------------------------------------------------------------------------------------
# SIGTERM with 1,000 live sessions


@pytest.fixture
def many_files() -> Iterator[None]:
    """Thousands of raw connections need as many descriptors here: soft limit up to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4096:
        pytest.skip(f"the open-files hard limit is {hard}; this test needs 4096")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


SESSIONS = 1000
DRAIN = 3.0


@pytest.mark.slow
def test_sigterm_with_1000_sessions_refuses_new_ones_drains_closes_the_rest_1001_exits_0(
    backend: str, tmp_path: Path, many_files: None
) -> None:
    config = tmp_path / "wsgate.toml"
    config.write_text(
        f"[gateway]\nport = 0\ndrain_timeout = {DRAIN}\n"
        '[[org]]\nname = "demo"\n'
        f'[[agent]]\nname = "echo"\norg = "demo"\nbuiltin = "echo"\nmax_sessions = {SESSIONS}\n'
    )
    gateway = Wsgate("serve", "--config", str(config), "--backend", backend)
    socks: list[socket.socket] = []
    try:
        port = port_of(gateway.url())
        socks = open_sessions(port, SESSIONS, "/ws/generic/echo.demo")
        echo_each(socks, "before")

        signalled = time.monotonic()
        gateway.proc.send_signal(signal.SIGTERM)
        # Logged once the listener is closed and the drain has begun.
        gateway.expect(rf"draining {SESSIONS} connection", stream="stderr")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT).close()

        # Half the sessions go on working during the drain, then finish on their own...
        finishing, idle = socks[::2], socks[1::2]
        echo_each(finishing, "during the drain")
        for s in finishing:
            s.sendall(frame(8, close_payload(1000)))
        finished = await_closes(finishing, TIMEOUT, answer=False)
        assert Counter(c.code for c in finished.values()) == {1000: len(finishing)}
        # ...the other half is closed by the gateway with 1001 once drain_timeout has passed.
        gateway.expect(rf"closing {len(idle)} connection\(s\) with 1001", stream="stderr")
        closed = await_closes(idle, DRAIN + TIMEOUT)
        assert len(closed) == len(idle)
        reasons = Counter((c.code, c.reason) for c in closed.values())
        assert reasons == {(1001, "gateway shutting down"): len(idle)}
        waited = [c.at - signalled for c in closed.values()]
        assert DRAIN - 0.1 <= min(waited) and max(waited) < DRAIN + 5, (min(waited), max(waited))

        code, rest = gateway.finish()
        assert code == 0
        logged = "\n".join([*gateway.seen, rest])
        assert len(re.findall(r"session \d+ echo\.demo \S+ ended by", logged)) == SESSIONS
    finally:
        gateway.kill()
        for s in socks:
            s.close()


@pytest.mark.slow
def test_3000_idle_connections_do_not_stop_a_real_session_from_opening_with_default_limits(
    backend: str, many_files: None
) -> None:
    # The embedded default settings: max_pending_upgrades = 1000, handshake_timeout = 10 s.
    gateway = Wsgate("serve", "--port", "0", "--backend", backend)
    idle: list[socket.socket] = []
    try:
        url = gateway.url()
        for _ in range(3000):  # connected, then silent: never a byte of an upgrade request
            idle.append(socket.create_connection(("127.0.0.1", port_of(url)), timeout=TIMEOUT))
        started = time.monotonic()
        with connect(f"{url}/ws/generic/echo.demo") as ws:
            ws.send("legit")
            assert ws.recv(TIMEOUT) == "legit"
        # Served at once, not once they time out: the idle ones hold 3,000 of max_connections'
        # 10,000 places, and a full gateway would make the oldest give way to a newcomer.
        assert time.monotonic() - started < 10
    finally:
        gateway.kill()
        for s in idle:
            s.close()


#: The open-files limit of the gateway out of descriptors: a few dozen left for connections.
FEW_FILES = 64


def test_out_of_descriptors_accepting_pauses_then_serves_again_once_sessions_end(
    backend: str, tmp_path: Path
) -> None:
    config = tmp_path / "wsgate.toml"
    config.write_text(
        '[gateway]\nport = 0\n[[org]]\nname = "demo"\n'
        f'[[agent]]\nname = "echo"\norg = "demo"\nbuiltin = "echo"\nmax_sessions = {FEW_FILES}\n'
    )
    gateway = Wsgate("serve", "--config", str(config), "--backend", backend, max_files=FEW_FILES)
    socks: list[socket.socket] = []
    try:
        url = gateway.url()
        # More upgrades than the gateway has descriptors left: its accept runs out.
        for _ in range(FEW_FILES):
            s = socket.create_connection(("127.0.0.1", port_of(url)), timeout=TIMEOUT)
            s.sendall(upgrade_request("/ws/generic/echo.demo"))
            socks.append(s)
        gateway.expect(r"accept failed \(Too many open files\); pausing 100 ms", stream="stderr")
        for s in socks:
            s.close()
        # Their descriptors given back, the gateway accepts again (it did not end).
        with connect(f"{url}/ws/generic/echo.demo") as ws:
            ws.send("after")
            assert ws.recv(TIMEOUT) == "after"
        assert gateway.proc.poll() is None
    finally:
        gateway.kill()
        for s in socks:
            s.close()


# --------------------------------------------------------------------------------------------
# An upstream bot process that crashes mid-session

BOT_PROCESS = """
import sys
from websockets.sync.server import serve

def echo(ws):
    for message in ws:
        ws.send(message)

with serve(echo, sys.argv[1], 0, compression=None, ping_interval=None) as server:
    print(server.socket.getsockname()[1], flush=True)
    server.serve_forever()
"""


class BotProcess:
    """A ``websockets`` echo server in its own Python process (optionally run under a prefix
    such as ``ip netns exec NS``); the URL once it listens."""

    def __init__(self, host: str = "127.0.0.1", prefix: tuple[str, ...] = ()) -> None:
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-c", BOT_PROCESS, host],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # the port, once it listens (EOF if it died)
        assert line.strip().isdigit(), f"the bot process did not start: {line!r}"
        self.url = f"ws://{host}:{int(line)}/ws"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(TIMEOUT)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


@pytest.mark.anyio
async def test_an_upstream_bot_process_killed_mid_session_makes_the_client_get_1011() -> None:
    bot = BotProcess()
    try:
        async with serving(bot.url) as gw:

            def client() -> tuple[tuple[int, str], tuple[int, str]]:
                with (
                    connect(f"{gw.url}/ws/generic/bot.test") as doomed,
                    connect(f"{gw.url}/ws/generic/echo.test") as bystander,
                ):
                    doomed.send("before the crash")
                    assert doomed.recv(TIMEOUT) == "before the crash"
                    bot.kill()  # SIGKILL: no close frame, the kernel ends its connections
                    code, reason = closed_with(doomed.recv, TIMEOUT)
                    # Another session is untouched, and the dead bot is now unreachable (502).
                    bystander.send("unaffected")
                    assert bystander.recv(TIMEOUT) == "unaffected"
                    refused = upgrade_refused(f"{gw.url}/ws/generic/bot.test")
                return (code, reason), refused

            assert await in_thread(client) == (
                (1011, "bot lost"),
                (502, "bot unreachable: connection refused\n"),
            )
    finally:
        bot.kill()


# --------------------------------------------------------------------------------------------
# A peer that vanishes without a FIN: a veth link to a network namespace taken down

IP = shutil.which("ip")
DEAD_PEER_TIMEOUT = 2.0
# Detection is bounded by dead_peer_timeout after the last ACK from the peer (keepalive probes
# start at half of it); the bound adds a second dead_peer_timeout and slack for a loaded machine.
DETECTION_BOUND = 2 * DEAD_PEER_TIMEOUT + 2.0


def _ip(*args: str) -> None:
    assert IP is not None
    subprocess.run([IP, *args], check=True, capture_output=True, timeout=TIMEOUT)


@dataclass
class Namespace:
    """A network namespace joined to this one by a veth pair: ``host`` is our address,
    ``peer`` the namespace's; :meth:`vanish` takes the namespace's end down, so from then on
    everything sent to ``peer`` is dropped silently, as for a peer whose power was cut."""

    name: str
    link: str
    host: str
    peer: str

    @property
    def prefix(self) -> tuple[str, ...]:
        assert IP is not None
        return (IP, "netns", "exec", self.name)

    def vanish(self) -> None:
        _ip("-n", self.name, "link", "set", self.link, "down")


@pytest.fixture
def namespace() -> Iterator[Namespace]:
    if os.geteuid() != 0:
        pytest.skip("needs root to create a network namespace and a veth pair")
    if IP is None:
        pytest.skip("needs the `ip` command (iproute2)")
    tag = os.getpid() % 100000
    name, ours, theirs = f"wsgate-faults-{tag}", f"wsgf{tag}a", f"wsgf{tag}b"
    subnet = f"10.{213 + tag % 40}.{tag // 40 % 250}"
    ns = Namespace(name, theirs, f"{subnet}.1", f"{subnet}.2")
    try:
        _ip("netns", "add", name)
        _ip("link", "add", ours, "type", "veth", "peer", "name", theirs, "netns", name)
        _ip("addr", "add", f"{ns.host}/30", "dev", ours)
        _ip("link", "set", ours, "up")
        _ip("-n", name, "addr", "add", f"{ns.peer}/30", "dev", theirs)
        _ip("-n", name, "link", "set", theirs, "up")
        _ip("-n", name, "link", "set", "lo", "up")
    except subprocess.CalledProcessError as exc:
        subprocess.run([IP, "netns", "del", name], capture_output=True)
        pytest.skip(f"cannot build a veth pair into a namespace here: {exc.stderr.strip()}")
    try:
        yield ns
    finally:
        # Deleting the namespace's last reference destroys its veth end, and with it ours.
        subprocess.run([IP, "netns", "del", name], capture_output=True)
        subprocess.run([IP, "link", "del", ours], capture_output=True)


CLIENT_PROCESS = """
import sys
from websockets.sync.client import connect

with connect(sys.argv[1], compression=None, ping_interval=None) as ws:
    ws.send("hello")
    assert ws.recv(10) == "hello"
    print("ready", flush=True)
    sys.stdin.read()  # holds the session until the test ends
"""


@pytest.mark.slow
@pytest.mark.anyio
async def test_a_client_that_vanishes_without_a_fin_is_detected_and_the_bot_gets_1001(
    bot: Bot, namespace: Namespace
) -> None:
    async with serving(bot.url, host=namespace.host, dead_peer_timeout=DEAD_PEER_TIMEOUT) as gw:
        with subprocess.Popen(
            [*namespace.prefix, sys.executable, "-c", CLIENT_PROCESS,
             f"{gw.url}/ws/generic/bot.test"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        ) as client:  # fmt: skip
            try:
                assert client.stdout is not None
                assert await in_thread(client.stdout.readline) == "ready\n"
                vanished = time.monotonic()
                namespace.vanish()
                await in_thread(bot.wait_ended, 1, DETECTION_BOUND + TIMEOUT)
                detected = time.monotonic() - vanished
            finally:
                client.kill()
    print(f"client vanished; the bot got its close {detected:.2f} s later")
    assert bot.sessions[0].messages == ["hello"]
    assert bot.sessions[0].close == (1001, "client gone")
    # Not at once (nothing told the gateway), and within the bound.
    assert 0.5 <= detected <= DETECTION_BOUND, detected


@pytest.mark.slow
@pytest.mark.anyio
async def test_a_bot_that_vanishes_without_a_fin_is_detected_and_the_client_gets_1011(
    namespace: Namespace,
) -> None:
    bot = BotProcess(namespace.peer, prefix=namespace.prefix)
    try:
        async with serving(bot.url, host=namespace.host, dead_peer_timeout=DEAD_PEER_TIMEOUT) as gw:

            def client() -> tuple[int, str, float]:
                with connect(f"{gw.url}/ws/generic/bot.test", ping_interval=None) as ws:
                    ws.send("hello")
                    assert ws.recv(TIMEOUT) == "hello"
                    vanished = time.monotonic()
                    namespace.vanish()
                    code, reason = closed_with(ws.recv, DETECTION_BOUND + TIMEOUT)
                    detected = time.monotonic() - vanished
                return code, reason, detected

            code, reason, detected = await in_thread(client)
    finally:
        bot.kill()
    print(f"bot vanished; the client got its close {detected:.2f} s later")
    assert (code, reason) == (1011, "bot lost")
    assert 0.5 <= detected <= DETECTION_BOUND, detected


class NotReading(RawUpstream):
    """A bot on loopback that answers the upgrade, then hangs: it never reads again (a
    deadlock, a stopped process), so the gateway's writes fill its window."""

    def __init__(self) -> None:
        self.release = threading.Event()
        super().__init__()

    def session(self, conn: socket.socket) -> None:
        accept_upgrade(conn)
        self.release.wait(4 * TIMEOUT)


@pytest.mark.slow
@pytest.mark.anyio
@engine_opens
async def test_a_bot_on_loopback_that_stops_reading_is_detected_and_the_client_gets_1011(
    engine_opens: bool,
) -> None:
    # Keepalive is not set towards a loopback bot (its own kernel would answer the probes);
    # TCP_USER_TIMEOUT is, and it ends a connection whose unread data waits past it.
    bot = NotReading()
    settings = {"engine_opens": engine_opens, "dead_peer_timeout": DEAD_PEER_TIMEOUT}
    try:
        async with serving(bot.url, **settings) as gw:

            def client() -> tuple[int | None, str | None, float]:
                with connect(f"{gw.url}/ws/generic/bot.test", ping_interval=None) as ws:
                    ws.socket.settimeout(DETECTION_BOUND + TIMEOUT)  # a send stuck: an error
                    started = time.monotonic()
                    with pytest.raises(ConnectionClosed):
                        while True:
                            ws.send(b"x" * 65536)
                    return ws.close_code, ws.close_reason, time.monotonic() - started

            code, reason, detected = await in_thread(client)
    finally:
        bot.release.set()
    print(f"bot stopped reading; the client got its close {detected:.2f} s after it began")
    assert (code, reason) == (1011, "bot lost")
    assert detected <= DETECTION_BOUND, detected
