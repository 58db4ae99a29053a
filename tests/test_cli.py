"""``wsgate serve`` as a user runs it: a real subprocess, driven through its output and its port.

Synchronisation is on events only: a line the process prints (read by a thread into a queue,
waited for with a timeout), a socket answer, or the process's exit.
"""

from __future__ import annotations

import errno
import re
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .helpers import closed_with, connect
from .processes import TIMEOUT, Wsgate, port_of


@pytest.fixture
def run() -> Iterator[type[Wsgate]]:
    """Start ``wsgate`` processes with ``run(*args)``; each is killed at the end if still alive."""
    started: list[Wsgate] = []

    class Started(Wsgate):
        def __init__(self, *args: str) -> None:
            super().__init__(*args)
            started.append(self)

    yield Started
    for process in started:
        process.kill()


def test_serve_with_no_config_announces_its_url_and_echo_demo_echoes(
    run: type[Wsgate], backend: str
) -> None:
    gateway = run("serve", "--port", "0", "--backend", backend)
    url = gateway.url()
    assert re.fullmatch(r"ws://127\.0\.0\.1:\d+", url) and port_of(url) > 0
    gateway.expect(re.escape(f"python -m websockets {url}/ws/generic/echo.demo"))
    with connect(f"{url}/ws/generic/echo.demo") as ws:
        ws.send("hello")
        assert ws.recv(TIMEOUT) == "hello"
        ws.send(b"\x00\xffbinary")
        assert ws.recv(TIMEOUT) == b"\x00\xffbinary"
    gateway.proc.send_signal(signal.SIGINT)
    code, _ = gateway.finish()
    assert code == 0


@pytest.mark.slow
def test_sigterm_drains_then_closes_the_open_session_1001_and_exits_0(
    run: type[Wsgate], backend: str, tmp_path: Path
) -> None:
    drain = 1.5
    config = tmp_path / "wsgate.toml"
    config.write_text(
        f"[gateway]\nport = 0\ndrain_timeout = {drain}\n"
        '[[org]]\nname = "demo"\n'
        '[[agent]]\nname = "echo"\norg = "demo"\nbuiltin = "echo"\n'
    )
    gateway = run("serve", "--config", str(config), "--backend", backend)
    url = gateway.url()
    with connect(f"{url}/ws/generic/echo.demo") as ws:
        ws.send("before")
        assert ws.recv(TIMEOUT) == "before"
        signalled = time.monotonic()
        gateway.proc.send_signal(signal.SIGTERM)
        # Logged once the listener is closed and the drain has begun.
        gateway.expect(r"draining 1 connection", stream="stderr")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port_of(url)), timeout=TIMEOUT).close()
        # The live session keeps working while the drain lasts...
        ws.send("during the drain")
        assert ws.recv(TIMEOUT) == "during the drain"
        # ...and is closed with 1001 once drain_timeout has passed.
        close = closed_with(ws.recv, TIMEOUT)
        waited = time.monotonic() - signalled
    assert close == (1001, "gateway shutting down")
    assert drain - 0.1 <= waited < drain + 5
    code, _ = gateway.finish()
    assert code == 0


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("[gateway]\nport = 'eighty'\n", "port must be an integer"),
        ("[gateway]\nprot = 8765\n", "unknown key 'prot'"),
        ("[gateway]\ndrain_timeout = -1\n", "drain_timeout must be a number of seconds > 0"),
        ("[gateway\n", "not valid TOML"),
        ('[[agent]]\nname = "a"\norg = "nowhere"\nbuiltin = "echo"\n', "unknown org 'nowhere'"),
    ],
    ids=["wrong type", "unknown key", "bad value", "not toml", "unknown org"],
)
def test_a_bad_config_file_exits_2_with_one_line_naming_the_problem(
    run: type[Wsgate], tmp_path: Path, text: str, named: str
) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(text)
    code, stderr = run("serve", "--config", str(config)).finish()
    assert code == 2
    assert len(stderr.splitlines()) == 1, stderr
    assert stderr.startswith(f"wsgate: {config}: ") and named in stderr


def test_a_missing_config_file_exits_2_naming_the_file(run: type[Wsgate], tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    code, stderr = run("serve", "--config", str(missing)).finish()
    assert code == 2
    assert len(stderr.splitlines()) == 1 and f"{missing}: cannot read" in stderr


def test_a_secrets_file_without_a_secret_exits_2_with_one_line(
    run: type[Wsgate], tmp_path: Path
) -> None:
    secrets = tmp_path / "secrets"
    secrets.write_text("# only a comment: the placeholder a deployment ships\n")
    config = tmp_path / "wsgate.toml"
    config.write_text(
        f'[gateway]\nsecrets_file = "{secrets}"\n[[org]]\nname = "o"\n'
        '[[agent]]\nname = "a"\norg = "o"\nwebsocket_auth = "token"\nbuiltin = "echo"\n'
    )
    code, stderr = run("serve", "--config", str(config)).finish()
    assert code == 2
    assert stderr.strip() == f"wsgate: secrets_file {secrets}: no secret given"


def test_a_port_in_use_exits_1_naming_the_address(run: type[Wsgate], backend: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, stderr = run("serve", "--port", str(port), "--backend", backend).finish()
    assert code == 1
    assert f"wsgate: cannot listen on 127.0.0.1:{port}" in stderr
    assert "address already in use" in stderr.lower() or str(errno.EADDRINUSE) in stderr
