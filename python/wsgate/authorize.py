"""The embedder's say on each session: ``Gateway(config, authorize=...)``.

The callable sees a :class:`SessionRequest` once the request has passed every check of the
gateway (route, token verified and used up, ``?body=`` decoded, capacity taken) and before any
bot is reached. It may

- return ``None``: the session goes where the settings send it;
- return an upstream URL (``"ws://host:port/path"``): this session's bot, instead of the agent's
  (start a bot per session, as Pipecat Cloud does, or pick one by the caller's own API key);
- raise :class:`~wsgate.HttpError` ``(status, reason)``: the client gets that refusal (after a
  Twilio opening, its close code: :func:`wsgate.providers.close_for`).

It may be a plain function or a coroutine function. A refusal or an error gives back the
capacity and the token (the client may retry with it), as any session that does not start.
Anything else it raises is logged with its traceback and answered 500 "authorize failed": the
client never sees the exception's text.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import HttpError
from .urls import UpstreamURL, parse_upstream_url

__all__ = ["Authorize", "SessionRequest", "consult"]

log = logging.getLogger("wsgate")


@dataclass(frozen=True)
class SessionRequest:
    """A checked session request, as ``authorize`` sees it."""

    #: ``{agent}.{org}``.
    service_host: str
    agent: str
    org: str
    #: ``"generic"``, or the telephony provider whose endpoint was used (``"twilio"``...).
    provider: str
    #: The bot's ``X-Daily-Session-Id`` for this session (a token's, else a fresh UUID).
    session_id: str
    #: The request path, as sent (still percent-encoded; it may hold a token: never log it).
    path: str = field(repr=False)
    #: Every request header as ``(lower-cased name, value)``, in order. Never logged by wsgate.
    headers: tuple[tuple[str, str], ...] = field(repr=False)
    #: The decoded ``?body=`` (bound by the token when the agent uses tokens), or None.
    body: Any = field(repr=False)
    #: Whether a token was verified (and used up) for this session.
    token: bool
    #: The client's address key (an IPv4 address, or an IPv6 /64).
    client: str
    #: The provider's call id, when its opening gave one.
    call_id: str | None = None

    def header(self, name: str) -> str | None:
        """The value of header ``name`` (case-insensitive); repeats joined with ``", "``."""
        key = name.lower()
        values = [value for field_name, value in self.headers if field_name == key]
        return ", ".join(values) if values else None


#: ``authorize``'s type: see the module's docstring.
Authorize = Callable[[SessionRequest], "Awaitable[str | None] | str | None"]


async def consult(authorize: Authorize, request: SessionRequest) -> UpstreamURL | None:
    """Call ``authorize`` for one session: the upstream it picked, None, or ``HttpError``."""
    try:
        answer = authorize(request)
        if inspect.isawaitable(answer):
            answer = await answer
        if answer is None:
            return None
        if not isinstance(answer, str):
            raise TypeError(f"authorize returned {type(answer).__name__}, not str or None")
        return parse_upstream_url(answer)
    except HttpError:
        raise
    except Exception:
        log.exception(
            "authorize raised for %s session %s", request.service_host, request.session_id
        )
        raise HttpError(500, "authorize failed") from None
