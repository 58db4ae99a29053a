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
    "write_session_lines",
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


#: Held lines go out once they would pass this many bytes: a pipe's writes up to PIPE_BUF
#: (4096 on Linux) are atomic, so another writer on the same pipe never cuts into a line.
_HELD_BYTES = 4096


class _Held(threading.local):
    """Lines :func:`write_info` holds while :func:`batched` is open on this thread (two
    gateways may run on two threads' event loops), and the handler they are for."""

    open = False
    handler: logging.StreamHandler[Any] | None = None
    lines: list[str]
    size = 0
    #: How many lines those are (an entry may hold several: the engine's chunks).
    count = 0

    def __init__(self) -> None:
        self.lines = []

    def hold(self, handler: logging.StreamHandler[Any], text: str, count: int = 1) -> None:
        """Holds ``text``: ``count`` whole lines."""
        if self.lines and (handler is not self.handler or self.size + len(text) > _HELD_BYTES):
            self.write()
        self.handler = handler
        self.lines.append(text)
        self.size += len(text)
        self.count += count

    def write(self) -> None:
        """Writes what is held, to the handler it is for."""
        lines, handler, count = self.lines, self.handler, self.count
        if not lines or handler is None:
            return
        self.lines, self.size, self.count = [], 0, 0
        _write(handler, "".join(lines), lambda: _not_written(count))


def _not_written(count: int, name: str = "wsgate") -> logging.LogRecord:
    """What a failed write of ``count`` session lines reports (not the lines themselves)."""
    return logging.makeLogRecord({
        "name": name, "levelno": logging.INFO, "levelname": "INFO",
        "msg": "%d session line(s) not written", "args": (count,)})  # fmt: skip


_held = _Held()


class _Handler(logging.StreamHandler[Any]):
    """A ``StreamHandler`` that writes the lines a :func:`batched` block holds on this thread
    before a record of its own, or a new stream: so lines keep their order on this thread
    through this handler, and go to the stream they were written for."""

    def emit(self, record: logging.LogRecord) -> None:
        if _held.handler is self:  # (no other handler's lock taken under this one's)
            _held.write()
        super().emit(record)

    def setStream(self, stream: Any) -> Any:
        if _held.handler is self:
            _held.write()
        return super().setStream(stream)


def configure(level: str = "INFO", log_format: str = "text") -> None:
    """Send the ``wsgate`` logs (and any other) to standard error as ``"text"`` or ``"json"``
    lines (what ``wsgate serve`` does)."""
    global _ours
    _held.write()  # for the handler being replaced
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
    ours = _ours_alone(logger)
    if ours is None:
        return False
    handler, _, json_lines = ours
    created = time.time()
    if json_lines:
        line = _json_line(created, "info", event, message, fields())
    else:
        line = _text_head(created) + message
    if _held.open:
        _held.hold(handler, line + handler.terminator)
    else:
        _write(handler, line + handler.terminator, lambda: logger.makeRecord(
            logger.name, logging.INFO, "", 0, message, (), None))  # fmt: skip
    return True


def write_session_lines(logger: logging.Logger, ends: _core.ToldEnds) -> bool:
    """Write the ``session_end`` lines of sessions the engine opened and Python never adopted,
    made by the engine (``rust/session_line.rs``: :func:`session_fields`' fields and the
    message of ``sessions.log_outcome``), where :func:`write_info` would write them, all at
    one time. False: not for :func:`configure`'s handler; the caller logs each the usual way.
    The caller checked ``logger.isEnabledFor(logging.INFO)``."""
    ours = _ours_alone(logger)
    if ours is None:
        return False
    handler, _, json_lines = ours
    created = time.time()
    terminator = handler.terminator
    if json_lines:
        chunks = ends.json(_timestamp(created), terminator, _HELD_BYTES)
    else:
        chunks = ends.text(_text_head(created), terminator, _HELD_BYTES)
    for chunk, count in chunks:
        if _held.open:
            _held.hold(handler, chunk, count)
        else:
            _write(handler, chunk, functools.partial(_not_written, count, logger.name))
    return True


def _ours_alone(
    logger: logging.Logger,
) -> tuple[logging.StreamHandler[Any], logging.Formatter, bool] | None:
    """:func:`configure`'s handler, when an INFO line of ``logger`` would reach it alone, as
    it is (no other handler, no filter, its formatter unchanged)."""
    ours = _ours
    if ours is None:
        return None
    handler, formatter, _ = ours
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
        return None
    return ours


def _text_head(created: float) -> str:
    """What :class:`TextFormatter`'s ``"%(asctime)s %(levelname)s %(message)s"`` puts before
    an INFO message made at ``created``, its msecs as ``LogRecord``'s."""
    msecs = int((created - int(created)) * 1000)
    return f"{_local_second(int(created))},{msecs:03d} INFO "


@contextmanager
def batched() -> Iterator[None]:
    """The lines :func:`write_info` writes in this block go out together, in writes of up to
    4 KiB (a gateway ending many sessions in one turn wrote a line, a system call, for each);
    a record logged meanwhile on this thread through the same handler goes after those held
    so far. Synchronous code only: a block open across an ``await`` would hold the lines of
    every task of the thread. Nested blocks are one block."""
    if _held.open:
        yield
        return
    _held.open = True
    try:
        yield
    finally:
        _held.open = False
        _held.write()


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
