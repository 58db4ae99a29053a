"""wsgate.relay inside a trio server: trio accepts and answers the upgrade, wsgate relays.

python examples/relay_trio.py ws://127.0.0.1:9001/ws 8765
"""

from __future__ import annotations

import sys
from functools import partial

import trio

import wsgate

MAX_HEAD = 8192


async def handle(upstream: str, stream: trio.SocketStream) -> wsgate.Outcome | None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(4096)
        if not chunk or len(data) > MAX_HEAD:
            return None  # serve_tcp closes the stream
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    try:
        answer = wsgate.accept_upgrade(head + b"\r\n\r\n")
    except wsgate.HttpError as refused:
        await stream.send_all(refused.response())
        return None
    await stream.send_all(answer)
    # wsgate takes the socket (trio's stream is left holding a detached one) and any early frames.
    return await wsgate.relay(stream.socket, upstream, pending=rest)


async def serve(
    upstream: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(partial(handle, upstream), listeners)


def main() -> None:
    trio.run(serve, sys.argv[1], int(sys.argv[2]))


if __name__ == "__main__":
    main()
