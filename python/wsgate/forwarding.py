"""Several gateways: a stop or a Session API call that lands on a gateway that does not hold the
session is forwarded to the one that does, so a load balancer may send it to any of them.

How: with a ``capacity_store`` and a ``forward_secret`` (or ``$WSGATE_FORWARD_SECRET``), every
gateway writes its live sessions to the store's session registry (``wsgate:session:{id}`` ->
its agent and ``internal_url``, renewed with the capacity leases: :mod:`wsgate.capacity`). A
gateway asked about a session it does not hold looks it up there and sends the client's request,
as it came (key included, its body read whole first), to the holder's ``internal_url`` over HTTP
with the secret in :data:`FORWARD_HEADER`; the holder's answer is streamed back as it is.

Invariants:
- A request carrying :data:`FORWARD_HEADER` is taken only with the right secret (compared in
  constant time; else 403, and nothing is done), and is never forwarded again: one hop at most,
  so no loop even with a registry that is out of date.
- The holder judges the forwarded request as its own (the key's checks, the agent, the
  session): the secret vouches only that it came from a gateway of the same store.
- The secret never reaches a bot (:func:`wsgate.session_api.forward_fields` drops the field)
  and is never logged.
- A session the registry does not know, or knows for another agent or at this gateway's own
  address (out of date): 404, as without forwarding. Store down: 503. Holder unreachable: 502;
  no answer in time (``dial_timeout`` to connect, then ``dial_timeout`` +
  ``session_api_timeout``, the holder's own budget and some, for its answer to start and for
  each pause in it): 504, or the answer cut short once it began.

The list (``GET /v1/agents/{agent}/sessions``) is not about one session: the gateway asked
reads from the agent's index in the store which other gateways hold its sessions
(:meth:`wsgate.capacity.RedisCapacity.gateways`), forwards the same request to each of them at
once (:meth:`Forwarder.lists`), and merges their pages with its own
(:func:`wsgate.session_api.merge_pages`). Each is a hop like the others: answered with that
gateway's own sessions only. All of them together get ``dial_timeout``; a gateway that did not
answer by then, or not with a page, is named in the list's ``unreachable`` and logged, and the
list is answered without its sessions. Store down: 503, as for a stop.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import anyio

from . import _core
from ._sockets import Conn
from .config import GatewaySettings, forward_secret
from .errors import HttpError, StoreUnavailable
from .session_api import hop_page
from .upstream import fetch, pass_answer
from .urls import parse_http_url

if TYPE_CHECKING:
    from .capacity import RedisCapacity

__all__ = ["FORWARD_HEADER", "Forwarder", "forwarded_head"]

log = logging.getLogger("wsgate")

#: The header a forwarded request carries: the shared secret.
FORWARD_HEADER = "x-wsgate-forward"
#: Largest page another gateway may answer to a list (1000 sessions take about 300 kB).
MAX_PAGE_BYTES = 4 * 1024 * 1024

# The request's own framing and routing: set again for the hop.
_FRAMING = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "expect",
        "te",
        "upgrade",
        FORWARD_HEADER,
    }
)


def forwarded_head(
    method: str,
    target: str,
    host: str,
    headers: Sequence[tuple[str, str]],
    secret: str,
    body_length: int,
) -> bytes:
    """The request head sent to the holder: the client's fields (its key included: the holder
    judges it again) less the framing, then the secret, the body's length and
    ``Connection: close``."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    lines += [f"{name}: {value}" for name, value in headers if name not in _FRAMING]
    lines.append(f"{FORWARD_HEADER}: {secret}")
    if body_length or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {body_length}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class Forwarder:
    """One gateway's side of forwarding: trusting forwarded requests, and forwarding its own."""

    def __init__(self, settings: GatewaySettings, capacity: RedisCapacity, secret: str) -> None:
        assert capacity.internal_url is not None
        self._settings = settings
        self._capacity = capacity
        self._own: Callable[[], str] = capacity.internal_url
        self._secret = secret.encode()
        self._secret_text = secret

    def __repr__(self) -> str:
        return "<Forwarder>"  # never the secret

    @classmethod
    def of(cls, settings: GatewaySettings, capacity: object) -> Forwarder | None:
        """The forwarder of a gateway with a session registry (a capacity store and a forward
        secret), else None."""
        from .capacity import RedisCapacity

        secret = forward_secret(settings)
        if secret is None or not isinstance(capacity, RedisCapacity) or not capacity.registry:
            return None
        return cls(settings, capacity, secret)

    @property
    def own_url(self) -> str:
        """This gateway's address in the registry (``internal_url``)."""
        return self._own()

    def trusts(self, value: str) -> bool:
        """Whether a :data:`FORWARD_HEADER` value is the shared secret (constant time)."""
        return hmac.compare_digest(value.encode("utf-8", "surrogateescape"), self._secret)

    async def forward(
        self,
        client: Conn,
        method: str,
        target: str,
        headers: Sequence[tuple[str, str]],
        body: bytes,
        session_id: str,
        service_host: str,
        tls: Callable[[], _core.TlsClientContext] | None = None,
    ) -> int | None:
        """Send the client's request to the gateway holding the session and stream its answer
        to ``client``: the answer's status, or None when no other gateway holds the session
        (the caller answers 404). Raises ``HttpError``, with nothing sent to ``client``: 503
        store down, 502 holder unreachable, 504 no answer in time. ``tls``: the roots for an
        ``https://`` holder."""
        try:
            found = await self._capacity.locate(session_id)
        except StoreUnavailable as exc:
            log.warning("session lookup failed: %s", exc)
            raise HttpError(503, "session registry unreachable") from None
        if found is None:
            return None
        host, where = found
        if host != service_host or where == self._own():
            return None
        try:
            origin = parse_http_url(where)
        except ValueError:
            log.warning("session registry holds a bad address for session %s", session_id)
            return None
        head = forwarded_head(
            method, target, origin.host_header, headers, self._secret_text, len(body)
        )
        settings = self._settings
        try:
            return await pass_answer(
                client,
                origin,
                head + body,
                head_only=method == "HEAD",
                dial_timeout=settings.dial_timeout,
                answer_timeout=settings.dial_timeout + settings.session_api_timeout,
                tls=None if tls is None or not origin.tls else tls(),
            )
        except HttpError as exc:
            log.warning("forward of session %s to %s failed: %s", session_id, where, exc.reason)
            reason = "gateway holding the session " + (
                "did not answer in time" if exc.status == 504 else "unreachable"
            )
            raise HttpError(exc.status, reason) from None

    async def lists(
        self,
        target: str,
        headers: Sequence[tuple[str, str]],
        service_host: str,
        tls: Callable[[], _core.TlsClientContext] | None = None,
    ) -> tuple[list[dict[str, Any]], list[str]]:
        """The list request (``target``: its path and query; ``headers``: the client's, key
        included) forwarded at once to every other gateway holding sessions of the agent: the
        pages they answered within ``dial_timeout``, and the internal URLs of those that did
        not (sorted). Raises ``HttpError`` 503 when the store cannot say who they are."""
        try:
            where = await self._capacity.gateways(service_host)
        except StoreUnavailable as exc:
            log.warning("gateway index lookup failed: %s", exc)
            raise HttpError(503, "session registry unreachable") from None
        others = sorted(set(where) - {self._own()})
        pages: dict[str, dict[str, Any]] = {}
        failed: set[str] = set()
        timeout = self._settings.dial_timeout

        async def ask(url: str) -> None:
            try:
                origin = parse_http_url(url)
                head = forwarded_head("GET", target, origin.host_header, headers,
                                      self._secret_text, 0)  # fmt: skip
                context = None if tls is None or not origin.tls else tls()
                status, body = await fetch(
                    origin, head, dial_timeout=timeout, limit=MAX_PAGE_BYTES, tls=context
                )
                if status != 200:
                    raise ValueError(f"answered {status}")
                pages[url] = hop_page(body)
            except HttpError as exc:
                failed.add(url)
                log.warning("list of %s: gateway %s not reached: %s", service_host, url,
                            exc.reason.removeprefix("bot "))  # fmt: skip
            except (ValueError, RecursionError) as exc:
                failed.add(url)
                log.warning("list of %s: gateway %s: %s", service_host, url, exc)

        with anyio.move_on_after(timeout):
            async with anyio.create_task_group() as group:
                for url in others:
                    group.start_soon(ask, url)
        missing = [url for url in others if url not in pages]
        for url in set(missing) - failed:
            log.warning("list of %s: gateway %s did not answer in time", service_host, url)
        return [pages[url] for url in others if url in pages], missing
