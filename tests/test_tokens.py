"""Session tokens through the Python path (wsgate.tokens): the authority's verdicts and their
order, rotation, secrets, token sources, and Hypothesis on every mutation of a valid token."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wsgate import _core
from wsgate.config import AgentConfig
from wsgate.errors import ConfigError, HttpError
from wsgate.replay import MemoryReplayStore, ReplayStoreUnavailable
from wsgate.request import Request, parse_request
from wsgate.tokens import (
    SECRETS_ENV,
    TokenAuthority,
    load_secrets,
    session_id_for,
    token_from_request,
)

from .helpers import T0, Clock
from .token_reference import ReferenceTokenError
from .token_reference import mint as reference_mint
from .token_reference import verify as reference_verify

HOST = "my-agent.my-org"
URL_SAFE = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


class RecordingStore:
    """A replay store that records claims, or fails when told to."""

    def __init__(self, *, down: bool = False) -> None:
        self.claims: list[tuple[str, int]] = []
        self.down = down
        self._inner = MemoryReplayStore(clock=Clock())

    async def claim(self, nonce: str, exp: int) -> bool:
        self.claims.append((nonce, exp))
        if self.down:
            raise ReplayStoreUnavailable("down")
        return await self._inner.claim(nonce, exp)

    async def aclose(self) -> None:
        pass


def authority(**kwargs: object) -> TokenAuthority:
    kwargs.setdefault("clock", Clock())
    return TokenAuthority([b"secret-one"], **kwargs)  # type: ignore[arg-type]


async def refusal(auth: TokenAuthority, token: str | None, host: str = HOST) -> HttpError:
    with pytest.raises(HttpError) as info:
        await auth.verify(token, host)
    return info.value


# --- verdicts --------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_minted_token_verifies_once_with_the_session_id_announced_at_minting() -> None:
    auth = authority()
    minted = auth.mint(HOST)
    assert minted.exp == T0 + _core.TOKEN_TTL_SECONDS
    verified = await auth.verify(minted.token, HOST)
    assert verified.service_host == HOST
    assert verified.exp == minted.exp
    assert verified.session_id == minted.session_id
    assert uuid.UUID(verified.session_id).version == 4


@pytest.mark.anyio
async def test_a_token_used_twice_is_refused_the_second_time() -> None:
    auth = authority()
    token = auth.mint(HOST).token
    await auth.verify(token, HOST)
    error = await refusal(auth, token)
    assert (error.status, error.reason) == (403, "token already used")


@pytest.mark.anyio
async def test_a_token_is_refused_from_its_expiry_second_on_with_an_injected_clock() -> None:
    clock = Clock()
    auth = authority(clock=clock, ttl=60)
    token = auth.mint(HOST).token
    clock.now = T0 + 60
    error = await refusal(auth, token)
    assert (error.status, error.reason) == (403, "token has expired")
    clock.now = T0 + 59.999
    assert (await auth.verify(token, HOST)).exp == T0 + 60


@pytest.mark.anyio
async def test_a_token_for_another_agent_is_refused() -> None:
    auth = authority()
    token = auth.mint("other-agent.my-org").token
    error = await refusal(auth, token)
    assert (error.status, error.reason) == (403, "token is for another service host")


@pytest.mark.anyio
async def test_a_token_signed_with_an_unknown_secret_is_refused() -> None:
    token = TokenAuthority([b"someone-else"], clock=Clock()).mint(HOST).token
    error = await refusal(authority(), token)
    assert (error.status, error.reason) == (403, "token signature is invalid")


@pytest.mark.anyio
@pytest.mark.parametrize("token", ["", "garbage", "a.b.c", "x" * 5000, "é.é"])
async def test_a_malformed_token_is_refused(token: str) -> None:
    error = await refusal(authority(), token)
    assert (error.status, error.reason) == (403, "token is malformed")


@pytest.mark.anyio
async def test_a_missing_token_is_refused() -> None:
    error = await refusal(authority(), None)
    assert (error.status, error.reason) == (403, "token missing")


@pytest.mark.anyio
async def test_a_refused_token_never_costs_a_replay_store_round_trip() -> None:
    store = RecordingStore()
    auth = authority(store=store)
    good = auth.mint(HOST).token
    # The signature's last two characters changed (a token may end in "AA" already: ~1 in 1,000).
    tampered = good[:-2] + ("AA" if good[-2:] != "AA" else "BA")
    for bad in ("garbage", tampered, auth.mint("x.y").token, None):
        await refusal(auth, bad)
    assert store.claims == []


@pytest.mark.anyio
async def test_an_unreachable_replay_store_fails_closed_with_503() -> None:
    store = RecordingStore(down=True)
    auth = authority(store=store)
    minted = auth.mint(HOST)
    error = await refusal(auth, minted.token)
    assert (error.status, error.reason) == (503, "token store unavailable")
    assert store.claims == [(minted.nonce, minted.exp)]


@pytest.mark.anyio
async def test_no_refusal_echoes_the_token_or_its_nonce() -> None:
    auth = authority()
    minted = auth.mint(HOST)
    await auth.verify(minted.token, HOST)
    for token, host in ((minted.token, HOST), (minted.token, "a.b"), (minted.token + "x", HOST)):
        error = await refusal(auth, token, host)
        for text in (str(error), repr(error), error.reason, repr(error.args)):
            assert minted.token not in text
            assert minted.nonce not in text
            assert minted.token.split(".")[1] not in text
    assert error.__cause__ is None
    assert error.__suppress_context__


# --- rotation and secrets --------------------------------------------------------------------


@pytest.mark.anyio
async def test_rotation_the_old_secret_still_verifies_and_the_new_one_signs() -> None:
    clock = Clock()
    old = TokenAuthority([b"old"], clock=clock)
    rotated = TokenAuthority([b"new", b"old"], clock=clock)
    new_only = TokenAuthority([b"new"], clock=clock)
    await rotated.verify(old.mint(HOST).token, HOST)
    minted = rotated.mint(HOST)
    await new_only.verify(minted.token, HOST)
    error = await refusal(old, minted.token)
    assert error.reason == "token signature is invalid"


def test_an_empty_secret_is_refused() -> None:
    cases: list[tuple[list[str] | list[bytes], str]] = [
        ([""], "secret #1 is empty"),
        ([b""], "secret #1 is empty"),
        (["ok", ""], "secret #2 is empty"),
        ([], "no secret given"),
    ]
    for secrets, error in cases:
        with pytest.raises(ConfigError, match=f"^secrets: {error}$"):
            TokenAuthority(secrets)


def test_a_single_string_is_not_taken_for_a_list_of_secrets() -> None:
    with pytest.raises(ConfigError, match="list"):
        TokenAuthority("secret")


@pytest.mark.parametrize("ttl", [0, -1, 1.5, True, 86_401])
def test_a_token_lifetime_out_of_range_is_refused(ttl: object) -> None:
    with pytest.raises(ConfigError, match="token_ttl"):
        TokenAuthority(["s"], ttl=ttl)  # type: ignore[arg-type]


def test_secrets_never_appear_in_the_authoritys_repr() -> None:
    auth = TokenAuthority(["top-secret-1", b"top-secret-2"])
    assert "top-secret" not in repr(auth)
    assert "2 secret(s)" in repr(auth)


def test_a_minted_tokens_repr_hides_the_token_and_nonce() -> None:
    minted = authority().mint(HOST)
    assert minted.token not in repr(minted)
    assert minted.nonce not in repr(minted)


def test_secrets_load_from_the_environment_variable_comma_separated() -> None:
    environ = {SECRETS_ENV: " new-secret , old-secret "}
    assert load_secrets(environ=environ) == (b"new-secret", b"old-secret")


def test_secrets_load_from_a_file_one_per_line_skipping_comments(tmp_path: Path) -> None:
    path = tmp_path / "secrets"
    path.write_text("# signing secret first\nnew-secret\n\n  old-secret  \n")
    assert load_secrets(secrets_file=path, environ={}) == (b"new-secret", b"old-secret")


def test_secrets_load_from_a_list_as_given() -> None:
    assert load_secrets(["a", b"b"], environ={}) == (b"a", b"b")


def test_an_empty_secret_from_the_environment_is_refused_without_showing_the_others() -> None:
    with pytest.raises(ConfigError, match="#2 is empty") as info:
        load_secrets(environ={SECRETS_ENV: "visible-secret,,"})
    assert "visible-secret" not in str(info.value)


def test_secrets_from_two_sources_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="more than once"):
        load_secrets(["a"], environ={SECRETS_ENV: "b"})


def test_no_secrets_at_all_is_refused_with_the_ways_to_give_them() -> None:
    with pytest.raises(ConfigError, match=SECRETS_ENV):
        load_secrets(environ={})


def test_an_unreadable_secrets_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_secrets(secrets_file=tmp_path / "absent", environ={})


def test_the_session_id_is_a_uuid4_that_does_not_contain_the_nonce() -> None:
    nonce = _core.new_nonce()
    session_id = session_id_for(nonce)
    assert uuid.UUID(session_id).version == 4
    assert session_id == session_id_for(nonce)
    assert session_id != session_id_for(_core.new_nonce())
    assert nonce not in session_id


# --- token sources ---------------------------------------------------------------------------


def request(target: str, *headers: str) -> Request:
    head = "\r\n".join([f"GET {target} HTTP/1.1", "Host: x", *headers]) + "\r\n\r\n"
    return parse_request(head.encode())


@pytest.mark.parametrize(
    ("target", "headers", "path_token", "expected"),
    [
        ("/ws/generic/a.b/p", ("Authorization: Bearer h",), "p", "h"),
        ("/ws/generic/a.b/p?token=q", ("Authorization: bearer   h  ",), "p", "h"),
        ("/ws/generic/a.b/p?token=q", (), "p", "q"),
        ("/ws/generic/a.b/p?x=1&token=q%2Dr&token=s", (), "p", "q-r"),
        ("/ws/generic/a.b/p", (), "p", "p"),
        ("/ws/generic/a.b", (), None, None),
        ("/ws/generic/a.b?token=", (), None, ""),
        ("/ws/generic/a.b/p?token=q", ("Authorization: Basic dTpw",), "p", ""),
    ],
)
def test_the_first_token_source_present_is_the_one_judged(
    target: str, headers: tuple[str, ...], path_token: str | None, expected: str | None
) -> None:
    assert token_from_request(request(target, *headers), path_token) == expected


@pytest.mark.anyio
async def test_a_good_path_token_does_not_rescue_a_bad_header_token() -> None:
    auth = authority()
    good = auth.mint(HOST).token
    req = request(f"/ws/generic/{HOST}/{good}", "Authorization: Bearer bad")
    agent = AgentConfig("my-agent", "my-org", websocket_auth="token", builtin="echo")
    # The one check of a request's token: the server claims only what it returned.
    with pytest.raises(HttpError, match="malformed"):
        auth.check_request(req, good, agent)


@pytest.mark.anyio
async def test_the_request_hooks_pass_none_agents_and_use_up_a_token_agents_token() -> None:
    auth = authority()
    token = auth.mint(HOST).token
    open_agent = AgentConfig("open", "my-org", builtin="echo")
    token_agent = AgentConfig("my-agent", "my-org", websocket_auth="token", builtin="echo")
    bare = request("/ws/generic/open.my-org")
    assert auth.check_request(bare, None, open_agent) is None
    with pytest.raises(HttpError, match="token missing"):
        auth.check_request(bare, None, token_agent)
    with_token = request(f"/ws/generic/{HOST}?token={token}")
    claims = auth.check_request(with_token, None, token_agent)
    assert claims is not None
    verified = await auth.claim(claims, HOST)
    assert verified.service_host == HOST
    again = auth.check_request(with_token, None, token_agent)
    assert again is not None
    with pytest.raises(HttpError, match="already used"):
        await auth.claim(again, HOST)


@pytest.mark.anyio
async def test_verification_logs_nothing_about_the_token(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    auth = authority()
    minted = auth.mint(HOST)
    await auth.verify(minted.token, HOST)
    await refusal(auth, minted.token)
    assert minted.token not in caplog.text
    assert minted.nonce not in caplog.text


# --- Hypothesis: every mutation of a valid token is refused ------------------------------------

SECRET = b"hypothesis-secret"
CHECKER = TokenAuthority([SECRET], clock=Clock())


def valid_token() -> str:
    return _core.TokenKeys([SECRET]).mint(HOST, T0 + 300, "abc123")


def refused_by_python_path(token: str) -> bool:
    try:
        CHECKER.check(token, HOST)
    except HttpError as error:
        assert error.status == 403
        return True
    return False


def refused_by_reference(token: str) -> bool:
    try:
        reference_verify([SECRET], token, HOST, T0)
    except ReferenceTokenError:
        return True
    return False


@given(st.data())
def test_any_single_byte_change_of_a_valid_token_is_refused(data: st.DataObject) -> None:
    token = valid_token()
    at = data.draw(st.integers(0, len(token) - 1))
    char = data.draw(st.characters(codec="utf-8").filter(lambda c: c != token[at]))
    mutated = token[:at] + char + token[at + 1 :]
    assert refused_by_python_path(mutated)
    assert refused_by_reference(mutated)


@given(st.data())
def test_any_truncation_or_extension_of_a_valid_token_is_refused(data: st.DataObject) -> None:
    token = valid_token()
    cut = data.draw(st.integers(0, len(token) - 1))
    assert refused_by_python_path(token[:cut])
    assert refused_by_python_path(token[cut:] if cut else token[1:])
    assert refused_by_python_path(token + data.draw(st.text(min_size=1, max_size=8)))


@given(st.sampled_from([0, 1]), st.integers(1, 3))
def test_re_padding_either_part_of_a_valid_token_is_refused(part: int, pads: int) -> None:
    parts = valid_token().split(".")
    parts[part] += "=" * pads
    mutated = ".".join(parts)
    assert refused_by_python_path(mutated)
    assert refused_by_reference(mutated)


@given(st.data())
def test_the_standard_alphabet_spelling_of_a_valid_token_is_refused(data: st.DataObject) -> None:
    # Mint until a token holds - or _ (most do), then spell one of them as + or /.
    token = data.draw(
        st.builds(
            lambda n: _core.TokenKeys([SECRET]).mint(HOST, T0 + 300, n),
            st.text(URL_SAFE, min_size=1),
        ).filter(lambda t: "-" in t or "_" in t)
    )
    positions = [i for i, c in enumerate(token) if c in "-_"]
    at = data.draw(st.sampled_from(positions))
    mutated = token[:at] + {"-": "+", "_": "/"}[token[at]] + token[at + 1 :]
    assert refused_by_python_path(mutated)
    assert refused_by_reference(mutated)


@given(st.text(URL_SAFE, min_size=2, max_size=2))
def test_non_zero_trailing_bits_in_the_signature_are_refused(last: str) -> None:
    token = valid_token()
    mutated = token[:-1] + last[0]
    if mutated != token:
        assert refused_by_python_path(mutated)
        assert refused_by_reference(mutated)


@given(
    st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=80),
    st.text(URL_SAFE, min_size=1, max_size=40),
)
def test_mint_then_verify_round_trips_for_any_service_host(host: str, nonce: str) -> None:
    keys = _core.TokenKeys([SECRET])
    token = keys.mint(host, T0 + 300, nonce)
    if len(token) > _core.MAX_TOKEN_BYTES:
        return
    assert token == reference_mint(SECRET, host, T0 + 300, nonce)
    claims = keys.verify(token, host, T0)  # refused unless the token is for `host`
    assert (claims.exp, claims.nonce) == (T0 + 300, nonce)
    assert reference_verify([SECRET], token, host, T0) == (host, T0 + 300, nonce)


@given(st.text(max_size=120))
def test_the_rust_core_and_the_reference_agree_on_arbitrary_strings(token: str) -> None:
    assert refused_by_python_path(token) == refused_by_reference(token)
