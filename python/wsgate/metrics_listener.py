"""The metrics listener (``[gateway] metrics_port``): plain HTTP for monitoring, apart from the
clients' port.

``GET /metrics`` (:class:`~wsgate.metrics.Metrics`), ``/livez`` and ``/readyz``, one request per
connection, bound to ``metrics_host`` (loopback by default) so the metrics need not be public.
It outlives the gateway's own listener: that one closes at once on a stop, while this one keeps
answering until the drain is over, so ``/readyz`` says 503 "draining" to a load balancer or a
Kubernetes probe instead of refusing the connection.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable

import anyio
from anyio.abc import TaskStatus

from . import _core
from ._sockets import read_head, send_and_close
from .connection import HEALTH_PATHS
from .errors import HeadTooLarge, HttpError
from .metrics import METRICS_PATH, Metrics
from .request import parse_request
from .responses import plain_response

__all__ = ["respond", "serve_metrics"]

log = logging.getLogger("wsgate")

# Connections served at once; more wait in the backlog.
_CONNECTIONS = 16


async def serve_metrics(
    listener: socket.socket,
    metrics: Metrics,
    health: Callable[[str], bytes],
    timeout: float,
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Answer on ``listener`` until cancelled; each request must arrive within ``timeout``
    seconds."""
    limiter = anyio.Semaphore(_CONNECTIONS)
    async with anyio.create_task_group() as tg:
        task_status.started()
        while True:
            await limiter.acquire()
            try:
                await anyio.wait_readable(listener)
                sock, _ = listener.accept()
            except (BlockingIOError, ConnectionAbortedError):
                limiter.release()
                continue
            except OSError as exc:
                limiter.release()
                log.warning("metrics listener: accept failed (%s); pausing 100 ms", exc.strerror)
                await anyio.sleep(0.1)
                continue
            except BaseException:
                limiter.release()
                raise
            sock.setblocking(False)
            tg.start_soon(_answer, sock, metrics, health, timeout, limiter)


async def _answer(
    sock: socket.socket,
    metrics: Metrics,
    health: Callable[[str], bytes],
    timeout: float,
    limiter: anyio.Semaphore,
) -> None:
    try:
        response = None
        with anyio.move_on_after(timeout):
            head, _ = await read_head(sock, _core.MAX_HEADER_BYTES)
            response = respond(head, metrics, health)
        if response is not None:
            await send_and_close(sock, response)
    except (EOFError, OSError, HeadTooLarge):
        pass  # gone, or not a request worth an answer
    finally:
        sock.close()
        limiter.release()


def respond(head: bytes, metrics: Metrics, health: Callable[[str], bytes]) -> bytes:
    """The response to one request head (no I/O of its own; on the event loop, as
    :meth:`Metrics.exposition` wants). ``health(path)``: ``/livez``'s or ``/readyz``'s answer,
    the same as on the gateway's own port."""
    try:
        request = parse_request(head)
    except HttpError as exc:
        return exc.response()
    if request.method != "GET":
        return plain_response(405, "method not allowed")
    if request.path == METRICS_PATH:
        return metrics.exposition(request.header("accept"))
    if request.path in HEALTH_PATHS:
        return health(request.path)
    return plain_response(404, "not found")
