"""Capacity across gateways (wsgate.capacity) and the Redis connection they share with the
replay store (wsgate.redis_store): store URLs, leases against a real redis-server, fallback to
local counting and back, then real gateway processes sharing one Redis (three of them, one
killed with -9, Redis stopped and started), Redis with a password, an ACL user and TLS, and a
Sentinel-managed primary whose process is killed mid-run."""

from __future__ import annotations

import json
import logging
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.redis_server import RedisSentinel, RedisServer, requires_redis
from wsgate import AgentConfig, Config, Gateway, GatewaySettings, OrgConfig
from wsgate.capacity import KEY_PREFIX, LocalCapacity, RedisCapacity, open_capacity
from wsgate.errors import ConfigError, HttpError, StoreUnavailable
from wsgate.redis_store import RedisStore, parse_redis_url

from .helpers import Reader, frame, until, upgrade_request
from .processes import TIMEOUT, Wsgate, port_of

ECHO = "echo.demo"

# --- store URLs ----------------------------------------------------------------------------------


def test_every_store_url_form_parses_and_prints_without_its_password() -> None:
    url = parse_redis_url("redis://alice:pw-1@db.example:6380/2")
    assert (url.hosts, url.db, url.username, url.password, url.tls) == (
        (("db.example", 6380),),
        2,
        "alice",
        "pw-1",
        False,
    )
    assert str(url) == "redis://***@db.example:6380/2"
    assert parse_redis_url("redis://pw-2@h").password == "pw-2"  # a lone userinfo: password
    assert parse_redis_url("valkey://h").hosts == (("h", 6379),)
    tls = parse_redis_url("rediss://:p%40ss@h/0?ssl_ca_certs=/etc/ca.pem")
    assert (tls.tls, tls.ca_file, tls.password, tls.username) == (True, "/etc/ca.pem", "p@ss", None)
    sentinel = parse_redis_url("redis+sentinel://:pw-3@s1,s2:26380,[::1]/mymaster/1")
    assert sentinel.hosts == (("s1", 26379), ("s2", 26380), ("::1", 26379))
    assert (sentinel.service, sentinel.db, sentinel.password) == ("mymaster", 1, "pw-3")
    assert str(sentinel) == "redis+sentinel://***@s1:26379,s2:26380,[::1]:26379/mymaster/1"
    assert parse_redis_url("rediss+sentinel://s/m").tls
    assert "pw" not in repr(url) + repr(sentinel)


@pytest.mark.parametrize(
    "url",
    [
        "http://h",
        "redis://",
        "redis://h/x",
        "redis://h:99999",
        "redis://a,b",  # a host list is for Sentinels only
        "redis+sentinel://s",  # no service name
        "redis://h?ssl_ca_certs=/ca.pem",  # a CA without TLS
        "rediss://h?sslmode=x",
    ],
)
def test_a_malformed_store_url_is_refused_without_echoing_it(url: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_redis_url(url)
    assert url not in str(info.value)


def test_capacity_store_and_lease_ttl_settings() -> None:
    settings = GatewaySettings(capacity_store="redis+sentinel://:pw@s/m", lease_ttl=5)
    assert isinstance(open_capacity(settings), RedisCapacity)
    assert isinstance(open_capacity(GatewaySettings()), LocalCapacity)
    assert "pw" not in repr(settings)
    with pytest.raises(ConfigError, match="capacity_store must be a redis://"):
        GatewaySettings(capacity_store="memory")
    with pytest.raises(ConfigError) as info:
        GatewaySettings(capacity_store="redis://:hidden-pw@h/db")
    assert "hidden-pw" not in str(info.value)
    with pytest.raises(ConfigError, match="lease_ttl"):
        GatewaySettings(capacity_store="redis://h", lease_ttl=0.5)


# --- leases against one redis-server ------------------------------------------------------------


def agent(max_sessions: int) -> AgentConfig:
    return AgentConfig(name="echo", org="demo", builtin="echo", max_sessions=max_sessions)


async def lease_count(store: RedisStore, host: str = ECHO) -> int:
    count = await store.execute("ZCARD", KEY_PREFIX + host)
    assert isinstance(count, int)
    return count


@requires_redis
@pytest.mark.anyio
async def test_leases_hold_max_sessions_across_gateways_sharing_redis(redis: RedisServer) -> None:
    one, two = RedisCapacity(redis.url), RedisCapacity(redis.url)
    probe = RedisStore(redis.url)
    try:
        echo = agent(3)
        held = [await one.acquire(echo), await two.acquire(echo), await one.acquire(echo)]
        for capacity in (one, two):
            with pytest.raises(HttpError, match="agent at capacity") as info:
                await capacity.acquire(echo)
            assert info.value.status == 503
        assert await lease_count(probe) == 3
        assert await probe.execute("ZCARD", KEY_PREFIX + "other.demo") == 0
        assert one.gateway_id != two.gateway_id
        assert all(
            lease is not None and lease.member.startswith(one.gateway_id) for lease in held[::2]
        )
        one.release(held[0])
        await one.sync(renew=False)  # what its background task does as soon as a lease ends
        assert await lease_count(probe) == 2
        assert await two.acquire(echo) is not None
    finally:
        for closing in (one, two, probe):
            await closing.aclose()


@requires_redis
@pytest.mark.anyio
async def test_leases_nobody_renews_leave_within_lease_ttl(redis: RedisServer) -> None:
    dead, alive = RedisCapacity(redis.url, lease_ttl=1), RedisCapacity(redis.url, lease_ttl=1)
    try:
        echo = agent(2)
        await dead.acquire(echo)
        await dead.acquire(echo)  # and then its gateway dies: no renewal, no release
        started = anyio.current_time()

        async def admitted() -> bool:
            try:
                return await alive.acquire(echo) is not None
            except HttpError:
                return False

        await until(admitted, within=2, what="a place freed by leases nobody renews")
        assert anyio.current_time() - started >= 0.9
    finally:
        await dead.aclose()
        await alive.aclose()


@requires_redis
@pytest.mark.anyio
async def test_one_batched_call_renews_every_lease_of_a_gateway(redis: RedisServer) -> None:
    capacity = RedisCapacity(redis.url, lease_ttl=1.5)
    probe = RedisStore(redis.url)
    calls: list[str] = []
    script = capacity._store.script

    async def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs.get("name", "?"))
        return await script(*args, **kwargs)

    capacity._store.script = counting  # type: ignore[method-assign]
    try:
        echo = agent(100)
        for _ in range(40):
            await capacity.acquire(echo)
        async with anyio.create_task_group() as tg:
            await tg.start(capacity.run)
            started = anyio.current_time()

            async def renewed_three_times() -> bool:
                return calls.count("renew") >= 3

            await until(renewed_three_times, within=3, what="three renewals")
            # Past lease_ttl, every lease is still there: renewed, 40 at a time.
            assert anyio.current_time() - started >= 1.5 - 0.1
            assert await lease_count(probe) == 40
            tg.cancel_scope.cancel()
        assert calls.count("acquire") == 40
    finally:
        await capacity.aclose()
        await probe.aclose()


@requires_redis
@pytest.mark.anyio
async def test_a_store_out_of_reach_means_counting_here_then_sharing_again(
    redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    capacity = RedisCapacity(redis.url, lease_ttl=1, timeout=0.5)
    probe = RedisStore(redis.url)
    caplog.set_level(logging.WARNING, logger="wsgate")
    try:
        echo = agent(2)
        await capacity.acquire(echo)
        redis.stop()
        # Admitted: the gateway's own count (Sessions) is the limit now.
        for _ in range(3):
            assert await capacity.acquire(echo) is not None
        assert not capacity.shared
        assert capacity.status is not None and "counted on this gateway" in capacity.status
        warnings = [r for r in caplog.records if "counted on this gateway" in r.getMessage()]
        assert len(warnings) == 1, "said once"
        assert "unreachable" in warnings[0].getMessage()
        redis.start()  # empty: it kept nothing
        async with anyio.create_task_group() as tg:
            await tg.start(capacity.run)

            async def shared() -> bool:
                return capacity.shared

            await until(shared, within=3, what="back to the store")
            tg.cancel_scope.cancel()
        assert capacity.status is None
        # Every live session's lease is back: 4 of 2, so the next one is refused.
        assert await lease_count(probe) == 4
        with pytest.raises(HttpError, match="agent at capacity"):
            await capacity.acquire(echo)
        assert any("is back" in r.getMessage() for r in caplog.records)
    finally:
        await capacity.aclose()
        await probe.aclose()


@pytest.mark.anyio
async def test_a_store_error_names_the_store_and_never_the_password() -> None:
    store = RedisStore(
        f"redis://:pw-secret@127.0.0.1:{_closed_port()}", name="capacity store", timeout=0.3
    )
    with pytest.raises(
        StoreUnavailable, match=r"capacity store 127\.0\.0\.1:\d+ unreachable"
    ) as info:
        await store.execute("PING")
    assert "pw-secret" not in str(info.value)
    await store.aclose()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- gateways in this process: TLS, password, ACL user ------------------------------------------


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[RedisServer]:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    files = (tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem")
    ca.cert_pem.write_to_path(files[0])
    cert.cert_chain_pems[0].write_to_path(files[1])
    cert.private_key_pem.write_to_path(files[2])
    server = RedisServer(tmp_path, password="admin-pw", tls=files)
    server.start()
    yield server
    server.stop()


def token_config(store: str, *, max_sessions: int) -> Config:
    return Config(
        gateway=GatewaySettings(
            port=0,
            secrets=["test-secret"],
            replay_store=store,
            capacity_store=store,
            lease_ttl=3,
        ),
        orgs=[OrgConfig(name="demo", public_keys=["pk_demo"])],
        agents=[
            AgentConfig(
                name="echo",
                org="demo",
                builtin="echo",
                websocket_auth="token",
                max_sessions=max_sessions,
            )
        ],
    )


async def open_session(port: int, path: str) -> tuple[int, socket.socket | None]:
    """An upgrade to ``path``: its status, and the socket if it was 101."""
    return await anyio.to_thread.run_sync(_open_session, port, path)


def _open_session(port: int, path: str, *headers: str) -> tuple[int, socket.socket | None]:
    s = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    s.sendall(upgrade_request(path, *headers))
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(4096)
        if not chunk:
            break
        head += chunk
    status = int(head.split(b" ", 2)[1]) if head else 0
    if status == 101:
        return status, s
    s.close()
    return status, None


def _readyz(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
        s.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    return data.partition(b"\r\n\r\n")[2].decode().strip()


@requires_redis
@pytest.mark.anyio
async def test_redis_with_tls_a_password_and_an_acl_user_serves_both_stores(
    tls_redis: RedisServer,
) -> None:
    admin = RedisStore(tls_redis.url)
    await admin.execute(
        "ACL", "SETUSER", "gw", "on", ">gw-pw", "~wsgate:*", "+@all", "-@dangerous", "+info"
    )
    await admin.aclose()
    assert tls_redis.tls is not None
    url = f"rediss://gw:gw-pw@127.0.0.1:{tls_redis.port}/0?ssl_ca_certs={tls_redis.tls[0]}"
    async with (
        Gateway(token_config(url, max_sessions=2)).running() as one,
        Gateway(token_config(url, max_sessions=2)).running() as two,
    ):
        assert one.authority is not None
        socks: list[socket.socket] = []
        try:
            path = f"/ws/generic/{ECHO}?token={one.authority.mint(ECHO).token}"
            status, sock = await open_session(one.port, path)
            assert status == 101 and sock is not None
            socks.append(sock)
            assert (await open_session(two.port, path))[0] == 403  # used at the other gateway
            for gateway, expected in ((two, 101), (one, 503)):  # max_sessions = 2 across both
                token = one.authority.mint(ECHO).token
                status, sock = await open_session(gateway.port, f"/ws/generic/{ECHO}?token={token}")
                assert status == expected
                if sock is not None:
                    socks.append(sock)
        finally:
            for sock in socks:
                sock.close()
    # Without the CA, the server's certificate is not trusted: the store is unavailable.
    untrusted = RedisStore(f"rediss://gw:gw-pw@127.0.0.1:{tls_redis.port}", timeout=0.5)
    with pytest.raises(StoreUnavailable):
        await untrusted.execute("PING")
    await untrusted.aclose()


# --- gateway processes sharing one redis-server ------------------------------------------------


def gateway_toml(
    path: Path, store: str, *, max_sessions: int, lease_ttl: float, token: bool
) -> Path:
    auth = 'websocket_auth = "token"\n' if token else ""
    path.write_text(
        "[gateway]\nport = 0\n"
        f"capacity_store = {json.dumps(store)}\nlease_ttl = {lease_ttl}\n"
        + (f"replay_store = {json.dumps(store)}\nsecrets = ['test-secret']\n" if token else "")
        + '[[org]]\nname = "demo"\npublic_keys = ["pk_demo"]\n'
        f'[[agent]]\nname = "echo"\norg = "demo"\nbuiltin = "echo"\nmax_sessions = {max_sessions}\n'
        + auth
    )
    return path


@pytest.fixture
def gateways() -> Iterator[list[Wsgate]]:
    started: list[Wsgate] = []
    yield started
    for gateway in started:
        gateway.kill()


def echoes(sock: socket.socket, text: str) -> bool:
    """Whether the session still answers: one message there and back."""
    sock.sendall(frame(1, text.encode()))
    return Reader(lambda: sock.recv(4096)).next() == (1, text.encode())


def wait_for(condition: Callable[[], bool], *, within: float, what: str) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > within:
            pytest.fail(f"{what}: not within {within} s")
        time.sleep(0.02)
    return time.monotonic() - started


@requires_redis
@pytest.mark.slow
def test_three_gateways_hold_max_sessions_together_through_a_kill_and_a_redis_outage(
    redis: RedisServer, tmp_path: Path, gateways: list[Wsgate]
) -> None:
    lease_ttl = 2.0
    config = gateway_toml(
        tmp_path / "gw.toml", redis.url, max_sessions=10, lease_ttl=lease_ttl, token=False
    )
    for _ in range(3):
        gateways.append(Wsgate("serve", "--config", str(config)))
    ports = [port_of(g.url()) for g in gateways]
    path = f"/ws/generic/{ECHO}"

    # 30 clients spread over the gateways, 4 of the first ten at the first gateway.
    order = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2] + [i % 3 for i in range(20)]
    live: dict[int, list[socket.socket]] = {0: [], 1: [], 2: []}
    try:
        refused = 0
        for g in order:
            status, sock = _open_session(ports[g], path)
            if sock is not None:
                live[g].append(sock)
            else:
                assert status == 503
                refused += 1
        assert [len(live[g]) for g in range(3)] == [4, 3, 3]
        assert refused == 20
        assert all(echoes(s, "hi") for socks in live.values() for s in socks)

        # kill -9 the gateway holding 4: within lease_ttl + 1 s the others admit 4 more.
        gateways[0].proc.send_signal(signal.SIGKILL)
        gateways[0].proc.wait(TIMEOUT)
        for s in live.pop(0):
            s.close()
        killed = time.monotonic()
        admitted = 0

        def four_more() -> bool:
            nonlocal admitted
            g = 1 + admitted % 2
            sock = _open_session(ports[g], path)[1]
            if sock is not None:
                live[g].append(sock)
                admitted += 1
            return admitted == 4

        wait_for(four_more, within=lease_ttl + 1, what="4 more sessions after the kill")
        assert time.monotonic() - killed <= lease_ttl + 1
        assert _open_session(ports[1], path)[0] == 503  # 10 again, and no more
        assert [len(live[1]), len(live[2])] == [5, 5]

        # Redis stops: sessions go on, each gateway counts its own up to max_sessions. Each
        # gateway asks the store during the outage (an open), so each knows it is down: one that
        # never asked would say ready while its client may still be reconnecting.
        redis.stop()
        assert all(echoes(s, "during") for g in (1, 2) for s in live[g])
        while len(live[1]) < 10:
            status, sock = _open_session(ports[1], path)
            assert status == 101 and sock is not None, "counted locally while Redis is down"
            live[1].append(sock)
        assert _open_session(ports[1], path)[0] == 503  # its own 10
        assert "counted on this gateway" in _readyz(ports[1])
        gateways[1].expect("counted on this gateway until it is back", stream="stderr")
        status, sock = _open_session(ports[2], path)
        assert status == 101 and sock is not None, "counted locally while Redis is down"
        live[2].append(sock)
        gateways[2].expect("counted on this gateway until it is back", stream="stderr")

        # Redis is back (empty): within a renewal period each gateway puts its leases back, so
        # the shared count is 16 and gateway 2, with 6 of its own, refuses the 17th.
        redis.start()
        back = time.monotonic()
        for g, held in ((1, 10), (2, 6)):
            gateways[g].expect(
                rf"is back: max_sessions shared again \({held} lease", stream="stderr"
            )
        assert time.monotonic() - back <= lease_ttl + 2
        for port in ports[1:]:
            assert _readyz(port) == "ok"
        assert _open_session(ports[2], path)[0] == 503
        for s in live[1][:7]:
            s.close()
        del live[1][:7]

        def admitted_again() -> bool:
            sock = _open_session(ports[2], path)[1]
            if sock is not None:
                live[2].append(sock)
            return sock is not None

        wait_for(admitted_again, within=lease_ttl, what="a place given back across gateways")
        assert all(echoes(s, "after") for g in (1, 2) for s in live[g])
    finally:
        for socks in live.values():
            for s in socks:
                s.close()


# --- Sentinel: a primary killed mid-run ---------------------------------------------------------


@pytest.fixture
def sentinel_pair(tmp_path: Path) -> Iterator[tuple[RedisServer, RedisServer, RedisSentinel]]:
    (tmp_path / "p").mkdir()
    (tmp_path / "r").mkdir()
    (tmp_path / "s").mkdir()
    primary = RedisServer(tmp_path / "p")
    primary.start()
    replica = RedisServer(tmp_path / "r", replicaof=primary.port)
    replica.start()
    replica.wait_synced()
    sentinel = RedisSentinel(tmp_path / "s", primary.port)
    sentinel.start()
    yield primary, replica, sentinel
    for server in (sentinel, replica, primary):
        server.stop()


def start_token(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
        body = b'{"transport": "websocket"}'
        s.sendall(
            b"POST /v1/public/echo/start HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer pk_demo\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    return str(json.loads(data.partition(b"\r\n\r\n")[2])["token"])


@requires_redis
@pytest.mark.slow
def test_a_sentinel_failover_never_accepts_a_token_twice_and_needs_no_restart(
    sentinel_pair: tuple[RedisServer, RedisServer, RedisSentinel],
    tmp_path: Path,
    gateways: list[Wsgate],
) -> None:
    primary, _, sentinel = sentinel_pair
    url = f"redis+sentinel://127.0.0.1:{sentinel.port}/{sentinel.service}"
    config = gateway_toml(tmp_path / "gw.toml", url, max_sessions=1000, lease_ttl=3, token=True)
    for _ in range(2):
        gateways.append(Wsgate("serve", "--config", str(config)))
    ports = [port_of(g.url()) for g in gateways]
    accepted: dict[str, int] = {}  # token -> times a session opened with it
    statuses: list[tuple[float, int]] = []
    killed: float | None = None
    recovered: float | None = None
    started = time.monotonic()
    i = 0
    while time.monotonic() - started < 40:
        i += 1
        token = start_token(ports[i % 2])
        accepted[token] = 0
        # Each token is tried at both gateways, and once more at the first after a failover.
        for port in (ports[i % 2], ports[(i + 1) % 2]):
            status, sock = _open_session(
                port, f"/ws/generic/{ECHO}", f"Authorization: Bearer {token}"
            )
            statuses.append((time.monotonic(), status))
            assert status in (101, 403, 503), status
            if sock is not None:
                accepted[token] += 1
                sock.close()
        if killed is None and i == 30:
            primary.kill()
            killed = time.monotonic()
        failed_over = killed is not None and any(s == 503 for at, s in statuses if at > killed)
        if failed_over and recovered is None and statuses[-2][1] == 101:
            recovered = time.monotonic()
        if recovered is not None and time.monotonic() - recovered > 2:
            break
    assert killed is not None, "the primary was never killed"
    assert recovered is not None, "token sessions did not come back after the failover"
    assert max(accepted.values()) == 1, "a token was accepted twice"
    assert recovered - killed < 15
    # Every token used before the failover is still refused after it.
    before = [token for token in list(accepted)[:30] if accepted[token]]
    assert len(before) == 30, [s for _, s in statuses[:60]]
    again = [
        _open_session(ports[0], f"/ws/generic/{ECHO}", f"Authorization: Bearer {token}")[0]
        for token in before
    ]
    assert again == [403] * 30
    assert any(status == 503 for at, status in statuses if at > killed), "no failover seen"
