"""A callback run each time a descriptor turns readable, for the two long-lived descriptors of a
gateway: the listening socket and the engine's doorbell.

``anyio.wait_readable`` registers the descriptor with the event loop and unregisters it once it
is readable: two ``epoll_ctl`` calls, a future and a task wake-up per batch of connections or of
news. Under asyncio, :class:`Readiness` registers the descriptor once (``loop.add_reader``) and
the loop calls the callback itself (benches/README.md, "Session opens, round 5": about 12 µs
less CPU per session opened eight at a time). Other backends (trio) keep the ``wait_readable``
loop, with the same behaviour: the callback runs once per readiness, never two at a time, until
:meth:`Readiness.run` is cancelled; an exception it raises ends :meth:`~Readiness.run` with it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import anyio

__all__ = ["Readiness"]


class Readiness:
    """Calls ``callback()`` whenever ``fd`` is readable while :meth:`run` runs and it is not
    paused (see the module docs)."""

    def __init__(self, fd: int, callback: Callable[[], None]) -> None:
        self.fd = fd
        self._callback = callback
        self._loop: asyncio.AbstractEventLoop | None = None  # asyncio: the loop it is on
        self._watching = False  # asyncio: registered with the loop now
        self._paused = False
        self._resumed: anyio.Event | None = None  # other backends: what a paused run waits on
        self._resume_after: float | None = None  # other backends: a timed pause's length
        self._timer: asyncio.TimerHandle | None = None  # asyncio: a timed pause's end
        self._pauses = 0  # other backends: pauses so far (a timed one ends only if the last)
        self._failed: BaseException | None = None
        self._ended: anyio.Event | None = None

    async def run(self) -> None:
        """Watch ``fd`` until cancelled, or until the callback raises (raised here)."""
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:  # not asyncio
            await self._run_waiting()
            return
        self._ended = anyio.Event()
        try:
            self._watch()
            await self._ended.wait()
        finally:
            self._unwatch()
            self._cancel_timer()
            self._loop = None
        assert self._failed is not None  # the only way _ended is set
        raise self._failed

    def pause(self, seconds: float | None = None) -> None:
        """Stop calling back until :meth:`resume` (or for ``seconds``, then resume). A pause
        replaces the one in force, its time included."""
        self._paused = True
        self._pauses += 1
        self._unwatch()
        self._cancel_timer()
        self._resume_after = None
        if seconds is not None:
            if self._loop is not None:
                self._timer = self._loop.call_later(seconds, self.resume)
            else:
                self._resume_after = seconds

    def resume(self) -> None:
        """Call back again when ``fd`` is readable (a no-op when not paused)."""
        self._cancel_timer()
        if not self._paused:
            return
        self._paused = False
        if self._loop is not None:
            self._watch()
        elif self._resumed is not None:
            self._resumed.set()

    @property
    def paused(self) -> bool:
        """Whether :meth:`pause` is in force."""
        return self._paused

    # asyncio: the loop calls back.

    def _watch(self) -> None:
        if self._loop is not None and not self._watching and not self._paused:
            self._loop.add_reader(self.fd, self._ready)
            self._watching = True

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _unwatch(self) -> None:
        if self._loop is not None and self._watching:
            self._loop.remove_reader(self.fd)
            self._watching = False

    def _ready(self) -> None:
        try:
            self._callback()
        except BaseException as exc:  # ends run() with it, as the waiting loop would
            self._failed = exc
            self._unwatch()
            assert self._ended is not None
            self._ended.set()

    # Other backends: a task waits.

    async def _run_waiting(self) -> None:
        while True:
            if self._paused:
                seconds, self._resume_after = self._resume_after, None
                if seconds is not None:
                    pauses = self._pauses
                    await anyio.sleep(seconds)
                    if self._pauses == pauses:  # not resumed nor paused again meanwhile
                        self.resume()
                    continue
                self._resumed = anyio.Event()
                await self._resumed.wait()
                continue
            await anyio.wait_readable(self.fd)
            if not self._paused:  # paused during the wait: not called back
                self._callback()
