"""wsgate.relay inside a plain asyncio server: accept, answer the upgrade, hand the socket over.

    python examples/relay_asyncio.py ws://127.0.0.1:9001/ws 8765

Every connection to 127.0.0.1:8765 is upgraded here and relayed to the bot by wsgate's Rust
engine; this program only sees each session's outcome.
"""

from __future__ import annotations

import asyncio
import socket
import sys

import wsgate

MAX_HEAD = 8192


async def handle(conn: socket.socket, upstream: str) -> wsgate.Outcome | None:
    loop = asyncio.get_running_loop()
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await loop.sock_recv(conn, 4096)
        if not chunk or len(data) > MAX_HEAD:
            conn.close()
            return None
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    try:
        answer = wsgate.accept_upgrade(head + b"\r\n\r\n")
    except wsgate.HttpError as refused:
        await loop.sock_sendall(conn, refused.response())
        conn.close()
        return None
    await loop.sock_sendall(conn, answer)
    # From here the socket is wsgate's; `rest` holds any frames that came with the request.
    return await wsgate.relay(conn, upstream, pending=rest)


async def serve(listener: socket.socket, upstream: str) -> None:
    loop = asyncio.get_running_loop()
    sessions: set[asyncio.Task[wsgate.Outcome | None]] = set()
    while True:
        conn, _ = await loop.sock_accept(listener)
        task = asyncio.create_task(handle(conn, upstream))
        sessions.add(task)
        task.add_done_callback(sessions.discard)


def main() -> None:
    upstream, port = sys.argv[1], int(sys.argv[2])
    listener = socket.create_server(("127.0.0.1", port))
    listener.setblocking(False)
    asyncio.run(serve(listener, upstream))


if __name__ == "__main__":
    main()
