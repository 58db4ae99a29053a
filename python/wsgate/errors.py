"""Errors that wsgate raises.

Hierarchy::

    WsgateError
    ├── ConfigError       a settings file or Config object that cannot be served
    └── HttpError         a request answered with an HTTP error instead of a WebSocket

``HttpError`` carries the status and the one-line plain-text reason that the client receives;
it is raised by the Sans-I/O request checks and turned into a response in exactly one place,
the server's connection handler.
"""

from __future__ import annotations

__all__ = ["ConfigError", "HttpError", "WsgateError"]


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
