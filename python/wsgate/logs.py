"""Log lines: text (the default) or one JSON object per line (``[gateway] log_format = "json"``).

Every JSON line holds ``ts`` (UTC, RFC 3339 with milliseconds), ``level``, ``event`` (what
happened: ``session_end``, or ``log`` for a line without an event of its own), ``message`` (the
text line) and the event's own fields. A session's end (:func:`session_fields`) carries the agent,
session ids, provider and call id where known, who ended it, its close code, its duration and the
messages and bytes each way. As in text lines: never a token, a body, a peer's close reason or a
client address.

Fields reach a line as ``log.info(..., extra={"event": "...", "fields": {...}})``; the text
format ignores them.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from . import _core
from .metrics import close_code_label, ended_by

__all__ = [
    "JsonFormatter",
    "TextFormatter",
    "batched",
    "configure",
    "session_fields",
    "write_info",
]

TEXT_FORMAT = "%(asctime)s %(levelname)s %(message)s"
# The keys every line has; an event's fields never replace them.
_BASE = ("ts", "level", "event", "message")


class TextFormatter(logging.Formatter):
    """``logging.Formatter`` with its default time (local, ``2026-12-02 10:43:01,123``), the
    date and time made once a second: a gateway writes a line per session, and each
    ``strftime`` of a local time costs a look at the time zone file."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        msec_format = self.default_msec_format or "%s,%03d"
        return msec_format % (_local_second(int(record.created)), record.msecs)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None)
        return _json_line(
            record.created,
            record.levelname.lower(),
            getattr(record, "event", "log"),
            record.getMessage(),
            fields if isinstance(fields, dict) else None,
            self.formatException(record.exc_info) if record.exc_info else None,
        )


def _json_line(
    created: float,
    level: str,
    event: str,
    message: str,
    fields: dict[str, Any] | None,
    exception: str | None = None,
) -> str:
    document: dict[str, Any] = {
        "ts": _timestamp(created),
        "level": level,
        "event": event,
        "message": message,
    }
    if fields is not None:
        document.update((k, v) for k, v in fields.items() if k not in _BASE)
    if exception is not None:
        document["exception"] = exception
    return json.dumps(document, ensure_ascii=False, default=str)


#: The handler :func:`configure` installed, its formatter, and whether that writes JSON.
_ours: tuple[logging.StreamHandler[Any], logging.Formatter, bool] | None = None


class _Held(threading.local):
    """Lines :func:`write_info` holds while :func:`batched` is open, for that handler: per
    thread (two gateways may run on two threads' event loops)."""

    lines: list[str] | None = None


_held = _Held()


class _Handler(logging.StreamHandler[Any]):
    """A ``StreamHandler`` that writes the lines a :func:`batched` block holds before any record
    of its own, so that lines keep their order."""

    def emit(self, record: logging.LogRecord) -> None:
        if _held.lines:
            _write_held(self, _held.lines)
        super().emit(record)


def configure(level: str = "INFO", log_format: str = "text") -> None:
    """Send the ``wsgate`` logs (and any other) to standard error as ``"text"`` or ``"json"``
    lines (what ``wsgate serve`` does)."""
    global _ours
    handler = _Handler(sys.stderr)
    json_lines = log_format == "json"
    formatter = JsonFormatter() if json_lines else TextFormatter(TEXT_FORMAT)
    handler.setFormatter(formatter)
    logging.basicConfig(level=level, handlers=[handler], force=True)
    _ours = (handler, formatter, json_lines)
    # What neither format shows is not gathered for each record (a line per session adds up):
    # the logging HOWTO's "Optimization" switches for the caller's file and line, the thread,
    # the process (a getpid call each) and the multiprocessing name.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


def write_info(
    logger: logging.Logger, event: str, message: str, fields: Callable[[], dict[str, Any]]
) -> bool:
    """Write an INFO line of ``event`` straight to :func:`configure`'s handler when that
    handler alone would receive it, as it is (no other handler, no filter, its formatter
    unchanged): the bytes its formatter would write, without a ``LogRecord`` or a trip through
    ``logging``. A gateway writes a line per session, and those cost more than the line
    (benches/README.md, "Session opens, round 5"). ``fields``: the event's, made only for JSON.
    The caller checked ``logger.isEnabledFor(logging.INFO)``. False: not for this handler; the
    caller logs it the usual way. A failing stream is reported as ``logging`` reports it."""
    ours = _ours
    if ours is None:
        return False
    handler, formatter, json_lines = ours
    root = logging.root
    if (
        logger.handlers
        or logger.filters
        or not logger.propagate
        or logger.parent is not root
        or root.filters
        or len(root.handlers) != 1
        or root.handlers[0] is not handler
        or handler.filters
        or handler.level > logging.INFO
        or handler.formatter is not formatter
    ):
        return False
    created = time.time()
    if json_lines:
        line = _json_line(created, "info", event, message, fields())
    else:
        # logging.Formatter's "%(asctime)s %(levelname)s %(message)s", its msecs as LogRecord's.
        msecs = int((created - int(created)) * 1000)
        line = f"{_local_second(int(created))},{msecs:03d} INFO {message}"
    held = _held.lines
    if held is not None:
        held.append(line + handler.terminator)
    else:
        _write(handler, line + handler.terminator, lambda: logger.makeRecord(
            logger.name, logging.INFO, "", 0, message, (), None))  # fmt: skip
    return True


@contextmanager
def batched() -> Iterator[None]:
    """The lines :func:`write_info` writes in this block go out together at its end, in one
    write (a gateway ending many sessions in one turn wrote a line, a system call, for each);
    a record logged the usual way meanwhile goes after those held so far. Nested blocks are
    one block."""
    if _held.lines is not None:
        yield
        return
    held: list[str] = []
    _held.lines = held
    try:
        yield
    finally:
        _held.lines = None
        ours = _ours
        if held and ours is not None:
            _write_held(ours[0], held)


def _write_held(handler: logging.StreamHandler[Any], held: list[str]) -> None:
    text = "".join(held)
    held.clear()
    _write(handler, text, lambda: logging.makeLogRecord({"msg": text, "levelno": logging.INFO}))


def _write(
    handler: logging.StreamHandler[Any], text: str, record: Callable[[], logging.LogRecord]
) -> None:
    handler.acquire()
    try:
        stream = handler.stream
        stream.write(text)
        stream.flush()
    except Exception:
        # As StreamHandler.emit: reported by the handler, not written again (a stream that
        # failed may have taken part of the text).
        handler.handleError(record())
    finally:
        handler.release()


def session_fields(
    outcome: _core.Outcome,
    *,
    agent: str,
    session_id: str,
    seconds: float,
    inprocess: bool,
    stopped: bool = False,
    provider: str | None = None,
    call_id: str | None = None,
) -> dict[str, Any]:
    """The fields of a ``session_end`` line (``ended_by`` and ``code`` as the metrics label
    them: docs/OPERATIONS.md)."""
    fields: dict[str, Any] = {
        "agent": agent,
        "session_id": session_id,
        "session": outcome.session_id,
        "ended_by": ended_by(outcome, inprocess, stopped),
        "detail": outcome.detail,
        "code": close_code_label(outcome.code),
        "client_close": None if outcome.client_close is None else outcome.client_close[0],
        "bot_close": None if outcome.bot_close is None else outcome.bot_close[0],
        "duration": round(seconds, 3),
        "messages_client_to_bot": outcome.messages_in,
        "bytes_client_to_bot": outcome.bytes_in,
        "messages_bot_to_client": outcome.messages_out,
        "bytes_bot_to_client": outcome.bytes_out,
    }
    if provider is not None:
        fields["provider"] = provider
        fields["call_id"] = call_id
    return fields


def _timestamp(created: float) -> str:
    seconds = int(created)
    millis = int((created - seconds) * 1000)
    return _utc_second(seconds) + f".{millis:03d}Z"


@functools.lru_cache(maxsize=1)
def _local_second(seconds: int) -> str:
    return time.strftime(logging.Formatter.default_time_format, time.localtime(seconds))


@functools.lru_cache(maxsize=1)
def _utc_second(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
