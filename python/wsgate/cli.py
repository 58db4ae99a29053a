"""``wsgate serve [--config FILE] [--host H] [--port P]``: run a gateway until SIGTERM or Ctrl-C."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence

import anyio
from anyio.abc import TaskStatus

from .config import default_config, load_config
from .errors import ConfigError
from .server import Gateway

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wsgate", description="Self-hostable WebSocket relay gateway."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument(
        "--config", metavar="FILE", help="TOML settings (default: the built-in echo.demo agent)"
    )
    serve.add_argument("--host", help="address to listen on (overrides [gateway] host)")
    serve.add_argument("--port", type=int, help="TCP port, 0 for any (overrides [gateway] port)")
    serve.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    serve.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``wsgate`` command; returns the exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(message)s")
    try:
        config = load_config(args.config) if args.config else default_config()
        changes = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
        if changes:
            config = config.replace_gateway(**changes)
    except ConfigError as exc:
        print(f"wsgate: {exc}", file=sys.stderr)
        return 2
    gateway = Gateway(config)
    try:
        anyio.run(_serve, gateway, args.config is None, backend=args.backend)
    except Exception as exc:
        error = _sole_error(exc)
        if gateway.bound or not isinstance(error, OSError):
            raise
        # The gateway never listened: e.g. the port is taken or the host is not ours.
        print(
            f"wsgate: cannot listen on {config.gateway.host}:{config.gateway.port}: {error}",
            file=sys.stderr,
        )
        return 1
    return 0


def _sole_error(exc: BaseException) -> BaseException:
    """The one error inside (nested) task-group exception groups, else ``exc`` itself."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


async def _serve(gateway: Gateway, is_default: bool) -> None:
    async with anyio.create_task_group() as signal_tasks:
        await signal_tasks.start(_stop_on_signals, gateway)
        async with anyio.create_task_group() as serving:
            await serving.start(gateway.serve)
            print(f"wsgate serving on {gateway.url}", flush=True)
            if is_default:
                print(
                    "try the built-in echo bot: "
                    f"python -m websockets {gateway.url}/ws/generic/echo.demo",
                    flush=True,
                )
        signal_tasks.cancel_scope.cancel()


async def _stop_on_signals(
    gateway: Gateway, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    """First SIGTERM/SIGINT: graceful drain. A second one: close the remaining sessions now."""
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        task_status.started()
        async for signum in signals:
            logging.getLogger("wsgate").info("%s: stopping", signal.Signals(signum).name)
            gateway.stop()
