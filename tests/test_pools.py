"""Bot pools (issue 13): ``upstream`` as a list of bots. Sessions spread by live count (ties round
robin), a member that fails is skipped within one ``dial_timeout`` and left out for
``upstream_retry_after``, the client sees 502/504 only when every member failed; ``/readyz`` and
the session log name the members.

The choice itself (:class:`wsgate.pools.Pool`) is tested without sockets; the rest on real
sockets on 127.0.0.1: `websockets` bots, listening sockets that never answer or that close each
connection at once. Synchronisation is on events: an answer, a barrier of client threads, the
gateway's end-of-session log line.
"""

from __future__ import annotations

from typing import Any

import pytest

from wsgate import AgentConfig, GatewaySettings
from wsgate.config import loads_config
from wsgate.errors import ConfigError

# --------------------------------------------------------------------------------------------
# Settings

ORG = "[[org]]\nname = 'o'\n"
POOL = ["ws://10.0.0.11:9001/ws", "ws://10.0.0.12:9001/ws"]


def test_upstream_takes_a_list_as_well_as_a_string() -> None:
    config = loads_config(
        ORG + f"[[agent]]\nname = 'pool'\norg = 'o'\nupstream = {POOL!r}\n"
        "[[agent]]\nname = 'one'\norg = 'o'\nupstream = 'ws://10.0.0.11:9001/ws'\n"
    )
    pool, one = config.agents
    assert pool == AgentConfig("pool", "o", upstream=POOL)  # built in code: the same
    assert pool.upstream == tuple(POOL)
    assert [(u.host, u.port, u.resource) for u in pool.upstream_urls] == [
        ("10.0.0.11", 9001, "/ws"),
        ("10.0.0.12", 9001, "/ws"),
    ]
    assert pool.upstream_url == pool.upstream_urls[0]  # the first member
    assert one.upstream == "ws://10.0.0.11:9001/ws"
    assert one.upstream_urls == (one.upstream_url,)
    assert AgentConfig("echo", "o", builtin="echo").upstream_urls == ()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("[]", "agent 'a.o': upstream must not be an empty list"),
        ("['ws://b/ws', 'http://c/ws']", "agent 'a.o': upstream 'http://c/ws' must be a ws:// URL"),
        ("['ws://b/ws', 'ws://b:x/ws']", "upstream 'ws://b:x/ws' has an invalid port"),
        ("['wss://b/ws']", "wss:// upstreams are not supported yet"),
        ("['ws://b/ws', 'ws://b/ws']", "agent 'a.o': upstream lists a URL twice"),
        ("['ws://b/ws', 7]", "upstream must be a string or a list of strings, got list"),
        ("{ url = 'ws://b/ws' }", "upstream must be a string or a list of strings, got dict"),
        ("7", "upstream must be a string or a list of strings, got int"),
    ],
)
def test_a_bad_upstream_list_in_a_file_is_refused_naming_the_key(value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        loads_config(ORG + f"[[agent]]\nname = 'a'\norg = 'o'\nupstream = {value}\n", source="gw")
    assert "\n" not in str(caught.value)
    assert str(caught.value).startswith("gw: [[agent]] #1: ")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([], "upstream must not be an empty list"),
        (("ws://b/ws", "ftp://c/"), "upstream 'ftp://c/' must be a ws:// URL"),
        (["ws://b/ws", b"ws://c/ws"], "upstream must be a string or a list of strings"),
        (["ws://b/ws", "ws://b/ws"], "upstream lists a URL twice"),
        (7, "upstream must be a string or a list of strings"),
    ],
)
def test_a_bad_upstream_list_built_in_code_gets_the_same_checks(value: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=f"agent 'a.o': {message}"):
        AgentConfig("a", "o", upstream=value)


def test_upstream_retry_after_is_a_gateway_setting_of_10_seconds_by_default() -> None:
    assert GatewaySettings().upstream_retry_after == 10
    assert loads_config("[gateway]\nupstream_retry_after = 2.5").gateway.upstream_retry_after == 2.5
    assert GatewaySettings(upstream_retry_after=0).upstream_retry_after == 0  # never left out
    for value, message in (
        ("-1", "upstream_retry_after must be a number of seconds >= 0"),
        ("'10s'", "upstream_retry_after must be a number, got str"),
    ):
        with pytest.raises(ConfigError, match=message):
            loads_config(f"[gateway]\nupstream_retry_after = {value}")
