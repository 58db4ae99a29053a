"""Settings (wsgate.config): dataclasses, TOML loading and the messages of ConfigError."""

import dataclasses
import re
from pathlib import Path

import pytest

from wsgate import _core
from wsgate.config import (
    AgentConfig,
    Config,
    GatewaySettings,
    OrgConfig,
    default_config,
    load_config,
    loads_config,
)
from wsgate.errors import ConfigError

FULL = """
[gateway]
host = "0.0.0.0"
port = 0
public_url = "wss://gw.example"
region = "us-west"
max_message_size = 65536
handshake_timeout = 2.5
dial_timeout = 1
drain_timeout = 3
max_session_duration = 60
relay_threads = 2

[[org]]
name = "my-org"
public_keys = ["pk_one", "pk_two"]

[[agent]]
name = "my-agent"
org = "my-org"
websocket_auth = "token"
upstream = "ws://127.0.0.1:9001/ws"
max_sessions = 3

[[agent]]
name = "echo"
org = "my-org"
builtin = "echo"
"""


def test_a_full_file_loads_every_setting() -> None:
    config = loads_config(FULL)
    assert config.gateway == GatewaySettings(
        host="0.0.0.0",
        port=0,
        public_url="wss://gw.example",
        region="us-west",
        max_message_size=65536,
        handshake_timeout=2.5,
        dial_timeout=1,
        drain_timeout=3,
        max_session_duration=60,
        relay_threads=2,
    )
    assert config.orgs == (OrgConfig("my-org", ("pk_one", "pk_two")),)
    assert config.agents == (
        AgentConfig(
            "my-agent", "my-org", "token", upstream="ws://127.0.0.1:9001/ws", max_sessions=3
        ),
        AgentConfig("echo", "my-org", builtin="echo"),
    )
    assert list(config.agents_by_host()) == ["my-agent.my-org", "echo.my-org"]


def test_every_setting_has_the_documented_default() -> None:
    settings = loads_config("").gateway
    assert settings == GatewaySettings()
    assert (settings.host, settings.port, settings.public_url, settings.region) == (
        "127.0.0.1",
        8765,
        None,  # the listening address
        "local",
    )
    assert settings.max_message_size == _core.DEFAULT_MAX_MESSAGE_SIZE == 1048576
    assert (settings.handshake_timeout, settings.dial_timeout, settings.drain_timeout) == (
        10,
        5,
        30,
    )
    assert (settings.max_session_duration, settings.relay_threads) == (7200, 0)
    assert (settings.dead_peer_timeout, settings.token_ttl, settings.replay_store) == (
        60,
        300,
        "memory",
    )
    assert (settings.secrets, settings.secrets_file) == (None, None)
    assert (settings.max_connections, settings.max_pending_upgrades) == (10000, 1000)
    agent = AgentConfig("a", "b", builtin="echo")
    assert (agent.websocket_auth, agent.max_sessions) == ("none", 50)


def test_the_default_config_serves_echo_demo_with_the_builtin_echo() -> None:
    config = default_config()
    agent = config.agents_by_host()["echo.demo"]
    assert agent.builtin == "echo"
    assert agent.websocket_auth == "none"


def test_a_config_built_in_python_stores_lists_as_tuples() -> None:
    config = Config(orgs=[OrgConfig("o", ["pk_x"])], agents=[AgentConfig("a", "o", builtin="echo")])
    assert isinstance(config.orgs, tuple)
    assert isinstance(config.agents, tuple)
    assert config.orgs[0].public_keys == ("pk_x",)


def test_public_keys_never_appear_in_a_repr() -> None:
    assert "pk_secret" not in repr(loads_config('[[org]]\nname="o"\npublic_keys=["pk_secret"]'))


def test_replace_gateway_changes_settings_and_checks_them_again() -> None:
    config = default_config().replace_gateway(port=0, host="::1")
    assert (config.gateway.port, config.gateway.host) == (0, "::1")
    with pytest.raises(ConfigError, match="port"):
        default_config().replace_gateway(port=70000)


def test_a_file_is_read_from_disk_and_named_in_errors(tmp_path: Path) -> None:
    path = tmp_path / "wsgate.toml"
    path.write_text(FULL)
    assert load_config(path) == loads_config(FULL)
    path.write_text("[gateway]\nprot = 1\n")
    with pytest.raises(ConfigError, match=r"wsgate\.toml: \[gateway\]: unknown key 'prot'"):
        load_config(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[gateway", "not valid TOML"),
        ("[gatway]", "top level: unknown key 'gatway'"),
        ("gateway = 1", r"\[gateway\] must be a table"),
        ("[gateway]\nport = '80'", r"\[gateway\]: port must be an integer, got str '80'"),
        ("[gateway]\nport = true", "port must be an integer, got bool"),
        ("[gateway]\nport = 1.5", "port must be an integer"),
        ("[gateway]\nport = 65536", "port must be at most 65535"),
        ("[gateway]\nport = -1", "port must be an integer >= 0"),
        ("[gateway]\ndial_timeout = 0", "dial_timeout must be a number of seconds > 0"),
        ("[gateway]\nhandshake_timeout = 'x'", "handshake_timeout must be a number"),
        ("[gateway]\nmax_session_duration = 59", "max_session_duration must be 60 to 14400"),
        ("[gateway]\nmax_session_duration = 14401", "max_session_duration must be 60 to 14400"),
        ("[gateway]\nmax_message_size = 0", "max_message_size must be an integer >= 1"),
        ("[gateway]\nrelay_threads = -1", "relay_threads must be an integer >= 0"),
        ("[gateway]\nengine_opens = 'yes'", "engine_opens must be a boolean"),
        ("[gateway]\npublic_url = 'http://x'", "public_url 'http://x' must start with ws://"),
        ("[gateway]\nregion = ''", "region must not be empty"),
        ("[gateway]\ndead_peer_timeout = 0.5", "dead_peer_timeout must be at least 1 second"),
        ("[gateway]\nmax_connections = 0", "max_connections must be an integer >= 1"),
        ("[gateway]\nmax_pending_upgrades = 'x'", "max_pending_upgrades must be an integer"),
        ("[gateway]\nclient_request_rate = -1", r"client_request_rate must be a number >= 0"),
        ("[gateway]\nclient_request_rate = 'fast'", "client_request_rate must be a number"),
        ("[gateway]\nclient_max_sessions = -1", "client_max_sessions must be an integer >= 0"),
        ("[gateway]\nclient_max_sessions = 1.5", "client_max_sessions must be an integer"),
        ("[gateway]\nstart_rate_per_key = nan", r"start_rate_per_key must be a number >= 0"),
        ("[gateway]\ntoken_ttl = 0", "token_ttl must be 1 to 86400 seconds"),
        ("[gateway]\ntoken_ttl = 1.5", "token_ttl must be an integer"),
        ("[gateway]\nreplay_store = 'mysql://x'", "replay_store must be 'memory' or a redis://"),
        ("[gateway]\nsecrets = 's'", "secrets must be a list of strings"),
        ("[gateway]\nsecrets_file = 3", "secrets_file must be a string"),
        ("org = 1", "org must be an array of tables"),
        ("[[org]]\npublic_keys = []", r"\[\[org\]\] #1: missing key 'name'"),
        ("[[org]]\nname = 'My_Org'", "organisation name 'My_Org' must be 1-63 lowercase"),
        ("[[org]]\nname = 'o'\nkeys = []", "unknown key 'keys'"),
        ("[[org]]\nname = 'o'\n[[org]]\nname = 'o'", "org 'o' is defined twice"),
        ("[[org]]\nname = 'o'\npublic_keys = ['']", "every public key must be a non-empty string"),
        ("[[org]]\nname = 'o'\npublic_keys = ['a', 'a']", "a public key is listed twice"),
    ],
)
def test_a_bad_file_is_refused_with_a_message_naming_the_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        loads_config(text, source="gw.toml")


def test_every_gateway_setting_can_be_written_in_the_file() -> None:
    # Each [gateway] key has a TOML type to check against; a missing one was a KeyError once.
    text = "[gateway]\n" + "\n".join(
        f"{f.name} = {value}"
        for f in dataclasses.fields(GatewaySettings)
        if (value := _toml_value(getattr(GatewaySettings(), f.name))) is not None
    )
    assert loads_config(text).gateway == GatewaySettings()


def _toml_value(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return f"'{value}'"
    return str(value).lower() if isinstance(value, bool) else str(value)


def test_secrets_and_a_replay_store_url_are_never_echoed() -> None:
    for text in ("[gateway]\nsecrets = 'hunter2'", "[gateway]\nreplay_store = 7"):
        with pytest.raises(ConfigError) as caught:
            loads_config(text)
        assert "hunter2" not in str(caught.value) and " 7" not in str(caught.value)
    settings = loads_config(
        "[gateway]\nsecrets = ['hunter2']\nreplay_store = 'redis://:pw@h:6379'"
    ).gateway
    assert "hunter2" not in repr(settings) and "pw@" not in repr(settings)


def test_a_public_key_of_the_wrong_type_is_not_echoed() -> None:
    with pytest.raises(ConfigError) as caught:
        loads_config('[[org]]\nname = "o"\npublic_keys = "pk_secret"')
    assert "pk_secret" not in str(caught.value)
    assert "public_keys must be a list of strings" in str(caught.value)


ORG = "[[org]]\nname = 'o'\n[[agent]]\n"


@pytest.mark.parametrize(
    ("agent", "message"),
    [
        ("name = 'a'\norg = 'x'\nbuiltin = 'echo'", "agent 'a.x': unknown org 'x'"),
        ("name = 'A'\norg = 'o'\nbuiltin = 'echo'", "agent name 'A' must be"),
        ("name = 'a'\nbuiltin = 'echo'", "missing key 'org'"),
        ("name = 'a'\norg = 'o'", "set exactly one of upstream, builtin or bot"),
        ("name = 'a'\norg = 'o'\nbuiltin = 'echo'\nupstream = 'ws://b/'", "exactly one of"),
        ("name = 'a'\norg = 'o'\nbuiltin = 'chat'", "unknown builtin 'chat'"),
        ("name = 'a'\norg = 'o'\nupstream = 'http://b/ws'", "must be a ws:// URL"),
        ("name = 'a'\norg = 'o'\nupstream = 1", "upstream must be a string"),
        ("name = 'a'\norg = 'o'\nbuiltin = 'echo'\nwebsocket_auth = 'jwt'", "'none' or 'token'"),
        ("name = 'a'\norg = 'o'\nbuiltin = 'echo'\nmax_sessions = 0", "max_sessions must be"),
        ("name = 'a'\norg = 'o'\nbuiltin = 'echo'\nupstrem = 'x'", "unknown key 'upstrem'"),
        (
            "name = 'a'\norg = 'o'\nbuiltin = 'echo'\n[[agent]]\nname = 'a'\norg = 'o'\n"
            "builtin = 'echo'",
            "agent 'a.o' is defined twice",
        ),
    ],
)
def test_a_bad_agent_is_refused_with_a_clear_message(agent: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        loads_config(ORG + agent)


def test_objects_built_in_python_get_the_same_checks() -> None:
    with pytest.raises(ConfigError, match="unknown org 'x'"):
        Config(agents=[AgentConfig("a", "x", builtin="echo")])
    with pytest.raises(ConfigError, match=r"must be a ws:// URL \(or wss://\)"):
        AgentConfig("a", "o", upstream="http://b/ws")
    with pytest.raises(ConfigError, match="max_session_duration"):
        GatewaySettings(max_session_duration=30)


def test_every_settings_example_in_the_readme_is_accepted() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    examples = re.findall(r"```toml\n(.*?)```", readme, flags=re.S)
    assert len(examples) >= 3
    for example in examples:
        orgs = set(re.findall(r'^org = "([^"]+)"', example, flags=re.M))
        # An example may show an agent alone: give it its organisation.
        missing = orgs - set(re.findall(r'^name = "([^"]+)"', example, flags=re.M))
        extra = "".join(f'\n[[org]]\nname = "{org}"\n' for org in sorted(missing))
        loads_config(example + extra)
