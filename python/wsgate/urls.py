"""Bots' WebSocket URLs (an agent's ``upstream``): checked when settings are built, split into
what the dial needs. Imports nothing of wsgate."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = ["UpstreamURL", "parse_http_url", "parse_upstream_url"]

# The request target sent to a bot: visible ASCII after the leading slash.
_RESOURCE = re.compile(r"/[\x21-\x7e]*")


@dataclass(frozen=True)
class UpstreamURL:
    """A bot's ``ws://`` or ``wss://`` URL, split into what the dial needs."""

    url: str
    host: str
    port: int
    #: Path and query of the upgrade request, e.g. ``/ws`` or ``/ws?room=a``.
    resource: str
    #: ``wss://``: TLS to the bot, whose certificate must name :attr:`host`.
    tls: bool = False

    @property
    def host_header(self) -> str:
        """The ``Host`` header value: the host, bracketed if IPv6, with a non-default port."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == (443 if self.tls else 80) else f"{host}:{self.port}"


def parse_upstream_url(url: str) -> UpstreamURL:
    """Check and split an upstream URL; raises ``ValueError`` with a reason for a config error."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss"):
        raise ValueError("must be a ws:// URL (or wss://)")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not contain user information")
    if parts.fragment or url.endswith("#"):
        raise ValueError("must not contain a fragment")
    if not parts.hostname:
        raise ValueError("has no host")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("has an invalid port") from None
    resource = parts.path or "/"
    if parts.query:
        resource += "?" + parts.query
    if not _RESOURCE.fullmatch(resource):
        raise ValueError("has a path with characters that must be percent-encoded")
    tls = parts.scheme == "wss"
    default = 443 if tls else 80
    return UpstreamURL(url, parts.hostname, default if port is None else port, resource, tls)


def parse_http_url(url: str) -> UpstreamURL:
    """An ``http://`` or ``https://`` base URL (a bot's Session API elsewhere, a gateway's
    internal address), as the ``ws://``/``wss://`` URL of the same origin, what a dial takes;
    :attr:`UpstreamURL.resource` is its path without a trailing ``/`` (empty at the root).
    Raises ``ValueError`` with a reason."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("http", "https"):
        raise ValueError("must be an http:// URL (or https://)")
    if "?" in rest:
        raise ValueError("must not have a query")
    parsed = parse_upstream_url(("ws" if scheme == "http" else "wss") + "://" + rest)
    return UpstreamURL(url, parsed.host, parsed.port, parsed.resource.rstrip("/"), parsed.tls)
