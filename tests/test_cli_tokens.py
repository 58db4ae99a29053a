"""``wsgate start`` and ``wsgate token`` as an operator or a telephony webhook runs them."""

from __future__ import annotations

import base64
import json
import os
import sys

import anyio
import pytest

from wsgate.tokens import TokenAuthority

from .helpers import TOKEN_SECRET, Sentinel, token_gateway

pytestmark = pytest.mark.anyio


async def wsgate(*args: str, stdin: bytes = b"", **env: str) -> tuple[int, str, str]:
    result = await anyio.run_process(
        [sys.executable, "-m", "wsgate", *args],
        input=stdin,
        check=False,
        env={**os.environ, **env},
    )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


async def test_start_prints_the_start_json_a_webhook_needs(sentinel: Sentinel) -> None:
    async with token_gateway(sentinel.url) as gw:
        url = f"http://127.0.0.1:{gw.port}"
        code, out, _ = await wsgate(
            "start", "--url", url, "--agent", "talk", "--body", '{"caller": "+1555"}',
            WSGATE_PUBLIC_KEY="pk_test",
        )  # fmt: skip
        assert code == 0
        answer = json.loads(out)
        assert set(answer) == {"token", "wsUrl", "sessionId", "body"}
        assert gw.authority is not None
        gw.authority.check(answer["token"], "talk.test")  # a token this gateway accepts

        code, _, err = await wsgate("start", "--url", url, "--agent", "talk", "--key", "pk_no")
        assert (code, err) == (1, "wsgate: /start answered 401: Invalid public API key\n")
        # With a key, so that it is the body that is refused (and before any request).
        code, _, err = await wsgate(
            "start", "--url", url, "--agent", "talk", "--key", "pk_test", "--body", "{oops"
        )
        assert (code, err) == (2, "wsgate: --body is not JSON\n")
    assert not sentinel.dialled()


async def test_token_mint_and_verify_with_secrets_from_the_environment() -> None:
    code, out, _ = await wsgate("token", "mint", "--agent", "a.b", WSGATE_SECRETS=TOKEN_SECRET)
    assert code == 0
    token = json.loads(out)["token"]
    TokenAuthority([TOKEN_SECRET]).check(token, "a.b")
    code, out, _ = await wsgate(
        "token", "verify", "--agent", "a.b", stdin=token.encode(), WSGATE_SECRETS=TOKEN_SECRET
    )
    assert code == 0
    assert json.loads(out)["valid"] is True
    code, out, err = await wsgate(
        "token", "verify", "--agent", "c.d", stdin=token.encode(), WSGATE_SECRETS=TOKEN_SECRET
    )
    assert (code, out, err) == (1, "", "wsgate: refused: token is for another service host\n")


async def test_a_token_minted_with_a_body_verifies_only_with_that_body() -> None:
    code, out, _ = await wsgate(
        "token", "mint", "--agent", "a.b", "--body", '{"who": "A"}', WSGATE_SECRETS=TOKEN_SECRET
    )
    assert code == 0
    minted = json.loads(out)
    assert base64.b64decode(minted["body"]) == b'{"who":"A"}'  # as /start encodes it
    token = minted["token"].encode()
    for body, expected in [
        ('{"who":"A"}', (0, "")),
        (
            '{"who":"EVIL"}',
            (1, "wsgate: refused: ?body= differs from the body the token was issued with\n"),
        ),
        (None, (1, "wsgate: refused: token was issued with a body: ?body= is missing\n")),
    ]:
        args = ["token", "verify", "--agent", "a.b"] + ([] if body is None else ["--body", body])
        code, _, err = await wsgate(*args, stdin=token, WSGATE_SECRETS=TOKEN_SECRET)
        assert (code, err) == expected, body
    code, _, err = await wsgate(
        "token", "mint", "--agent", "a.b", "--body", "{oops", WSGATE_SECRETS=TOKEN_SECRET
    )
    assert (code, err.strip()) == (2, "wsgate: --body is not JSON")


async def test_token_commands_without_secrets_exit_2_with_a_reason() -> None:
    env = {k: v for k, v in os.environ.items() if k != "WSGATE_SECRETS"}
    result = await anyio.run_process(
        [sys.executable, "-m", "wsgate", "token", "mint", "--agent", "a.b"], check=False, env=env
    )
    assert (result.returncode, result.stderr) == (
        2,
        b"wsgate: token auth needs secrets: set secrets or secrets_file, or WSGATE_SECRETS\n",
    )


async def test_start_without_a_key_exits_2_before_any_request(sentinel: Sentinel) -> None:
    env = {k: v for k, v in os.environ.items() if k != "WSGATE_PUBLIC_KEY"}
    result = await anyio.run_process(
        [sys.executable, "-m", "wsgate", "start", "--url", "http://127.0.0.1:9", "--agent", "a"],
        check=False,
        env=env,
    )
    assert (result.returncode, result.stderr) == (
        2,
        b"wsgate: give --key or set WSGATE_PUBLIC_KEY\n",
    )
