"""The list across gateways (issue 16): with a shared store and a forward secret, ``GET
/v1/agents/{agent}/sessions`` asked of any gateway shows the agent's live sessions on every
gateway of the store, paged by ``sessionId`` the same way whichever is asked; a forwarded list
is answered with the gateway's own sessions only; a gateway killed or stopped is named in
``unreachable`` and the list still answers (:mod:`wsgate.forwarding`). Real redis-server,
real sockets on 127.0.0.1, a real ``wsgate`` process for the gateway that dies."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from wsgate import AgentConfig, Config, Gateway, GatewaySettings, OrgConfig
from wsgate.capacity import GATEWAYS_PREFIX
from wsgate.client import list_sessions
from wsgate.forwarding import FORWARD_HEADER
from wsgate.redis_store import RedisStore
from wsgate.session_api import merge_pages, page

from .helpers import call, call_json, frame, in_thread, until, upgrade_request
from .processes import TIMEOUT, Wsgate
from .redis_server import RedisServer, requires_redis

pytestmark = [pytest.mark.anyio, requires_redis]

SECRET = "forward-secret-0123456789"
#: The dying gateway's: its index entry outlives a stop by 2/3 of it at least (the checks
#: made while it is stopped take about 3 s), and leaves within it once killed.
LEASE_TTL = 6
ORGS = [OrgConfig("test", public_keys=["pk_test"], private_keys=["sk_test"])]
INDEX = GATEWAYS_PREFIX + "echo.test"
LIST = "/v1/agents/echo/sessions"


def shared_config(redis: RedisServer, **settings: Any) -> Config:
    """``echo.test`` (the builtin echo), capacity and sessions in ``redis``."""
    return Config(
        gateway=GatewaySettings(
            port=0, capacity_store=redis.url, forward_secret=SECRET, **settings
        ),
        orgs=ORGS,
        agents=[AgentConfig("echo", "test", builtin="echo")],
    )


@asynccontextmanager
async def store(redis: RedisServer) -> AsyncIterator[RedisStore]:
    probe = RedisStore(redis.url)
    try:
        yield probe
    finally:
        await probe.aclose()


def _open(port: int) -> tuple[socket.socket, str]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    sock.sendall(upgrade_request("/ws/generic/echo.test"))
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        assert chunk, "closed before the 101"
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    fields = dict(line.split(": ", 1) for line in head.decode().split("\r\n")[1:] if ": " in line)
    return sock, fields["X-Session-Id"]


async def open_sessions(port: int, count: int) -> tuple[list[socket.socket], list[str]]:
    """``count`` echo sessions on the gateway at ``port``: their sockets and ids."""
    opened = [await in_thread(_open, port) for _ in range(count)]
    return [sock for sock, _ in opened], [sid for _, sid in opened]


async def indexed(probe: RedisStore, *urls: str) -> None:
    """Until the agent's index holds exactly ``urls`` (each gateway joins it in the round after
    its first session of the agent registers)."""

    async def holds() -> bool:
        members = await probe.execute("ZRANGE", INDEX, "0", "-1")
        return sorted(m.decode() for m in members) == sorted(urls)

    await until(holds, within=10, what=f"the index holding {urls}")


async def test_a_list_asked_of_either_gateway_shows_every_gateways_sessions_in_pages(
    redis: RedisServer,
) -> None:
    async with (
        store(redis) as probe,
        Gateway(shared_config(redis)).running() as one,
        Gateway(shared_config(redis)).running() as two,
    ):
        here = {one: f"http://127.0.0.1:{one.port}", two: f"http://127.0.0.1:{two.port}"}
        socks_one, ids_one = await open_sessions(one.port, 3)
        socks_two, ids_two = await open_sessions(two.port, 2)
        try:
            await indexed(probe, here[one], here[two])
            every = sorted(ids_one + ids_two)
            holder = {sid: here[one] for sid in ids_one} | {sid: here[two] for sid in ids_two}
            # One message on a session of `two`: its counts show through `one` too.
            socks_two[0].sendall(frame(1, b"hello"))
            assert socks_two[0].recv(64) == b"\x81\x05hello"
            for gw in (one, two):
                status, listed = await call_json(gw, "GET", LIST, "sk_test")
                assert status == 200
                assert listed["next"] is None and listed["unreachable"] == []
                assert [s["sessionId"] for s in listed["sessions"]] == every
                for entry in listed["sessions"]:
                    assert entry["gateway"] == holder[entry["sessionId"]]
                    assert (entry["bot"], entry["provider"], entry["callId"]) == (
                        "builtin", None, None,
                    )  # fmt: skip
                    expected = (1, 5) if entry["sessionId"] == ids_two[0] else (0, 0)
                    assert (entry["messagesIn"], entry["bytesIn"]) == expected
            # Pages by sessionId, the same whichever gateway is asked for each page.
            shown: list[str] = []
            after, asked = None, 0
            while True:
                gw = (one, two)[asked % 2]
                asked += 1
                target = f"{LIST}?limit=2" + (f"&after={after}" if after else "")
                status, listed = await call_json(gw, "GET", target, "sk_test")
                assert status == 200 and len(listed["sessions"]) <= 2
                shown += [s["sessionId"] for s in listed["sessions"]]
                after = listed["next"]
                if after is None:
                    break
            assert shown == every and asked == 3
            # A forwarded list (the secret) is one hop: that gateway's own sessions only.
            hop = f"{FORWARD_HEADER}: {SECRET}"
            status, listed = await call_json(one, "GET", LIST, "sk_test", b"", hop)
            assert status == 200 and "unreachable" not in listed
            assert [s["sessionId"] for s in listed["sessions"]] == sorted(ids_one)
            # ...and judged as a client's: a wrong secret, a bad key, a bad page: refused.
            wrong = f"{FORWARD_HEADER}: not-the-secret-at-all"
            assert (await call(one, "GET", LIST, "sk_test", b"", wrong))[0] == 403
            assert (await call(one, "GET", LIST, "sk_nope", b"", hop))[0] == 401
            for target, key, refused in (
                (LIST, None, 401),
                (LIST, "sk_nope", 401),
                (LIST, "pk_test", 403),
                ("/v1/agents/nope/sessions", "sk_test", 403),
                (f"{LIST}?limit=0", "sk_test", 400),
                (f"{LIST}?after=nope", "sk_test", 400),
                ("/v1/agents/echo/sessionz", "sk_test", 404),
            ):
                assert (await call(two, "GET", target, key))[0] == refused, target
            # The Python client's list, likewise.
            listed = await list_sessions(one.url, "echo", "sk_test", limit=4)
            assert [s["sessionId"] for s in listed["sessions"]] == every[:4]
            assert (listed["next"], listed["unreachable"]) == (every[3], [])
        finally:
            for sock in socks_two:
                sock.close()
        # A gateway without sessions of the agent leaves its index: asked no more.
        await indexed(probe, here[one])
        status, listed = await call_json(two, "GET", LIST, "sk_test")
        assert [s["sessionId"] for s in listed["sessions"]] == sorted(ids_one)
        for sock in socks_one:
            sock.close()


def test_merged_pages_page_like_one_gateway_holding_every_session() -> None:
    ids = sorted(str(uuid.uuid4()) for _ in range(9))
    held = [ids[0::3], ids[1::3], ids[2::3]]  # interleaved across three gateways
    held[2] += [str(uuid.UUID(int=0))]  # and one sorted first
    every = sorted(ids + held[2][-1:])
    for limit in (1, 2, 3, 4, 10):
        shown: list[str] = []
        after: str | None = None
        while True:
            pages = [page([{"sessionId": s} for s in one], limit, after) for one in held]
            merged = merge_pages(pages, limit, after)
            assert merged == page([{"sessionId": s} for s in every], limit, after)
            shown += [s["sessionId"] for s in merged["sessions"]]
            after = merged["next"]
            if after is None:
                break
        assert shown == every
    # One gateway with exactly a page and more behind it: the merged page has a next.
    only = page([{"sessionId": s} for s in ids[:3]], 2, None)
    assert merge_pages([only, page([], 2, None)], 2, None)["next"] == ids[1]


# --- a gateway that dies ---------------------------------------------------------------------


def process_toml(path: Path, redis: RedisServer) -> Path:
    path.write_text(
        "[gateway]\nport = 0\n"
        f"capacity_store = {json.dumps(redis.url)}\nlease_ttl = {LEASE_TTL}\n"
        f"forward_secret = {json.dumps(SECRET)}\n"
        '[[org]]\nname = "test"\npublic_keys = ["pk_test"]\nprivate_keys = ["sk_test"]\n'
        '[[agent]]\nname = "echo"\norg = "test"\nbuiltin = "echo"\n'
    )
    return path


@pytest.fixture
def process(tmp_path: Path, redis: RedisServer) -> Iterator[Wsgate]:
    gateway = Wsgate("serve", "--config", str(process_toml(tmp_path / "gw.toml", redis)))
    yield gateway
    if gateway.proc.poll() is None:
        os.kill(gateway.proc.pid, signal.SIGCONT)
    gateway.kill()


def cli_list(url: str) -> subprocess.CompletedProcess[str]:
    args = ["sessions", "list", "--url", url, "--agent", "echo", "--key", "sk_test"]
    return subprocess.run(
        [sys.executable, "-m", "wsgate", *args], capture_output=True, text=True, timeout=TIMEOUT
    )


@pytest.mark.slow
async def test_a_gateway_stopped_or_killed_is_named_and_the_list_still_answers(
    redis: RedisServer, process: Wsgate
) -> None:
    port = int(process.url().rsplit(":", 1)[1])
    gone = f"http://127.0.0.1:{port}"
    dial_timeout = 1.0
    async with (
        store(redis) as probe,
        Gateway(shared_config(redis, dial_timeout=dial_timeout)).running() as gw,
    ):
        there, there_ids = await open_sessions(port, 2)
        mine, my_ids = await open_sessions(gw.port, 1)
        try:
            await indexed(probe, gone, f"http://127.0.0.1:{gw.port}")
            status, listed = await call_json(gw, "GET", LIST, "sk_test")
            assert status == 200 and listed["unreachable"] == []
            assert [s["sessionId"] for s in listed["sessions"]] == sorted(my_ids + there_ids)
            # The CLI prints the whole list.
            ran = await in_thread(cli_list, gw.url)
            assert ran.returncode == 0, ran.stderr
            printed = json.loads(ran.stdout)
            assert [s["sessionId"] for s in printed["sessions"]] == sorted(my_ids + there_ids)
            assert ran.stderr == ""

            # Stopped (SIGSTOP: it accepts, never answers): the list waits dial_timeout, no more.
            os.kill(process.proc.pid, signal.SIGSTOP)
            began = anyio.current_time()
            status, listed = await call_json(gw, "GET", LIST, "sk_test")
            took = anyio.current_time() - began
            assert dial_timeout <= took < dial_timeout + 2
            assert status == 200 and listed["unreachable"] == [gone]
            assert [s["sessionId"] for s in listed["sessions"]] == my_ids
            ran = await in_thread(cli_list, gw.url)
            assert ran.returncode == 0
            assert [s["sessionId"] for s in json.loads(ran.stdout)["sessions"]] == my_ids
            assert gone in ran.stderr and "not reached" in ran.stderr

            # Killed: refused at once; named until its index entry expires (lease_ttl).
            process.kill()
            began = anyio.current_time()
            status, listed = await call_json(gw, "GET", LIST, "sk_test")
            assert anyio.current_time() - began < dial_timeout
            assert status == 200 and listed["unreachable"] == [gone]
            assert [s["sessionId"] for s in listed["sessions"]] == my_ids

            async def forgotten() -> bool:
                _, listed = await call_json(gw, "GET", LIST, "sk_test")
                return bool(listed["unreachable"] == [])

            await until(forgotten, within=LEASE_TTL + 2, what="the killed gateway out of the index")
        finally:
            for sock in there + mine:
                sock.close()


async def test_the_store_down_is_a_503_and_no_registry_is_the_list_as_before(
    redis: RedisServer,
) -> None:
    alone = Config(
        gateway=GatewaySettings(port=0, capacity_store=redis.url),  # no secret: no registry
        orgs=ORGS,
        agents=[AgentConfig("echo", "test", builtin="echo")],
    )
    async with Gateway(alone).running() as plain, Gateway(shared_config(redis)).running() as gw:
        socks, ids = await open_sessions(plain.port, 1)
        try:
            status, listed = await call_json(plain, "GET", LIST, "sk_test")
            assert status == 200 and set(listed) == {"sessions", "next"}
            assert [s["sessionId"] for s in listed["sessions"]] == ids
            assert "gateway" not in listed["sessions"][0]
            redis.stop()
            status, answer = await call_json(gw, "GET", LIST, "sk_test")
            assert (status, answer["error"]) == (503, "session registry unreachable")
        finally:
            for sock in socks:
                sock.close()
