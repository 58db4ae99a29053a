"""A pure-Python reference of the session token (SPEC §3) with ``hmac``, ``base64`` and
``json``: an executable spec that the Rust core is checked against, and the baseline of
``benches/bench_tokens.py``. Not used by wsgate itself."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from collections.abc import Sequence

from wsgate import _core


class ReferenceTokenError(ValueError):
    pass


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    # Canonical only: the exact output of _b64encode for some bytes.
    try:
        data = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raise ReferenceTokenError("token is malformed") from None
    if _b64encode(data) != text:
        raise ReferenceTokenError("token is malformed")
    return data


def mint(secret: bytes, service_host: str, exp: int, nonce: str) -> str:
    payload = json.dumps(
        {"sh": service_host, "exp": exp, "nonce": nonce}, separators=(",", ":"), ensure_ascii=False
    ).encode()
    first = _b64encode(payload)
    mac = hmac.new(secret, first.encode("ascii"), hashlib.sha256).digest()
    return f"{first}.{_b64encode(mac)}"


def verify(
    secrets: Sequence[bytes], token: str, service_host: str, now: int
) -> tuple[str, int, str]:
    if len(token) > _core.MAX_TOKEN_BYTES or token.count(".") != 1:
        raise ReferenceTokenError("token is malformed")
    first, second = token.split(".")
    if not first or not token.isascii():
        raise ReferenceTokenError("token is malformed")
    payload = _b64decode(first)
    mac = _b64decode(second)
    if len(mac) != 32:
        raise ReferenceTokenError("token is malformed")
    signed = False
    for secret in secrets:
        expected = hmac.new(secret, first.encode("ascii"), hashlib.sha256).digest()
        signed |= hmac.compare_digest(expected, mac)
    if not signed:
        raise ReferenceTokenError("token signature is invalid")
    try:
        claims = json.loads(payload)
    except ValueError:
        raise ReferenceTokenError("token is malformed") from None
    if not isinstance(claims, dict):
        raise ReferenceTokenError("token is malformed")
    sh, exp, nonce = claims.get("sh"), claims.get("exp"), claims.get("nonce")
    if not isinstance(sh, str) or not isinstance(nonce, str) or not nonce:
        raise ReferenceTokenError("token is malformed")
    if isinstance(exp, bool) or not isinstance(exp, int) or exp < 0:
        raise ReferenceTokenError("token is malformed")
    if sh != service_host:
        raise ReferenceTokenError("token is for another service host")
    if now >= exp:
        raise ReferenceTokenError("token has expired")
    return sh, exp, nonce
