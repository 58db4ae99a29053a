"""A real ``redis-server`` for tests and benches: on 127.0.0.1, in a temporary directory, no
persistence. Readiness is read from its own log line, not guessed with sleeps."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import pytest

REDIS_SERVER = shutil.which("redis-server") or shutil.which("valkey-server")
requires_redis = pytest.mark.skipif(
    REDIS_SERVER is None,
    reason="redis-server not installed (apt-get install -y redis-server; .ci/run does it)",
)


def free_port() -> int:
    """A port that was free a moment ago (redis-server cannot bind port 0 and report it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One redis-server process; :meth:`stop` and :meth:`start` again keep its port."""

    def __init__(self, directory: Path, *, password: str | None = None) -> None:
        self.directory = directory
        self.password = password
        self.port = free_port()
        self._process: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}"

    def start(self) -> None:
        assert REDIS_SERVER is not None
        args = [
            REDIS_SERVER,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "no",
            "--logfile", "",
            "--daemonize", "no",
        ]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
        self._process = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert self._process.stdout is not None
        log: list[str] = []
        for line in self._process.stdout:
            log.append(line)
            if "Ready to accept connections" in line:
                return
        self._process.wait()
        raise RuntimeError("redis-server did not start:\n" + "".join(log[-20:]))

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(10)
            assert self._process.stdout is not None
            self._process.stdout.close()
            self._process = None
