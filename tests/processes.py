"""``python -m wsgate`` as a real process, for tests: its output lines read into queues."""

from __future__ import annotations

import queue
import re
import resource
import subprocess
import sys
import threading
import time
from typing import IO

import pytest

TIMEOUT = 20.0


class Wsgate:
    """A ``python -m wsgate`` process whose stdout and stderr lines are read into queues."""

    def __init__(self, *args: str, max_files: int | None = None) -> None:
        """``max_files``: the process's limit of open files, if not the test's own (its hard
        limit too: ``wsgate serve`` raises its soft limit to the hard one)."""

        def limit_files() -> None:
            if max_files is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (max_files, max_files))

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "wsgate", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=limit_files,
        )
        self.stdout: queue.Queue[str | None] = queue.Queue()
        self.stderr: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        for stream, lines in ((self.proc.stdout, self.stdout), (self.proc.stderr, self.stderr)):
            assert stream is not None
            threading.Thread(target=self._pump, args=(stream, lines), daemon=True).start()

    @staticmethod
    def _pump(stream: IO[str], lines: queue.Queue[str | None]) -> None:
        for line in stream:
            lines.put(line.rstrip("\n"))
        lines.put(None)  # end of the stream

    def expect(self, pattern: str, *, stream: str = "stdout") -> re.Match[str]:
        """Wait for a line of ``stream`` matching ``pattern``; fail on EOF or timeout."""
        lines = self.stdout if stream == "stdout" else self.stderr
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"no line matching {pattern!r} within {TIMEOUT} s; saw {self.seen}")
            if line is None:
                pytest.fail(f"wsgate exited before printing {pattern!r}; saw {self.seen}")
            self.seen.append(line)
            match = re.search(pattern, line)
            if match:
                return match

    def url(self) -> str:
        """The URL the process announces once it is listening."""
        return self.expect(r"^wsgate serving on (wss?://\S+)$")[1]

    def finish(self) -> tuple[int, str]:
        """Wait for the exit: ``(exit code, rest of stderr)``."""
        code = self.proc.wait(TIMEOUT)
        rest: list[str] = []
        while (line := self.stderr.get(timeout=TIMEOUT)) is not None:
            rest.append(line)
        return code, "\n".join(rest)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(TIMEOUT)
        for stream in (self.proc.stdout, self.proc.stderr):
            assert stream is not None
            stream.close()


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])
