"""Errors that wsgate raises: the whole tree, in one place.

Hierarchy::

    WsgateError
    ├── ConfigError            a settings file or Config object that cannot be served
    ├── HttpError              a request answered with an HTTP error instead of a WebSocket
    │   └── TokenRejected      403 for a session token, with why (a bounded ``kind``)
    ├── OpeningError           after the upgrade (Twilio's opening): a close code and reason
    ├── StoreUnavailable       a shared store (Redis, Valkey) cannot answer
    │   └── ReplayStoreUnavailable  the replay store: token sessions fail closed (503)
    └── ClientError            the Python client's (wsgate.client)
        ├── BodyTooLarge       a session body over 4 KB: no request was made
        └── StatusError        an HTTP error answer, with its status and reason
            ├── StartError     from /start
            ├── SessionControlError  from listing or stopping sessions
            └── UpgradeRefused from the WebSocket upgrade
    BotHandshakeError (ValueError)  a bot's answer to our upgrade that we cannot relay (502)
    HeadTooLarge                    an HTTP head over its limit (431 from a client, 502 from a bot)

``HttpError`` and ``OpeningError`` carry what the client receives (a status or close code, and
a one-line reason), so their reasons never hold a token, a key or a body; they are raised by the
Sans-I/O checks and turned into a response or a close frame by the server. The native module's
``_core.TokenError`` and ``_core.BodyError`` are mapped to ``HttpError`` where they are caught.
"""

from __future__ import annotations

from .responses import plain_response

__all__ = [
    "BodyTooLarge",
    "BotHandshakeError",
    "ClientError",
    "ConfigError",
    "HeadTooLarge",
    "HttpError",
    "OpeningError",
    "ReplayStoreUnavailable",
    "SessionControlError",
    "StartError",
    "StatusError",
    "StoreUnavailable",
    "TokenRejected",
    "UpgradeRefused",
    "WsgateError",
]


class WsgateError(Exception):
    """Base class of every error wsgate raises on purpose."""


class ConfigError(WsgateError, ValueError):
    """Settings that cannot be served; the message names the file, table and key at fault."""


class HttpError(WsgateError):
    """A request that is answered with ``status`` and a one-line plain-text ``reason``.

    The reason is shown to the client, so it never holds a token, a key or a body.
    """

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.status} {self.reason}"

    def response(self) -> bytes:
        """The refusal as a complete plain-text HTTP response (what the gateway sends)."""
        return plain_response(self.status, self.reason)


class TokenRejected(HttpError):
    """A session token refused with 403. ``kind`` says why, one of a bounded set (the
    ``reason`` label of ``wsgate_token_rejections_total``): ``missing``, ``malformed``,
    ``bad_signature``, ``wrong_agent``, ``expired``, ``wrong_body`` (a ``?body=`` the token does
    not bind) or ``replayed``. Made in one place, :mod:`wsgate.tokens`."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(403, reason)
        self.kind = kind


class OpeningError(WsgateError):
    """The client's opening cannot be accepted: close the WebSocket with ``code`` and ``reason``.

    The reason goes to the client in a close frame (at most 123 bytes), so it is one fixed line
    that never holds client data.
    """

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.code} {self.reason}"


class StoreUnavailable(WsgateError):
    """A shared store (Redis or Valkey: replay marks, capacity leases) cannot answer:
    unreachable, timed out, refusing the credentials or the command. The message names the
    store, its address and the command, never a password, a key or an argument."""


class ReplayStoreUnavailable(StoreUnavailable):
    """The replay store cannot answer (unreachable, timed out, full or refusing): a token
    session must be refused with 503 rather than risk a replay."""


class ClientError(WsgateError):
    """Base of the client's errors."""


class BodyTooLarge(ClientError, ValueError):
    """A session body over ``_core.MAX_BODY_BYTES`` of JSON; no request was made."""


class StatusError(ClientError):
    """An HTTP error answer: ``status`` and the server's one-line ``reason``."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.status} {self.reason}"


class StartError(StatusError):
    """``/start`` answered with an error (or with something that is not its JSON)."""


class SessionControlError(StatusError):
    """Listing or stopping sessions answered with an error (401/403 key, 404 not live…)."""


class UpgradeRefused(StatusError):
    """The gateway refused the WebSocket upgrade (403 token, 404 agent, 503 capacity…)."""


class BotHandshakeError(ValueError):
    """The bot's answer to our upgrade request is not one we can relay; the message says why."""


class HeadTooLarge(Exception):
    """An HTTP head longer than the limit (a client gets 431, a bot's answer is a 502)."""
