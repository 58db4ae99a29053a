#!/usr/bin/env python3
"""Soak bench: many sessions opened, used and closed in churn through a real wsgate process.

    python benches/soak.py                      # 100,000 sessions, 200 at a time
    python benches/soak.py --sessions 5000      # a short run

What it does (details and figures in benches/README.md, section "Soak bench"):
  1. starts an upstream echo bot: `benches/loadgen echo-server` (built with cargo into
     CARGO_TARGET_DIR, default /tmp/target-loadgen, when missing), or with `--upstream python`
     (or when no cargo is found) a `websockets` echo server in a subprocess;
  2. starts `python -m wsgate serve --config …` relaying one agent to it, its log in a file;
  3. runs `--warmup` sessions, waits until the gateway has logged the end of every one of them,
     samples the gateway's open descriptors (/proc/PID/fd), VmRSS, threads and CPU time; then
     runs the rest, sampling every `--sample-every` s under load, and samples again at the end;
  4. each session (`--concurrency` at once, each a `websockets` client): `--messages` messages,
     text and binary alternately, random sizes up to `--max-size`, each carrying its session and
     message number and checked byte for byte against its echo; then a close with 1000, whose
     reply must be 1000. A session that fails in any way is counted lost (no retries); an echo
     that differs is counted crossed;
  5. checks the gateway's own account: one log line per session, ended by the client with
     1000 both ways and exactly `--messages` messages in and out;
  6. prints the table, and exits 1 if a session was lost or crossed, the log disagrees, or the
     gateway holds more descriptors at the end than after the warm-up.

Nothing here is run by pytest. Needs `pip install .` (or the editable install) and websockets.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from websockets.asyncio.client import connect

HERE = Path(__file__).resolve().parent
LOADGEN_DIR = HERE / "loadgen"
CLK_TCK = os.sysconf("SC_CLK_TCK")
AGENT = "soak.bench"
SESSION_LINE = re.compile(
    r"session (\d+) (\S+) \S+ ended by (\w+) \(([^)]*)\) after [\d.]+ s; "
    r"client close (\S+), bot close (\S+); in (\d+) msgs \d+ B, out (\d+) msgs \d+ B"
)


def log(*a: object) -> None:
    print("[soak]", *a, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# /proc


@dataclass
class Sample:
    """The gateway process at one moment."""

    label: str
    sessions: int  # sessions completed by the clients so far
    fds: int
    rss_kib: int
    threads: int
    cpu_s: float
    at_s: float  # since the start of the run


def status_field(pid: int, name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    raise KeyError(name)


def cpu_seconds(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime, all threads


def sample(pid: int, label: str, sessions: int, t0: float) -> Sample:
    return Sample(
        label=label,
        sessions=sessions,
        fds=len(os.listdir(f"/proc/{pid}/fd")),
        rss_kib=status_field(pid, "VmRSS"),
        threads=status_field(pid, "Threads"),
        cpu_s=round(cpu_seconds(pid), 2),
        at_s=round(time.monotonic() - t0, 1),
    )


# --------------------------------------------------------------------------------------------
# the upstream echo bot and the gateway

PYTHON_ECHO = """
import asyncio
from websockets.asyncio.server import serve

async def echo(ws):
    async for message in ws:
        await ws.send(message)

async def main():
    async with serve(echo, "127.0.0.1", 0, compression=None, max_size=None,
                     ping_interval=None) as server:
        print("listening", server.sockets[0].getsockname()[1], flush=True)
        await asyncio.get_running_loop().create_future()

asyncio.run(main())
"""


def loadgen_exe() -> Path | None:
    """benches/loadgen, built if needed; None when it cannot be (no cargo)."""
    target = Path(os.environ.get("CARGO_TARGET_DIR", "/tmp/target-loadgen"))
    exe = target / "release" / "loadgen"
    if not exe.exists():
        cargo = shutil.which("cargo")
        if cargo is None:
            return None
        log(f"building loadgen (CARGO_TARGET_DIR={target})")
        subprocess.run(
            [cargo, "build", "--release", "--quiet", "--manifest-path",
             str(LOADGEN_DIR / "Cargo.toml")],
            check=True, env=dict(os.environ, CARGO_TARGET_DIR=str(target)),
        )  # fmt: skip
    return exe


class Upstream:
    """The echo bot in its own process; `port` once it listens."""

    def __init__(self, kind: str) -> None:
        exe = loadgen_exe() if kind == "loadgen" else None
        if kind == "loadgen" and exe is None:
            log("no cargo to build loadgen: using the Python echo upstream")
        if exe is not None:
            args = [str(exe), "echo-server", "--port", "0"]
            self.name = "loadgen echo-server (Rust, 1 thread)"
        else:
            args = [sys.executable, "-c", PYTHON_ECHO]
            self.name = "websockets echo server (Python, asyncio)"
        self.proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("listening "):
            raise SystemExit(f"the upstream did not start: {line!r}")
        self.port = int(line.split()[1])

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class GatewayProcess:
    """`python -m wsgate serve` relaying AGENT to the upstream; its log goes to `log_path`."""

    def __init__(self, upstream_port: int, backend: str, concurrency: int, workdir: Path) -> None:
        config = workdir / "wsgate.toml"
        name, org = AGENT.split(".")
        config.write_text(
            "[gateway]\nport = 0\ndrain_timeout = 5\n"
            f'[[org]]\nname = "{org}"\n'
            f'[[agent]]\nname = "{name}"\norg = "{org}"\n'
            f'upstream = "ws://127.0.0.1:{upstream_port}/ws"\n'
            f"max_sessions = {concurrency * 2 + 100}\n"
        )
        self.log_path = workdir / "wsgate.log"
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "wsgate", "serve", "--config", str(config),
             "--backend", backend],
            stdout=subprocess.PIPE, stderr=self._log, text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        match = re.match(r"wsgate serving on (ws://\S+)", line)
        if match is None:
            raise SystemExit(f"wsgate did not start: {line!r}; see {self.log_path}")
        self.url = f"{match[1]}/ws/generic/{AGENT}"
        self.pid = self.proc.pid
        self._read = 0
        self.lines: list[re.Match[str]] = []

    def read_log(self) -> None:
        """Parse the session lines logged since the last call."""
        with self.log_path.open() as f:
            f.seek(self._read)
            chunk = f.read()
        complete = chunk[: chunk.rfind("\n") + 1]
        self._read += len(complete.encode())
        self.lines += [m for m in map(SESSION_LINE.search, complete.splitlines()) if m]

    async def until_logged(self, n: int, timeout: float = 60) -> None:
        """Wait until the gateway has logged the end of `n` sessions (its own account that they
        are over: descriptors closed, outcome taken)."""
        deadline = time.monotonic() + timeout
        while True:
            self.read_log()
            if len(self.lines) >= n or time.monotonic() > deadline:
                return
            await asyncio.sleep(0.1)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(30)
        self._log.close()
        return code


# --------------------------------------------------------------------------------------------
# the clients

TEXT = "".join(random.choices("abcdefghijklmnopqrstuvwxyz0123456789", k=1 << 16))


@dataclass
class Tally:
    ok: int = 0
    lost: Counter[str] = field(default_factory=Counter)
    crossed: int = 0
    examples: list[str] = field(default_factory=list)

    @property
    def done(self) -> int:
        return self.ok + sum(self.lost.values()) + self.crossed

    def note(self, what: str) -> None:
        if len(self.examples) < 10:
            self.examples.append(what)


class Crossed(Exception):
    pass


async def one_session(url: str, sid: int, messages: int, max_size: int) -> None:
    rng = random.Random(sid)
    async with connect(
        url, compression=None, max_size=None, ping_interval=None, open_timeout=30,
        close_timeout=30,
    ) as ws:  # fmt: skip
        for k in range(messages):
            tag = f"{sid}:{k}:"
            size = rng.randint(len(tag), max_size)
            if k % 2 == 0:
                start = rng.randrange(len(TEXT) - size)
                sent: str | bytes = tag + TEXT[start : start + size - len(tag)]
            else:
                sent = tag.encode() + rng.randbytes(size - len(tag))
            await ws.send(sent)
            got = await ws.recv()
            if got != sent:
                raise Crossed(f"session {sid} message {k}: sent {sent[:24]!r}, got {got[:24]!r}")
    if ws.close_code != 1000:
        raise ConnectionError(f"close reply {ws.close_code} {ws.close_reason!r}")


async def churn(url: str, first: int, count: int, a: argparse.Namespace, tally: Tally) -> None:
    """Sessions first..first+count-1, `a.concurrency` at a time."""
    ids = iter(range(first, first + count))

    async def worker() -> None:
        for sid in ids:
            try:
                await one_session(url, sid, a.messages, a.max_size)
                tally.ok += 1
            except Crossed as exc:
                tally.crossed += 1
                tally.note(str(exc))
            except Exception as exc:
                tally.lost[type(exc).__name__] += 1
                tally.note(f"session {sid}: {type(exc).__name__}: {exc}")

    await asyncio.gather(*(worker() for _ in range(a.concurrency)))


# --------------------------------------------------------------------------------------------


async def run(a: argparse.Namespace) -> int:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    workdir = Path(tempfile.mkdtemp(prefix="wsgate-soak-"))
    upstream = Upstream(a.upstream)
    gateway = GatewayProcess(upstream.port, a.backend, a.concurrency, workdir)
    log(f"upstream: {upstream.name} on port {upstream.port}; gateway pid {gateway.pid}")
    log(f"{a.sessions} sessions, {a.concurrency} at a time, {a.messages} messages each")
    tally = Tally()
    t0 = time.monotonic()
    samples = [sample(gateway.pid, "before (0 sessions)", 0, t0)]
    exit_code = None
    try:
        warmup = min(a.warmup, a.sessions)
        await churn(gateway.url, 0, warmup, a, tally)
        await gateway.until_logged(tally.done)
        samples.append(sample(gateway.pid, f"after warm-up ({warmup} sessions)", tally.done, t0))
        log(f"warm-up done: {samples[-1]}")

        async def sampler() -> None:
            while True:
                await asyncio.sleep(a.sample_every)
                samples.append(sample(gateway.pid, "under load", tally.done, t0))
                s = samples[-1]
                rate = (s.sessions - warmup) / max(s.at_s - samples[1].at_s, 1e-9)
                log(f"{s.sessions} sessions, {rate:.0f}/s: fds {s.fds}, RSS {s.rss_kib} KiB")

        sampling = asyncio.ensure_future(sampler())
        churn_start = time.monotonic()
        await churn(gateway.url, warmup, a.sessions - warmup, a, tally)
        churn_s = time.monotonic() - churn_start
        sampling.cancel()
        await gateway.until_logged(tally.done)
        samples.append(sample(gateway.pid, f"at the end ({tally.done} sessions)", tally.done, t0))
        wall = time.monotonic() - t0
    finally:
        exit_code = gateway.stop()
        upstream.stop()

    # The gateway's own account of every session.
    gateway.read_log()
    logged = gateway.lines
    ids = Counter(int(m[1]) for m in logged)
    endings = Counter(
        (m[3], m[4], m[5], m[6], int(m[7]) == a.messages == int(m[8])) for m in logged
    )
    clean = endings[("client", "client closed", "1000", "1000", True)]

    warm, end = samples[1], samples[-1]
    peak = max(samples, key=lambda s: s.rss_kib)
    result = {
        "command": " ".join(sys.argv),
        "sessions": a.sessions,
        "concurrency": a.concurrency,
        "messages_per_session": a.messages,
        "upstream": upstream.name,
        "backend": a.backend,
        "ok": tally.ok,
        "lost": dict(tally.lost),
        "crossed": tally.crossed,
        "examples": tally.examples,
        "gateway_logged_sessions": len(logged),
        "gateway_logged_distinct_ids": len(ids),
        "gateway_logged_clean": clean,
        "gateway_endings": {" / ".join(map(str, k)): v for k, v in endings.items()},
        "gateway_exit_code": exit_code,
        "wall_s": round(wall, 1),
        "sessions_per_s": round((a.sessions - warmup) / churn_s, 1) if churn_s else None,
        "gateway_cpu_ms_per_session": round(
            1000 * (end.cpu_s - warm.cpu_s) / max(a.sessions - warmup, 1), 3
        ),
        "fds_growth_after_warmup": end.fds - warm.fds,
        "rss_growth_after_warmup_kib": end.rss_kib - warm.rss_kib,
        "rss_peak_kib": peak.rss_kib,
        "samples": [asdict(s) for s in samples],
    }
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")

    print(f"\n{a.sessions} sessions through wsgate ({a.backend}), {a.concurrency} at a time, "
          f"{a.messages} messages each, upstream: {upstream.name}")  # fmt: skip
    print(f"wall {wall:.0f} s; {result['sessions_per_s']} sessions/s after the warm-up; "
          f"gateway CPU {result['gateway_cpu_ms_per_session']} ms per session")  # fmt: skip
    print("\n| gateway | sessions done | open fds | VmRSS | threads |")
    print("| --- | --- | --- | --- | --- |")
    rows = [samples[0], warm] + ([peak] if peak not in (samples[0], warm, end) else []) + [end]
    for s in rows:
        label = (
            f"peak under load ({s.at_s:.0f} s in)"
            if s is peak and s not in (warm, end)
            else s.label
        )
        print(f"| {label} | {s.sessions} | {s.fds} | {s.rss_kib / 1024:.1f} MiB | {s.threads} |")
    print(f"\nend - after warm-up: fds {end.fds - warm.fds:+d}, "
          f"RSS {(end.rss_kib - warm.rss_kib) / 1024:+.1f} MiB")  # fmt: skip
    print(f"clients: {tally.ok} ok, {sum(tally.lost.values())} lost {dict(tally.lost)}, "
          f"{tally.crossed} crossed")  # fmt: skip
    print(
        f"gateway log: {len(logged)} sessions ({len(ids)} distinct ids), {clean} ended by the "
        f"client with 1000 both ways and {a.messages} messages each way; exit code {exit_code}"
    )
    for e in tally.examples:
        print("  e.g.", e)

    failed = [
        why
        for why, bad in [
            ("sessions lost", sum(tally.lost.values()) > 0),
            ("sessions crossed", tally.crossed > 0),
            ("the gateway's log disagrees", not (clean == len(logged) == len(ids) == a.sessions)),
            ("descriptors grew", end.fds > warm.fds),
            ("the gateway did not exit 0", exit_code != 0),
        ]
        if bad
    ]
    print("\nverdict:", "ok" if not failed else "FAILED: " + ", ".join(failed))
    if not a.keep_log:
        shutil.rmtree(workdir)
    else:
        print(f"gateway log: {gateway.log_path}")
    return 1 if failed else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sessions", type=int, default=100_000)
    ap.add_argument("--concurrency", type=int, default=200)
    ap.add_argument("--messages", type=int, default=4, help="messages per session (default 4)")
    ap.add_argument("--max-size", type=int, default=2048, help="largest message, bytes")
    ap.add_argument("--warmup", type=int, default=2000, help="sessions before the baseline")
    ap.add_argument("--sample-every", type=float, default=10.0, help="seconds between samples")
    ap.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio",
                    help="the gateway's event loop")  # fmt: skip
    ap.add_argument("--upstream", choices=("loadgen", "python"), default="loadgen")
    ap.add_argument("--json", metavar="FILE", help="write every figure and sample here")
    ap.add_argument("--keep-log", action="store_true", help="keep the gateway's log file")
    a = ap.parse_args()
    if a.sessions < 1 or a.concurrency < 1 or a.messages < 1 or a.max_size < 16:
        ap.error("--sessions, --concurrency and --messages must be ≥ 1, --max-size ≥ 16")
    return asyncio.run(run(a))


if __name__ == "__main__":
    sys.exit(main())
