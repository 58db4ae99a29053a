"""The ``wsgate`` command, a thin layer over the library:

- ``wsgate serve [--config FILE] [--host H] [--port P]``: run a gateway until SIGTERM or Ctrl-C;
  SIGHUP reads the TLS certificate again;
- ``wsgate start --url URL --agent NAME [--key pk_…] [--body JSON] [--ca-file PEM]``: call
  ``/start`` and print its JSON (what a telephony webhook hands on); the key may come from
  ``WSGATE_PUBLIC_KEY``;
- ``wsgate token mint|verify [--body JSON]``: for operators, with the secrets of ``--config``
  (or ``WSGATE_SECRETS``). ``verify`` reads the token from standard input, so it stays out of
  the process list and shell history. A token binds its body exactly as one from ``/start``;
- ``wsgate sessions list|stop --url URL --agent NAME [--key sk_…] [--limit N --after ID |
  --id ID]``: list an agent's live sessions (one page, JSON: ids, start, provider and call,
  messages and bytes each way) or stop one, with a private key
  (default ``WSGATE_PRIVATE_KEY``);
- ``wsgate status [--url URL]``: a running gateway's ``/metrics`` as a table per agent
  (:mod:`wsgate.status`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import signal
import ssl
import sys
import time
import urllib.error
from collections.abc import Sequence
from functools import partial
from typing import Literal

import anyio
from anyio.abc import TaskStatus

from .body import encode_body
from .client import (
    SessionControlError,
    StartError,
    list_sessions,
    start_sync,
    stop_session,
)
from .config import default_config, load_config
from .errors import ConfigError, HttpError, WsgateError
from .logs import configure as configure_logging
from .server import Gateway
from .status import status
from .tokens import TokenAuthority, check_body, load_secrets

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
    start = commands.add_parser("start", help="call /start and print its JSON")
    start.add_argument("--url", required=True, help="the gateway, e.g. http://127.0.0.1:8765")
    start.add_argument("--agent", required=True, help="agent name (the org is the key's)")
    start.add_argument("--key", help="public API key pk_… (default: $WSGATE_PUBLIC_KEY)")
    start.add_argument("--body", help="session body: a JSON document of at most 4 KB")
    start.add_argument(
        "--ca-file", help="PEM roots for an https:// gateway with a private CA (default: system's)"
    )
    control = commands.add_parser("sessions", help="list or stop live sessions (private key)")
    control.add_argument("action", choices=("list", "stop"))
    control.add_argument("--url", required=True, help="the gateway, e.g. http://127.0.0.1:8765")
    control.add_argument("--agent", required=True, help="agent name (the org is the key's)")
    control.add_argument("--key", help="private API key sk_… (default: $WSGATE_PRIVATE_KEY)")
    control.add_argument("--id", help="stop: the sessionId")
    control.add_argument("--limit", type=int, help="list: sessions on the page (1-1000)")
    control.add_argument("--after", help="list: the page after this sessionId (its 'next')")
    control.add_argument(
        "--ca-file", help="PEM roots for an https:// gateway with a private CA (default: system's)"
    )
    show = commands.add_parser("status", help="a running gateway's metrics, per agent")
    show.add_argument(
        "--url",
        default="http://127.0.0.1:8765",
        help="the gateway, or its metrics listener (default: %(default)s)",
    )
    show.add_argument(
        "--interval",
        type=float,
        default=1.0,
        help="seconds between the two scrapes that give msgs/s; 0: one scrape (default: 1)",
    )
    token = commands.add_parser("token", help="mint or check session tokens (operators)")
    token.add_argument("action", choices=("mint", "verify"))
    token.add_argument("--agent", required=True, help="service host {agent}.{org}")
    token.add_argument("--config", metavar="FILE", help="settings with secrets/secrets_file")
    token.add_argument(
        "--body",
        help="mint: bind this session body (JSON), as /start does; verify: the body to hold the "
        "token to (without it: no body)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``wsgate`` command; returns the exit code."""
    args = _parser().parse_args(argv)
    if args.command == "start":
        return _start(args)
    if args.command == "token":
        return _token(args)
    if args.command == "sessions":
        return _sessions(args)
    if args.command == "status":
        return _status(args)
    try:
        config = load_config(args.config) if args.config else default_config()
        changes = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
        if changes:
            config = config.replace_gateway(**changes)
        # Builds the token authority too: a missing or empty secrets file is a settings error.
        gateway = Gateway(config)
    except ConfigError as exc:
        print(f"wsgate: {exc}", file=sys.stderr)
        return 2
    configure_logging(args.log_level, config.gateway.log_format)
    _raise_open_files_limit()
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


def _raise_open_files_limit() -> None:
    """Lift the soft open-files limit to the hard one, as nginx's worker_rlimit_nofile does: a
    session holds two descriptors, and a soft limit of 1024 would cap a gateway at ~500."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _start(args: argparse.Namespace) -> int:
    key = args.key or os.environ.get("WSGATE_PUBLIC_KEY")
    if not key:
        print("wsgate: give --key or set WSGATE_PUBLIC_KEY", file=sys.stderr)
        return 2
    try:
        body = None if args.body is None else json.loads(args.body)
    except ValueError:
        print("wsgate: --body is not JSON", file=sys.stderr)
        return 2
    context = _ssl_context(args.ca_file)
    if context is False:
        return 2
    try:
        result = start_sync(args.url, args.agent, key, body, ssl_context=context)
    except StartError as exc:
        print(f"wsgate: /start answered {exc.status}: {exc.reason}", file=sys.stderr)
        return 1
    except (WsgateError, OSError, ValueError) as exc:
        print(f"wsgate: {exc}", file=sys.stderr)
        return 1
    answer = {"token": result.token, "wsUrl": result.ws_url, "sessionId": result.session_id,
              "body": result.body}  # fmt: skip
    print(json.dumps({k: v for k, v in answer.items() if v is not None}))
    return 0


def _ssl_context(ca_file: str | None) -> ssl.SSLContext | Literal[False] | None:
    """``--ca-file``'s roots for an https:// gateway (None: the system's); False after saying
    why the file cannot be used."""
    if ca_file is None:
        return None
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        print(f"wsgate: --ca-file: {exc}", file=sys.stderr)
        return False


def _sessions(args: argparse.Namespace) -> int:
    key = args.key or os.environ.get("WSGATE_PRIVATE_KEY")
    if not key:
        print("wsgate: give --key or set WSGATE_PRIVATE_KEY", file=sys.stderr)
        return 2
    if args.action == "stop" and not args.id:
        print("wsgate: sessions stop needs --id", file=sys.stderr)
        return 2
    context = _ssl_context(args.ca_file)
    if context is False:
        return 2
    try:
        if args.action == "stop":
            call = partial(stop_session, args.url, args.agent, key, args.id, ssl_context=context)
        else:
            call = partial(list_sessions, args.url, args.agent, key, limit=args.limit,
                           after=args.after, ssl_context=context)  # fmt: skip
        answer = anyio.run(call)
    except SessionControlError as exc:
        print(f"wsgate: the gateway answered {exc.status}: {exc.reason}", file=sys.stderr)
        return 1
    except (WsgateError, OSError, ValueError) as exc:
        print(f"wsgate: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(answer))
    if answer.get("unreachable"):  # a list without the sessions of gateways not reached
        missed = ", ".join(map(str, answer["unreachable"]))
        print(f"wsgate: not reached, their sessions are not listed: {missed}", file=sys.stderr)
    return 0


def _status(args: argparse.Namespace) -> int:
    try:
        print(status(args.url, args.interval))
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"wsgate: cannot read {args.url.rstrip('/')}/metrics: {exc}", file=sys.stderr)
        return 1
    return 0


def _token(args: argparse.Namespace) -> int:
    try:
        settings = load_config(args.config).gateway if args.config else None
        secrets = load_secrets(
            settings.secrets if settings else None,
            secrets_file=settings.secrets_file if settings else None,
        )
        authority = TokenAuthority(secrets, settings.token_ttl if settings else 300)
    except ConfigError as exc:
        print(f"wsgate: {exc}", file=sys.stderr)
        return 2
    document: bytes | None = None
    encoded: str | None = None
    if args.body is not None:
        try:
            document, encoded = encode_body(json.loads(args.body))
        except ValueError:
            print("wsgate: --body is not JSON", file=sys.stderr)
            return 2
    if args.action == "mint":
        minted = authority.mint(args.agent, document)
        answer = {"token": minted.token, "exp": minted.exp, "sessionId": minted.session_id}
        if encoded is not None:
            answer["body"] = encoded  # append as ?body=, like /start's
        print(json.dumps(answer))
        return 0
    token = sys.stdin.read().strip()
    try:
        claims = authority.check(token, args.agent)
        check_body(claims, document)
        exp = claims.exp
    except HttpError as exc:
        print(f"wsgate: refused: {exc.reason}", file=sys.stderr)
        return 1
    print(json.dumps({"valid": True, "serviceHost": args.agent, "exp": exp,
                      "expiresIn": exp - int(time.time())}))  # fmt: skip
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
                    # websockets is not a dependency of the gateway: a fresh install has no client.
                    "try the built-in echo bot: pip install websockets && "
                    f"python -m websockets {gateway.url}/ws/generic/echo.demo",
                    flush=True,
                )
        signal_tasks.cancel_scope.cancel()


async def _stop_on_signals(
    gateway: Gateway, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    """First SIGTERM/SIGINT: graceful drain. A second one: close the remaining sessions now.
    SIGHUP: read the TLS certificate and key again (live sessions keep theirs)."""
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        task_status.started()
        async for signum in signals:
            if signum == signal.SIGHUP:
                gateway.reload_tls()
                continue
            logging.getLogger("wsgate").info("%s: stopping", signal.Signals(signum).name)
            gateway.stop()
