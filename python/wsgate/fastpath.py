"""Which agents' sessions the Rust engine opens by itself (``engine_opens``), and what Python
does with the news of each.

An open through Python costs about a millisecond of CPU (accept, a task, the request read and
parsed, the bot dialled and its 101 read, the handover), most of it event-loop machinery around
a few system calls (benches/README.md, "Session opens"). For the plainest agents the engine does
it all on a relay thread (``rust/open.rs``): it accepts, reads the request (at once, or on a
relay thread as it arrives: ``rust/reading.rs``, under the Python path's ``handshake_timeout``
and ``max_pending_upgrades``), and when it is a whole generic-endpoint upgrade that one of the
routes given here serves, takes a place, dials the bot, checks its 101, answers the client and
relays. Everything else — another endpoint, any refusal, an agent not listed — comes back to the
Python path with the bytes read, so every check of SPEC §2 and every error keeps its one
implementation in Python. The recogniser in Rust only ever takes what Python would take.

An agent is listed when nothing but the request decides its sessions: an ``upstream`` that is
one ``ws://`` URL at an IP literal (no resolver, no pool to choose from, no TLS), no in-process
bot, and ``none`` auth — or ``token`` auth with the memory replay store on the real clock: the
engine then checks the token as :meth:`~wsgate.tokens.TokenAuthority.check` does (with the same
keys), holds the body to it, and uses it up in the same set of nonces
(``MemoryReplayStore.nonces``) after the capacity check; a token it does not take (missing,
refused, replayed) is left to the Python path, which answers it. The gateway lists none when it
has an ``authorize`` hook, a capacity store or per-client limits (``client_request_rate``,
``client_max_sessions``), which all need Python for every session. With TLS on the listener the
engine does each connection's handshake too, on the relay thread that reads its request; a
connection it does not open comes to Python with its TLS, the handshake done.

An opened session is kept by the engine (found, listed and stopped through the Session API like
any other: Python adopts it when asked), which counts its dial and its end; Python hears of it
at its end, with its news, and logs it. One not opened comes back through the engine's
doorbell: the client's socket is answered 502/504 in the words of
:func:`~wsgate.upstream.dial`, counted and logged as Python's own refusals.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from . import _core
from .config import AgentConfig, GatewaySettings
from .replay import MemoryReplayStore
from .tokens import TokenAuthority
from .upstream import is_ip_literal

__all__ = ["engine_tokens", "fast_agents", "fast_routes"]


def fast_agents(
    settings: GatewaySettings,
    agents: Mapping[str, AgentConfig],
    bots: Mapping[str, object],
    *,
    hooks: bool,
    authority: TokenAuthority | None = None,
) -> dict[str, AgentConfig]:
    """The agents whose sessions the engine may open by itself (see the module docs).
    ``hooks``: the gateway has an ``authorize`` hook or a capacity store; ``authority``: its
    token authority, if any (its token agents are listed when :func:`engine_tokens` can)."""
    if (
        not settings.engine_opens
        or hooks
        or settings.client_request_rate
        or settings.client_max_sessions
    ):
        return {}
    chosen = {}
    for service_host, agent in agents.items():
        tokens_ok = agent.websocket_auth == "none" or engine_tokens(authority) is not None
        if not tokens_ok or service_host in bots or not isinstance(agent.upstream, str):
            continue
        (url,) = agent.upstream_urls
        if not url.tls and is_ip_literal(url.host):
            chosen[service_host] = agent
    return chosen


def engine_tokens(
    authority: TokenAuthority | None,
) -> tuple[_core.TokenKeys, _core.Nonces] | None:
    """What the engine checks and uses up tokens with — the authority's keys and its memory
    store's nonces — when it can do so exactly as the authority would: the memory store (not
    Redis: a round trip per session that is the Python path's), both on the real clock."""
    if authority is None:
        return None
    store = authority.store
    if not isinstance(store, MemoryReplayStore):
        return None
    if authority.clock is not time.time or store.clock is not time.time:
        return None
    return authority.keys, store.nonces


def fast_routes(
    settings: GatewaySettings,
    agents: Mapping[str, AgentConfig],
    time_limit: float,
    counted: Callable[[str], int | None],
    authority: TokenAuthority | None = None,
) -> list[_core.FastRoute]:
    """The engine's route table for ``agents`` (from :func:`fast_agents`): each session's
    limits as the Python path gives them, counted under the index ``counted`` gives its agent
    (:meth:`wsgate.engine.Relay.counted`), a token agent's tokens checked with ``authority``'s
    keys and used up in its nonces."""
    tokens = engine_tokens(authority)
    routes = []
    for service_host, agent in agents.items():
        (url,) = agent.upstream_urls
        keys, nonces = (None, None)
        if agent.websocket_auth == "token":
            assert tokens is not None  # fast_agents lists token agents only then
            keys, nonces = tokens
        routes.append(
            _core.FastRoute(
                service_host,
                agent.max_sessions,
                url.host,
                url.port,
                url.resource,
                url.host_header,
                settings.max_message_size,
                time_limit,
                settings.dial_timeout,
                agent=counted(service_host),
                keys=keys,
                nonces=nonces,
            )
        )
    return routes
