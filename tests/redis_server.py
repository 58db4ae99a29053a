"""A real ``redis-server`` for tests and benches: on 127.0.0.1, in a temporary directory, no
persistence. Readiness is read from its own log line, not guessed with sleeps."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
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
    """One redis-server process; :meth:`stop` and :meth:`start` again keep its port.

    ``password``: ``requirepass``; ``tls``: (CA, certificate, key) PEM files, and then the port
    speaks only TLS; ``replicaof``: the port of a primary on 127.0.0.1 (the same password)."""

    def __init__(
        self,
        directory: Path,
        *,
        password: str | None = None,
        tls: tuple[Path, Path, Path] | None = None,
        replicaof: int | None = None,
    ) -> None:
        self.directory = directory
        self.password = password
        self.tls = tls
        self.replicaof = replicaof
        self.port = free_port()
        self._process: subprocess.Popen[str] | None = None
        self._drainer: threading.Thread | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.tls is not None:
            return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={self.tls[0]}"
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
            "--repl-diskless-sync-delay", "0",  # a replica syncs at once, not after 5 s
        ]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password, "--masterauth", self.password]
        if self.tls is not None:
            ca, cert, key = self.tls
            args += ["--port", "0", "--tls-port", str(self.port), "--tls-auth-clients", "no"]
            args += ["--tls-ca-cert-file", str(ca), "--tls-cert-file", str(cert)]
            args += ["--tls-key-file", str(key)]
        if self.replicaof is not None:
            args += ["--replicaof", "127.0.0.1", str(self.replicaof)]
        self._run(args, "Ready to accept connections")

    def _run(self, args: list[str], ready: str) -> None:
        self._process = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert self._process.stdout is not None
        log: list[str] = []
        for line in self._process.stdout:
            log.append(line)
            if ready in line:
                # Keep reading its log, or the server blocks once the pipe is full.
                self._drainer = threading.Thread(target=self._drain, daemon=True)
                self._drainer.start()
                return
        self._process.wait()
        raise RuntimeError(f"{args[0]} did not start:\n" + "".join(log[-20:]))

    def _drain(self) -> None:
        process = self._process
        assert process is not None and process.stdout is not None
        for _ in process.stdout:
            pass

    def info(self, section: str) -> str:
        """``INFO <section>`` (plain TCP, no password)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
            s.sendall(f"INFO {section}\r\n".encode())
            data = b""
            while b"\r\n" not in data or len(data) < _bulk_end(data):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        return data.decode(errors="replace")

    def wait_synced(self, timeout: float = 20) -> None:
        """Until this replica's link to its primary is up (its first full sync done)."""
        deadline = time.monotonic() + timeout
        while "master_link_status:up" not in self.info("replication"):
            if time.monotonic() > deadline:
                raise RuntimeError("the replica did not sync with its primary")
            time.sleep(0.05)

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._finish()

    def kill(self) -> None:
        """SIGKILL: no shutdown, no goodbye to its replicas."""
        if self._process is not None:
            self._process.kill()
            self._finish()

    def _finish(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        self._process.wait(10)
        if self._drainer is not None:
            self._drainer.join(10)  # at the end of its output now
            self._drainer = None
        self._process.stdout.close()
        self._process = None


def _bulk_end(data: bytes) -> int:
    # "$<length>\r\n<payload>\r\n": where a whole bulk string ends.
    head, _, _ = data.partition(b"\r\n")
    return len(head) + 2 + int(head[1:]) + 2 if head.startswith(b"$") else 0


class RedisSentinel(RedisServer):
    """A Sentinel (``redis-server --sentinel``) watching the primary on ``primary_port`` as
    ``service``, with a quorum of 1 and a one-second down-after: a failover takes ~2 s."""

    def __init__(self, directory: Path, primary_port: int, service: str = "wsgate") -> None:
        super().__init__(directory)
        self.primary_port = primary_port
        self.service = service

    def start(self) -> None:
        assert REDIS_SERVER is not None
        config = self.directory / f"sentinel-{self.port}.conf"
        config.write_text(
            f"port {self.port}\n"
            "bind 127.0.0.1\n"
            f"sentinel monitor {self.service} 127.0.0.1 {self.primary_port} 1\n"
            f"sentinel down-after-milliseconds {self.service} 1000\n"
            f"sentinel failover-timeout {self.service} 5000\n"
        )
        self._run([REDIS_SERVER, str(config), "--sentinel"], "+monitor")
