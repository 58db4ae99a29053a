"""Bot pools: an agent whose ``upstream`` is a list of bots, and which member serves a session.

The rules (issue 13), in one place:

- A new session goes to the member in service with the fewest live sessions on this gateway
  (counted from the moment it is chosen, so sessions opened at once spread too); ties go round
  robin, starting after the member chosen last.
- A member whose dial fails (refused, a bad answer, no 101 in time) is skipped and the next one
  tried, all within one ``dial_timeout`` budget; it is then left out of new sessions for
  ``upstream_retry_after`` seconds. Members left out are tried only after every member in
  service failed (so when all are out, all are tried, the one back soonest first): the client
  gets 502 or 504 (the status of the last try) only when every member failed or the budget ran
  out.
- The budget: each try gets an equal share of the time left among the members of its group (in
  service, then left out) still to be tried. A member that hangs cannot use up the others' time,
  and time a member did not need goes to the next ones.

A string ``upstream`` is a pool of one, dialled the same way (its whole budget for one try, no
log line of its own). Only a list's members are named: in the gateway's log by position and
address (never the full URL, whose query may hold what is not for a log), to clients and on
``/readyz`` (public) by position alone.

:class:`Pool` decides (no I/O: times in, order out); :class:`Pools` dials. Counts are per
gateway process, like ``max_sessions``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import anyio

from .config import AgentConfig
from .errors import HttpError
from .upstream import BotConnection, dial
from .urls import UpstreamURL

__all__ = ["Member", "Pool", "Pools"]

log = logging.getLogger("wsgate")

# What upstream.dial puts before the reason of every failure.
_UNREACHABLE = "bot unreachable: "


@dataclass(eq=False)
class Member:
    """One bot of a pool and what this gateway knows of it."""

    #: 1-based position in the agent's ``upstream`` list: its name in logs and ``/readyz``.
    position: int
    url: UpstreamURL
    #: Whether its pool is a list (:attr:`Pool.listed`).
    listed: bool
    #: Sessions on this member: being dialled, or open.
    live: int = 0
    #: Clock time (``anyio.current_time``) until which the member is left out; in service once
    #: it has passed.
    out_until: float = float("-inf")
    #: Why its last dial failed; None once one succeeds.
    last_error: str | None = None

    @property
    def label(self) -> str:
        """``member 2 (10.0.0.12:9001)``: position and address, for the gateway's log."""
        return f"member {self.position} ({self.url.host_header})"


class Pool:
    """The members of one agent, and the choice among them. No I/O: the caller passes the
    time and reports each dial."""

    def __init__(self, service_host: str, urls: Sequence[UpstreamURL], *, listed: bool) -> None:
        self.service_host = service_host
        #: Whether the agent's ``upstream`` is a list: only then are members named anywhere.
        self.listed = listed
        self.members = tuple(Member(i + 1, url, listed) for i, url in enumerate(urls))
        self._next = 0  # index of the member that wins the next tie

    def plan(self, now: float) -> tuple[list[Member], list[Member]]:
        """The order in which to try members for a new session: those in service (fewest live
        sessions first, ties round robin), then those left out (back soonest first)."""
        count = len(self.members)

        def turn(member: Member) -> int:
            return (member.position - 1 - self._next) % count

        in_service = [m for m in self.members if m.out_until <= now]
        left_out = [m for m in self.members if m.out_until > now]
        in_service.sort(key=lambda m: (m.live, turn(m)))
        left_out.sort(key=lambda m: (m.out_until, turn(m)))
        return in_service, left_out

    def chosen(self, member: Member) -> None:
        """A dial of ``member`` begins: it counts as a live session from now on."""
        member.live += 1
        self._next = member.position % len(self.members)

    def failed(self, member: Member, now: float, retry_after: float, reason: str) -> None:
        """Its dial failed: no session there, and leave it out until ``now + retry_after``."""
        member.live -= 1
        if member.listed:
            newly = member.out_until <= now
            log.log(
                logging.WARNING if newly else logging.DEBUG,
                "pool %s %s failed (%s); left out for %g s",
                self.service_host,
                member.label,
                reason,
                retry_after,
            )
        member.out_until = now + retry_after
        member.last_error = reason

    def answered(self, member: Member) -> None:
        """Its dial succeeded: back in service if it was out."""
        if member.last_error is not None and member.listed:
            log.info("pool %s %s answers again", self.service_host, member.label)
        member.out_until = float("-inf")
        member.last_error = None

    def status(self, now: float) -> list[str]:
        """One line per member for ``/readyz``: live sessions, and whether it is left out."""
        lines = []
        for member in self.members:
            line = f"{self.service_host} member {member.position}: {member.live} sessions"
            if member.out_until > now:
                line += f"; left out for {member.out_until - now:.1f} s ({member.last_error})"
            lines.append(line)
        return lines


class Pools:
    """The pools of one gateway's upstream agents, made at their first use."""

    def __init__(self, retry_after: float) -> None:
        #: ``upstream_retry_after``: seconds a member that failed is left out.
        self.retry_after = retry_after
        self._pools: dict[str, Pool] = {}

    def pool(self, agent: AgentConfig) -> Pool:
        """The pool of an agent with an ``upstream`` (a string is a pool of one)."""
        pool = self._pools.get(agent.service_host)
        if pool is None:
            listed = not isinstance(agent.upstream, str)
            pool = Pool(agent.service_host, agent.upstream_urls, listed=listed)
            self._pools[agent.service_host] = pool
        return pool

    async def dial(
        self,
        agent: AgentConfig,
        *,
        session_uuid: str,
        body_value: str | None,
        subprotocols: Sequence[str],
        timeout: float,
    ) -> tuple[Member, BotConnection]:
        """Dial members of the agent's pool in :meth:`Pool.plan` order until one answers, all
        within ``timeout`` seconds. The member returned counts the session as live until
        :meth:`release`. Raises the last try's ``HttpError`` (502, or 504 timed out) when none
        answered; for a list it names every member tried."""
        pool = self.pool(agent)
        deadline = anyio.current_time() + timeout
        failures: list[tuple[Member, HttpError]] = []
        in_service, left_out = pool.plan(anyio.current_time())
        for group in (in_service, left_out):
            for tried, member in enumerate(group):
                left = deadline - anyio.current_time()
                if left <= 0:
                    break
                pool.chosen(member)
                try:
                    bot = await dial(
                        member.url,
                        session_uuid=session_uuid,
                        body_value=body_value,
                        subprotocols=subprotocols,
                        timeout=left / (len(group) - tried),
                    )
                except HttpError as exc:
                    reason = exc.reason.removeprefix(_UNREACHABLE)
                    pool.failed(member, anyio.current_time(), self.retry_after, reason)
                    failures.append((member, exc))
                    continue
                except BaseException:
                    self.release(member)  # cancelled (the client left, a stop): not the bot's fault
                    raise
                pool.answered(member)
                return member, bot
        raise _refusal(pool, failures)

    def release(self, member: Member | None) -> None:
        """A session that :meth:`dial` opened has ended (or never started)."""
        if member is not None:
            member.live -= 1

    def status(self, agents: Iterable[AgentConfig]) -> list[str]:
        """``/readyz`` lines for the members of every agent whose ``upstream`` is a list."""
        now = anyio.current_time()
        pools = (self.pool(agent) for agent in agents if agent.upstream is not None)
        return [line for pool in pools if pool.listed for line in pool.status(now)]


def _refusal(pool: Pool, failures: list[tuple[Member, HttpError]]) -> HttpError:
    """The answer when no member answered: the last try's status, or 504 when the budget ran
    out before every member was tried; for a list, the reason names each member's failure."""
    if len(pool.members) == 1 and failures:
        return failures[0][1]  # a pool of one: the bot's own answer, as before pools
    reasons = {m.position: exc.reason.removeprefix(_UNREACHABLE) for m, exc in failures}
    status = failures[-1][1].status if len(reasons) == len(pool.members) else 504
    parts = [f"{m.position}: {reasons.get(m.position, 'no time left')}" for m in pool.members]
    return HttpError(status, f"{_UNREACHABLE}every member failed ({'; '.join(parts)})")
